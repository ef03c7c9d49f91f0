#!/usr/bin/env bash
# One-click loss check (Tecorigin style): train AttU_Net for 100 iterations on the isic2018 demo data,
# then compare its loss curve with the committed baseline (baseline_loss.csv) using loss.py.
#
#   bash run_scripts/test.sh [any main.py flag, e.g. --lr=0.002]      (from any directory)
#
# Exit 0 = pass; 1 = the curves differ too much; 2 = not comparable (other settings); other = training
# failed. Environment: DATA_PATH (default ../demo_data/isic2018, written when missing), OUT (default
# run_scripts/outputs), LOSS_ARGS (extra loss.py flags), PYTHON. This is a 100-iteration check, not a
# training recipe: see ../README.md for full training.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$(cd "$root/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
data_path=${DATA_PATH:-$root/demo_data/isic2018}
out=${OUT:-$here/outputs}
mkdir -p "$out"
rm -rf "$out/models" "$out/result" "$out/precheck"
if [ -z "${DATA_PATH:-}" ]; then
    "$PYTHON" -m common.demo_data isic2018 --out "$data_path" --if-missing >/dev/null || exit 1
fi

# The settings the baseline was made with (its config hash covers them); extra flags come last and win.
settings=(--data_path "$data_path" --image_size 32 --batch_size 1 --lr 0.0002 --num_epochs 100
    --num_epochs_decay 70 --max_iters 100 --augmentation_prob 0.4 --seed 12345 --deterministic
    --log_step 10 --model_path "$out/models" --result_path "$out/result")
# Settings first: a run that cannot be compared with the baseline is refused before it trains.
"$PYTHON" "$here/run_AttU_Net.py" --model_type AttU_Net --cuda_idx 0 --nproc_per_node 1 "${settings[@]}" "$@" \
    --dry_run --result_path "$out/precheck" >"$out/precheck.log" 2>&1 || {
    rc=$?
    tail -n 20 "$out/precheck.log" >&2
    exit "$rc"
}
# shellcheck disable=SC2086
"$PYTHON" "$here/loss.py" --config_only --sdaa-log "$out/precheck/AttU_Net/loss_curve.csv" \
    --cuda-log "$here/baseline_loss.csv" ${LOSS_ARGS:-} || exit $?

log="$out/sdaa.log"
"$PYTHON" "$here/run_AttU_Net.py" --model_type AttU_Net --cuda_idx 0 --nproc_per_node 1 "${settings[@]}" "$@" 2>&1 |
    tee "$log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
    echo "[Error] training failed with exit code $rc; see $log" >&2
    exit "$rc"
fi
# shellcheck disable=SC2086
"$PYTHON" "$here/loss.py" --sdaa-log "$out/result/AttU_Net/loss_curve.csv" --cuda-log "$here/baseline_loss.csv" \
    --plot "$out/loss.jpg" ${LOSS_ARGS:-}
rc=$?
echo "log: $log   loss curve: $out/result/AttU_Net/loss_curve.csv   plot: $out/loss.jpg"
exit "$rc"
