#!/usr/bin/env bash
# Distributed training, as MindSpore's script:
#   bash scripts/run_distribute_train.sh [RANK_TABLE_FILE] [DATASET] [train.py / launch_8p.py flags]
# RANK_TABLE_FILE: an Ascend HCCL rank table (JSON, format in src/rank_table.py and the README); the number of
# ranks and this server's device ids come from it. Without one (first argument a folder or a flag), N local
# ranks: --nproc=N, else RANK_SIZE, else the number of NPUs/GPUs. The ranks run through torchrun on NPU,
# GPU or CPU; rank on device X logs to logs/deviceX/log.log. Without DATASET the demo data is used.
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_env.sh"
echo "=============================================================================================================="
echo "Please run the script as: "
echo "bash scripts/run_distribute_train.sh [RANK_TABLE_FILE] [DATASET] [flags]"
echo "for example: bash scripts/run_distribute_train.sh /absolute/path/to/hccl_8p.json /absolute/path/to/data"
echo "=============================================================================================================="
table=""
dataset=""
if [ $# -gt 0 ] && [[ $1 != --* ]]; then
    if [ -d "$1" ]; then
        dataset=$1
    else
        table=$1
    fi
    shift
fi
if [ -z "$dataset" ] && [ $# -gt 0 ] && [[ $1 != --* ]]; then
    dataset=$1
    shift
fi
if [ -n "$table" ] && [ ! -f "$table" ]; then
    echo "[Error] rank table file '$table' not found (give its path, or a DATASET folder to run without one)" >&2
    exit 1
fi
DEMO_FLAGS=()
if [ -z "$dataset" ]; then
    dataset=$(unet_demo_data) || exit 1
    unet_demo_flags
fi
launch=("$PYTHON" launch_8p.py --data_url="$dataset")
[ -n "$table" ] && launch+=(--rank_table_file="$table")
"${launch[@]}" "${DEMO_FLAGS[@]}" "$@"
