#!/usr/bin/env bash
# Evaluate a checkpoint on its fold: bash scripts/run_standalone_eval.sh [DATASET] [CHECKPOINT] [eval.py flags]
# Prints "Cross valid dice coeff is: ..." (also in eval.log) and writes outputs/eval/summary.json, overlays and,
# when the data has a test volume, the predicted test labels.
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_env.sh"
if [ $# -lt 2 ] || [[ $1 == --* ]] || [[ $2 == --* ]]; then
    echo "=============================================================================================================="
    echo "Please run the script as: "
    echo "bash scripts/run_standalone_eval.sh [DATASET] [CHECKPOINT] [eval.py flags]"
    echo "for example: bash scripts/run_standalone_eval.sh /path/to/isbi2012/ ckpt_0/ckpt_unet_medical_adam-1_600.pth"
    echo "=============================================================================================================="
    exit 1
fi
dataset=$1
checkpoint=$2
shift 2
echo "Evaluation log: $UNET_ROOT/eval.log"
"$PYTHON" eval.py --data_url="$dataset" --ckpt_path="$checkpoint" "$@" 2>&1 | tee eval.log
exit "${PIPESTATUS[0]}"
