#!/usr/bin/env bash
# Train on one device, as MindSpore's script: bash scripts/run_standalone_train.sh [DATASET] [train.py flags]
# DATASET: folder with train-volume.tif + train-labels.tif (or train/images + train/labels); without it the
# demo data. The log goes to train.log in the model folder, checkpoints to ckpt_<device id>/.
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_env.sh"
echo "=============================================================================================================="
echo "Please run the script as: "
echo "bash scripts/run_standalone_train.sh [DATASET] [train.py flags, e.g. --cross_valid_ind=all]"
echo "for example: bash scripts/run_standalone_train.sh /path/to/isbi2012/"
echo "=============================================================================================================="
dataset=""
if [ $# -gt 0 ] && [[ $1 != --* ]]; then
    dataset=$1
    shift
fi
DEMO_FLAGS=()
if [ -z "$dataset" ]; then
    dataset=$(unet_demo_data) || exit 1
    unet_demo_flags
fi
echo "Training log: $UNET_ROOT/train.log"
"$PYTHON" train.py --data_url="$dataset" "${DEMO_FLAGS[@]}" "$@" 2>&1 | tee train.log
exit "${PIPESTATUS[0]}"
