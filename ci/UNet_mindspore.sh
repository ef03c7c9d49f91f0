#!/usr/bin/env bash
# CI job for UNet_mindspore/: its tests, run from the folder as its scripts run.
set -euo pipefail
cd "$(dirname "$0")/../UNet_mindspore"
python3 -m pytest tests -q -p no:cacheprovider "$@"
