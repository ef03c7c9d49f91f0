# shellcheck shell=bash
# Ascend CANN environment; a no-op where CANN is not installed (see common/scripts/env_npu.sh).
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../../common/scripts/env_npu.sh"
