#!/usr/bin/env bash
# R2U_Net: 1 device, global batch 16, 150 epochs, lr 2e-4.
# Usage: bash test/train_full_1p.sh [--data_path=DIR] [--batch_size=N] [--epochs=N] [any main.py flag]
# Without --data_path the isic2018 demo dataset is written and used. The flags and the launch are
# common/scripts/modelzoo.sh's; main.py prepares --data_path (official folders or zips) when needed.
# Checkpoints go to ./models/<model_type>/, results and the loss curve to ./result/<model_type>/.
Network="R2U_Net"
export RANK_SIZE=1
batch_size=16
epochs=150
learning_rate=0.0002
mode=acc
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../../common/isic/modelzoo_case.sh"
modelzoo_main "$@"
