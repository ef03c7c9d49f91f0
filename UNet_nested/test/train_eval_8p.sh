#!/usr/bin/env bash
# UNet on DSB 2018, 8 devices: one sharded validation pass of a trained checkpoint (_eval);
# --pth_path=CKPT (or --resume=CKPT) picks it, default models/dsb2018_96_<arch>_woDS/model_best.pth.tar.
# Flags: see `bash test/train_eval_8p.sh --help` and README.md; any train.py flag passes through (--arch=NestedUNet).
export RANK_SIZE=${RANK_SIZE:-8}
batch_size=128
epochs=
mode=eval
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_case.sh" "$@"
modelzoo_main "$@"
