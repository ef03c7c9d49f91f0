#!/usr/bin/env bash
# Device check on a machine with a GPU or NPU: every folder's test scripts, short (bf16, fp16,
# deterministic, kill-and-resume, 2-rank 8p where 2+ devices are visible) and the benchmark sweep,
# within a time budget. Writes device_check.json and prints a table; exits non-zero if a case failed.
#   bash ci/device_check.sh [--json=FILE] [--budget=SECONDS] [--folders=A,B] [--cases=bf16,8p]
#   bash ci/device_check.sh --dry-run      # no training: list the cases and check each can run
# The logic is ci/device_check.py (`--help` lists every flag).
set -euo pipefail
exec "${PYTHON:-python3}" "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/device_check.py" "$@"
