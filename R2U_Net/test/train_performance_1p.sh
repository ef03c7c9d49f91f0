#!/usr/bin/env bash
# R2U_Net: 1 device, global batch 16, 5 epochs (throughput).
# Usage: bash test/train_performance_1p.sh [--data_path=DIR] [--batch_size=N] [--epochs=N] [any main.py flag]
# Without --data_path the isic2018 demo dataset is written and used. The flags and the launch are
# common/scripts/modelzoo.sh's; main.py prepares --data_path (official folders or zips) when needed.
# A throughput run keeps its checkpoints in test/output/<id>/ so it never replaces a full run's ./models.
Network="R2U_Net"
export RANK_SIZE=1
batch_size=16
epochs=5
learning_rate=0.0002
mode=perf
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../../common/isic/modelzoo_case.sh"
modelzoo_main "$@"
