#!/usr/bin/env bash
# UNet_mindspore, 1 device, full training: the original's 1p schedule (400 passes over the 24 pages of
# fold 1 = 600 steps of 16) cut into 10 checkpoint epochs of 60 steps. TrainAccuracy = cross-valid dice_coeff.
Network="UNet_mindspore"
export RANK_SIZE=1
batch_size=16
epochs=400
repeat=40
mode=acc
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_case.sh"
modelzoo_main "$@"
