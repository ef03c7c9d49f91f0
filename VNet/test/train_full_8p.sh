#!/usr/bin/env bash
# V-Net on LUNA16, 8 devices (RANK_SIZE=2 bash ... for fewer), the ModelZoo 8p schedule: 4 volumes per
# process, i.e. global batch 32 (CaseName VNet_bs32_8p_acc; --batch_size is global, as in every folder),
# 200 epochs, lr 1e-3 decayed x0.3 at epochs 50 and 100, weight decay 1e-5, seed 233, dynamic loss scale.
# Every rank logs to test/output/<rank>/train_<rank>.log.
# Usage: bash test/train_full_8p.sh [--data_path=DIR] [--epochs=N] [--batch_size=N] [any train.py flag]
export RANK_SIZE=${RANK_SIZE:-8}
batch_size=32
epochs=200
mode=acc
learning_rate=1e-3
lr_decay=0.3
weight_decay=1e-5
seed=233
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_case.sh"
modelzoo_main "$@"
