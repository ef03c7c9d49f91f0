#!/usr/bin/env bash
# UNet_mindspore, 8 devices, performance: 160 passes = 30 steps of 16 per device at 572x572.
Network="UNet_mindspore"
export RANK_SIZE=${RANK_SIZE:-8}
batch_size=128
epochs=160
repeat=160
mode=perf
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_case.sh"
modelzoo_main "$@"
