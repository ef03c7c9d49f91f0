# shellcheck shell=bash
# Shared by this folder's test/*.sh: the caller sets RANK_SIZE, batch_size (GLOBAL, over all ranks of all
# nodes, as every folder's scripts), epochs, mode, learning_rate, lr_decay, weight_decay, seed and optionally
# loss_scale, then sources this file. train.py's --batchSz is per process (the ModelZoo V-Net convention), so
# it gets modelzoo_main's per_rank_batch = batch_size / (RANK_SIZE x NNODES). --data_path may be the LUNA16
# tree as distributed (lung_ct_image/ + seg-lungs-LUNA16/; train.py normalises it once and reuses the result),
# a normalised tree, or a Decathlon task (imagesTr/ + labelsTr/).
# Checkpoints, train.csv and test.csv go to work/<CaseName>/; the ModelZoo results to test/output/<id>/.
Network="VNet"
demo_dataset=luna16

train_command() {
    CMD=(train.py --data="$data_path" --batchSz="$per_rank_batch" --nEpochs="$epochs" --lr="$learning_rate"
        --lr_decay="$lr_decay" --weight_decay="$weight_decay" --seed="$seed" --save="work/$MODELZOO_CASE_NAME")
    if [ -n "${workers:-}" ]; then CMD+=(--workers="$workers"); fi
    if [ -n "${pth_path:-}" ]; then CMD+=(--resume="$pth_path"); fi
}

# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../../common/scripts/modelzoo.sh"
