#!/usr/bin/env bash
# CI job for AttU_Net/: its tests, run from the folder as its scripts run.
set -euo pipefail
cd "$(dirname "$0")/../AttU_Net"
python3 -m pytest tests -q -p no:cacheprovider "$@"
