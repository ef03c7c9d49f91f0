#!/usr/bin/env bash
# Toy case for the shell-library tests (common/tests/test_scripts.py).
Network="Toy"
export RANK_SIZE=${RANK_SIZE:-8}
batch_size=${TOY_BATCH:-4}
epochs=2
mode=${TOY_MODE:-acc}
demo_dataset=dsb2018
train_command() {
    CMD=(train.py --data_path="$data_path" --batch_size="$batch_size" --epochs="$epochs" --save="$MODELZOO_OUTPUT_DIR/run")
}
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../../../scripts/modelzoo.sh"
modelzoo_main "$@"
