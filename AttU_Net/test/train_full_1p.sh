#!/usr/bin/env bash
# AttU_Net: 1 device, global batch 16, 150 epochs, lr 2e-4.
# Usage: bash test/train_full_1p.sh [--data_path=DIR] [--batch_size=N] [--epochs=N] [any main.py flag]
# Without --data_path the isic2018 demo dataset is written and used. The flags and the launch are
# common/scripts/modelzoo.sh's; main.py prepares --data_path (official folders or zips) when needed.
# Checkpoints go to ./models/<model_type>/, results and the loss curve to ./result/<model_type>/.
Network="AttU_Net"
export RANK_SIZE=1
batch_size=16
epochs=150
learning_rate=0.0002
mode=acc
demo_dataset=isic2018
train_command() {
    CMD=(main.py --mode=train --data_path="$data_path" --batch_size="$batch_size" --num_epochs="$epochs"
        --lr="$learning_rate" )
    [ -z "$workers" ] || CMD+=(--num_workers="$workers")
    [ -z "$pth_path" ] || CMD+=(--pth_path="$pth_path")
}
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../../common/scripts/modelzoo.sh"
modelzoo_main "$@"
