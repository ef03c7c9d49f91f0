#!/usr/bin/env bash
# V-Net throughput on 8 devices (ModelZoo 8p performance script: batch 4 per process = global 32, 2 epochs).
# Usage: RANK_SIZE=8 bash test/train_performance_8p.sh [--data_path=DIR] [--epochs=N] [any train.py flag]
export RANK_SIZE=${RANK_SIZE:-8}
batch_size=32
epochs=2
mode=perf
learning_rate=1e-3
lr_decay=0.3
weight_decay=1e-5
seed=233
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_case.sh"
modelzoo_main "$@"
