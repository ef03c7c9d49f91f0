# shellcheck shell=bash
# Sourced by the four test/*.sh cases after they set Network, RANK_SIZE, batch_size, epochs, mode and
# repeat: the train.py command line of the ModelZoo contract (common/scripts/modelzoo.sh) for this model.
# batch_size is global over all ranks of all nodes (ModelZoo); train.py's --batchsize is per device
# (MindSpore), so it gets modelzoo_main's per_rank_batch = batch_size / (RANK_SIZE x NNODES).
demo_dataset=isbi2012
loss_scale=1024 # the original's FixedLossScaleManager(1024), used when the library turns AMP on
train_command() {
    CMD=(train.py --data_url="$data_path" --batchsize="$per_rank_batch" --epochs="$epochs"
        --repeat="$repeat" --ckpt_dir="$MODELZOO_OUTPUT_DIR/ckpt")
    [ -n "$workers" ] && CMD+=(--workers="$workers")
    [ -n "$pth_path" ] && CMD+=(--resume="$pth_path")
    if [ -z "${accelerators+set}" ]; then # modelzoo_main's count of NPUs/GPUs, else our own
        accelerators=$("${PYTHON:-python3}" -m common.device_count 2>/dev/null | tail -n 1)
    fi
    if [ "$mode" = perf ] && [ "${accelerators:-0}" = 0 ]; then
        # Without NPU/GPU a performance case is a smoke run; flags given to the script override these.
        echo "No NPU/GPU found: CPU-sized performance case (--image_size=188 --train_steps=3 --warmup_steps=1)"
        CMD+=(--image_size=188 --train_steps=3 --warmup_steps=1 --workers="${workers:-0}")
    fi
}
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../../common/scripts/modelzoo.sh"
