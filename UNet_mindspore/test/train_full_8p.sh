#!/usr/bin/env bash
# UNet_mindspore, 8 devices, full training: the original's 8p schedule (distribute_epochs 1600 = 300 steps
# of 16 per device) in 10 checkpoint epochs of 30 steps. batch_size is global (16 per device).
Network="UNet_mindspore"
export RANK_SIZE=${RANK_SIZE:-8}
batch_size=128
epochs=1600
repeat=160
mode=acc
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_case.sh"
modelzoo_main "$@"
