#!/usr/bin/env bash
# CI job for VNet/: its tests, run from the folder as its scripts run.
set -euo pipefail
cd "$(dirname "$0")/../VNet"
python3 -m pytest tests -q -p no:cacheprovider "$@"
