#!/usr/bin/env bash
# Every CI job, one after the other (each folder in its own pytest process: the folders' module names
# such as train.py and dataset.py would collide in one). Prints a timing table; exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")"
jobs=(common UNet_nested AttU_Net R2U_Net UNet_mindspore VNet)
[ $# -gt 0 ] && jobs=("$@")
failed=()
report=()
for job in "${jobs[@]}"; do
    echo "=== ci/$job.sh ==="
    start=$(date +%s)
    if bash "./$job.sh"; then status=ok; else status=FAILED; failed+=("$job"); fi
    report+=("$(printf '%-16s %-7s %5ss' "$job" "$status" $(($(date +%s) - start)))")
done
echo "=== summary ==="
printf '%s\n' "${report[@]}"
[ ${#failed[@]} -eq 0 ] || { echo "failed: ${failed[*]}"; exit 1; }
