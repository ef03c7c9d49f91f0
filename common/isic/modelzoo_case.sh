# shellcheck shell=bash
# The ISIC 2018 case shared by AttU_Net/test/*.sh and R2U_Net/test/*.sh. The caller sets Network, RANK_SIZE,
# batch_size (global), epochs, learning_rate and mode (acc | perf), then sources this file, which defines
# the main.py command and hands over to the shell library (common/scripts/modelzoo.sh).
# Full runs keep main.py's checkpoint and result folders (./models/<model_type>/, ./result/<model_type>/);
# performance runs keep theirs beside the ModelZoo logs, so a timing run never overwrites a trained model.
demo_dataset=isic2018

train_command() {
    CMD=(main.py --mode=train --data_path="$data_path" --batch_size="$batch_size" --num_epochs="$epochs"
        --lr="$learning_rate")
    if [ "$mode" = perf ]; then
        CMD+=(--model_path="$MODELZOO_OUTPUT_DIR/models" --result_path="$MODELZOO_OUTPUT_DIR/result")
    fi
    [ -z "$workers" ] || CMD+=(--num_workers="$workers")
    [ -z "$pth_path" ] || CMD+=(--pth_path="$pth_path")
}

# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../scripts/modelzoo.sh"
