#!/usr/bin/env bash
# R2U_Net: 8 devices (RANK_SIZE may be lowered), global batch 128, 150 epochs, lr 8e-4, as the ModelZoo Attention_R2U_Net 8p scripts.
# Usage: bash test/train_full_8p.sh [--data_path=DIR] [--batch_size=N] [--epochs=N] [any main.py flag]
# Without --data_path the isic2018 demo dataset is written and used. The flags and the launch are
# common/scripts/modelzoo.sh's; main.py prepares --data_path (official folders or zips) when needed.
# Checkpoints go to ./models/<model_type>/, results and the loss curve to ./result/<model_type>/.
Network="R2U_Net"
export RANK_SIZE=${RANK_SIZE:-8}
batch_size=128
epochs=150
learning_rate=0.0008
mode=acc
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../../common/isic/modelzoo_case.sh"
modelzoo_main "$@"
