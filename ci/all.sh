#!/usr/bin/env bash
# Every CI job (each folder in its own pytest process: the folders' module names such as train.py and
# dataset.py would collide in one), CI_LANES at a time (default: one per core, at most 2), longest first,
# each lane taking the next job when its last one ends. Almost every test runs single-threaded child
# processes, so two lanes on two cores take about half the time of one; with more than one lane each
# test process gets one torch thread. A job's output is printed when it ends. Prints a timing table;
# exits non-zero if any failed.
#   bash ci/all.sh                  # every job
#   bash ci/all.sh UNet_nested VNet # just these
#   CI_LANES=1 bash ci/all.sh       # one job after the other
set -uo pipefail
cd "$(dirname "$0")"
jobs=(common VNet AttU_Net UNet_mindspore R2U_Net UNet_nested lint)
[ $# -gt 0 ] && jobs=("$@")
cores=$(nproc 2>/dev/null || echo 1)
lanes=${CI_LANES:-$((cores < 2 ? 1 : 2))}
[ "$lanes" -gt 1 ] && export OMP_NUM_THREADS=1
work=$(mktemp -d "${TMPDIR:-/tmp}/ci.XXXXXX")
trap 'rm -rf "$work"' EXIT
export CI_WORK=$work

# One job: its own pytest temporary folder, its output kept until it ends, then printed whole.
run_job() {
    local job=$1 start status
    start=$(date +%s)
    if bash "./$job.sh" --basetemp="$CI_WORK/tmp-$job" >"$CI_WORK/$job.log" 2>&1; then status=ok; else status=FAILED; fi
    {
        flock 9
        echo "=== ci/$job.sh ($status) ==="
        cat "$CI_WORK/$job.log"
        printf '%-16s %-7s %5ss\n' "$job" "$status" $(($(date +%s) - start)) >>"$CI_WORK/summary"
    } 9>"$CI_WORK/print.lock"
}
export -f run_job

start=$(date +%s)
printf '%s\n' "${jobs[@]}" | xargs -P "$lanes" -I{} bash -c 'run_job "$1"' _ {}
echo "=== summary ($lanes lanes, $(($(date +%s) - start)) s) ==="
cat "$work/summary"
! grep -q FAILED "$work/summary" || { echo "failed: $(grep FAILED "$work/summary" | cut -d' ' -f1 | xargs)"; exit 1; }
