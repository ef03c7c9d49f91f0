#!/usr/bin/env bash
# UNet on DSB 2018, 8 devices: the full 100-epoch schedule, global batch 128 (RANK_SIZE=N for fewer).
# Flags: see `bash test/train_full_8p.sh --help` and README.md; any train.py flag passes through (--arch=NestedUNet).
export RANK_SIZE=${RANK_SIZE:-8}
batch_size=128
epochs=100
mode=acc
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_case.sh" "$@"
modelzoo_main "$@"
