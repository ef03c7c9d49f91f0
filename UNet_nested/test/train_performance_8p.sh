#!/usr/bin/env bash
# UNet on DSB 2018, 8 devices: throughput over a fixed number of steps, global batch 128 (_perf).
# Flags: see `bash test/train_performance_8p.sh --help` and README.md; any train.py flag passes through (--arch=NestedUNet).
export RANK_SIZE=${RANK_SIZE:-8}
batch_size=128
epochs=
train_steps=${train_steps:-20}
mode=perf
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_case.sh" "$@"
modelzoo_main "$@"
