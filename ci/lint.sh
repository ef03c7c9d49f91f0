#!/usr/bin/env bash
# CI job: lint and format check of the whole tree, and the device check's plan (it cannot run here, having
# no GPU/NPU; its plan can, and fails on a case that could not run). Arguments meant for pytest are ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
bash ci/device_check.sh --dry-run --json="${TMPDIR:-/tmp}/device_check_plan.json"
