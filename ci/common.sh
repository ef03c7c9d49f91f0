#!/usr/bin/env bash
# CI job for common/: lint of the whole tree, the device check's plan, then the shared runtime's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
# The device check cannot run here (no GPU/NPU); its plan can, and fails on a case that could not run.
bash ci/device_check.sh --dry-run --json="${TMPDIR:-/tmp}/device_check_plan.json"
python3 -m pytest common/tests -q -p no:cacheprovider "$@"
