#!/usr/bin/env bash
# CI job for common/: the shared runtime's tests (the lint is ci/lint.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest common/tests -q -p no:cacheprovider "$@"
