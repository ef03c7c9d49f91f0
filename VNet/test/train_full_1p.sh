#!/usr/bin/env bash
# V-Net on LUNA16, 1 device, the full schedule of the ModelZoo 1p script: batch 8, 200 epochs, lr 1e-4,
# seed 49, weight decay 1e-8, static loss scale 128. The ModelZoo script passed "--lr=1e-4 --lr=1", so
# argparse trained at lr 1.0; the second flag was meant as the decay: here lr 1e-4, no decay.
# Usage: bash test/train_full_1p.sh [--data_path=DIR] [--epochs=N] [--batch_size=N] [any train.py flag]
export RANK_SIZE=${RANK_SIZE:-1}
batch_size=8
epochs=200
mode=acc
learning_rate=1e-4
lr_decay=1
weight_decay=1e-8
seed=49
loss_scale=128
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_case.sh"
modelzoo_main "$@"
