#!/usr/bin/env bash
# UNet on DSB 2018, 1 device: throughput over a fixed number of training steps (_perf).
# Flags: see `bash test/train_performance_1p.sh --help` and README.md; any train.py flag passes through (--arch=NestedUNet).
export RANK_SIZE=${RANK_SIZE:-1}
batch_size=16
epochs=
train_steps=${train_steps:-40}
mode=perf
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_case.sh" "$@"
modelzoo_main "$@"
