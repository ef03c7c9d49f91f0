#!/usr/bin/env bash
# UNet on DSB 2018, 1 device: the full 100-epoch schedule (ModelZoo: batch 16, lr 1e-3).
# Flags: see `bash test/train_full_1p.sh --help` and README.md; any train.py flag passes through (--arch=NestedUNet).
export RANK_SIZE=${RANK_SIZE:-1}
batch_size=16
epochs=100
mode=acc
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_case.sh" "$@"
modelzoo_main "$@"
