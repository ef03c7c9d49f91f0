#!/usr/bin/env bash
# V-Net throughput on 1 device (ModelZoo 1p performance script: batch 8, 1 epoch, lr 1e-4, dynamic loss
# scale). The summary's ActualFPS averages the steps after --warmup_steps (default 5), device-synchronised.
# Usage: bash test/train_performance_1p.sh [--data_path=DIR] [--epochs=N] [any train.py flag]
export RANK_SIZE=${RANK_SIZE:-1}
batch_size=8
epochs=1
mode=perf
learning_rate=1e-4
lr_decay=1
weight_decay=1e-8
seed=49
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_case.sh"
modelzoo_main "$@"
