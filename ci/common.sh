#!/usr/bin/env bash
# CI job for common/: lint of the whole tree, then the shared runtime's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
python3 -m pytest common/tests -q -p no:cacheprovider "$@"
