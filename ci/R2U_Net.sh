#!/usr/bin/env bash
# CI job for R2U_Net/: its tests, run from the folder as its scripts run.
set -euo pipefail
cd "$(dirname "$0")/../R2U_Net"
python3 -m pytest tests -q -p no:cacheprovider "$@"
