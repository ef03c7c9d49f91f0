#!/usr/bin/env bash
# UNet_mindspore, 1 device, performance: 40 passes = 60 steps of 16 at 572x572 (5 warm-up steps untimed).
Network="UNet_mindspore"
export RANK_SIZE=1
batch_size=16
epochs=40
repeat=40
mode=perf
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_case.sh"
modelzoo_main "$@"
