# shellcheck shell=bash
# The ModelZoo test-script contract, implemented once. Every <folder>/test/*.sh is a thin wrapper:
#
#   Network="AttU_Net"; export RANK_SIZE=${RANK_SIZE:-8}; batch_size=128; epochs=150; mode=acc
#   demo_dataset=isic2018                  # what `python -m common.demo_data` writes without --data_path
#   train_command() { CMD=(train.py --data_path="$data_path" --batch_size="$batch_size" ...); }
#   source "$(dirname "${BASH_SOURCE[0]}")/../../common/scripts/modelzoo.sh"
#   modelzoo_main "$@"
#
# What modelzoo_main does (shared/docs/modelzoo.md A.1-A.6, A.8):
# * parses `--key=value` and `--key value`; the script's own flags are --data_path, --device_id,
#   --batch_size, --epochs, --workers, --precision_mode, --fp32, --hf32, --pth_path/--resume; every other
#   flag goes to the Python entry point, which rejects an unknown one with a clear message;
# * works from the model folder or from test/; no --data_path means the demo dataset, announced loudly;
# * --batch_size is the GLOBAL batch over all ranks of all nodes (RANK_SIZE per node x NNODES); train_command
#   sees `world_size` and `per_rank_batch` (= batch_size / world_size) for an entry point whose flag is per
#   process, and the CaseName is <Network>_bs<global batch>_<world size>p[_fp32|_hf32]_<mode>;
# * sources test/env_npu.sh (unless etp_running_flag is "true"; a no-op without CANN) BEFORE counting the
#   NPUs/GPUs, so that torch_npu finds the devices CANN's set_env.sh makes visible;
# * writes test/output/<r>/train_<r>.log per GLOBAL rank r (test/output/<id>/train_<id>.log in 1p); global
#   rank 0's folder gets <CaseName>.log, train_<CaseName>_loss.txt, summary.json and progress.png, written
#   by Python; each node removes only its own ranks' folders;
# * launches RANK_SIZE ranks through torchrun (one failing rank stops all, the script exits non-zero);
#   RANK_SIZE may be lowered (RANK_SIZE=2 bash test/train_full_8p.sh); NNODES/NODE_RANK/MASTER_ADDR/
#   MASTER_PORT select multi-node, where only the node holding rank 0 prints the summary; on a machine
#   without accelerators the ranks run on the CPU (gloo);
# * a rank killed by SIGKILL (exit 137, torchrun's exitcode -9) is reported as a probable out-of-memory kill
#   with its peak resident memory (kernel log, else sampled every MODELZOO_MEMORY_POLL_S=2 s, else unknown).

modelzoo_die() {
    echo "[Error] $*" >&2
    exit 1
}

modelzoo_usage() {
    cat <<EOF
usage: bash test/$(basename "$0") [--data_path=DIR] [--device_id=N] [--batch_size=N] [--epochs=N]
       [--workers=N] [--precision_mode=allow_mix_precision|must_keep_origin_dtype] [--fp32] [--hf32]
       [--pth_path=CKPT] [any flag of the Python entry point, e.g. --lr=1e-3]

Case: ${Network}, RANK_SIZE=${RANK_SIZE}, batch_size=${batch_size}, epochs=${epochs:-}, mode=${mode}.
Without --data_path the ${demo_dataset} demo dataset is written and used.
Flags accept --key=value and --key value. --batch_size is the global batch (all ranks, all nodes).
Results: test/output/<device id>/${Network}_bs<global batch>_<ranks>p_${mode}.log
EOF
}

# Fills the script variables and MODELZOO_PASSTHROUGH from the command line.
modelzoo_parse_args() {
    MODELZOO_PASSTHROUGH=()
    while [ $# -gt 0 ]; do
        local arg=$1 key value has_value=0
        shift
        case $arg in
            -h | --help)
                modelzoo_usage
                exit 0
                ;;
            --*=*)
                key=${arg%%=*}
                value=${arg#*=}
                has_value=1
                ;;
            --*)
                key=$arg
                if [ $# -gt 0 ] && [[ $1 != --* ]]; then
                    value=$1
                    has_value=1
                    shift
                fi
                ;;
            *)
                modelzoo_die "unexpected argument '$arg' (flags look like --key=value or --key value)"
                ;;
        esac
        case ${key#--} in
            data_path) data_path=$value ;;
            device_id) device_id=$value ;;
            batch_size | batch-size) batch_size=$value ;;
            epochs | train_epochs) epochs=$value ;;
            workers) workers=$value ;;
            precision_mode) precision_mode=$value ;;
            fp32) precision_mode=must_keep_origin_dtype precision_tag=_fp32 ;;
            hf32) precision_tag=_hf32 export_hf32=1 ;;
            pth_path | resume | checkpoint) pth_path=$value ;;
            *)
                if [ $has_value = 1 ]; then
                    MODELZOO_PASSTHROUGH+=("$key=$value")
                else
                    MODELZOO_PASSTHROUGH+=("$key")
                fi
                ;;
        esac
        if [[ ${key#--} =~ ^(data_path|device_id|batch_size|batch-size|epochs|train_epochs|workers|precision_mode|pth_path|resume|checkpoint)$ ]] && [ $has_value = 0 ]; then
            modelzoo_die "$key needs a value ($key=VALUE)"
        fi
    done
}

modelzoo_is_int() { [[ $1 =~ ^[0-9]+$ ]]; }

# "pid kB" of the peak resident memory (VmHWM) of process $1 and of every process below it: one pass over
# /proc, cheap enough every few seconds beside 8 ranks and their data-loader workers.
modelzoo_memory_sample() {
    cat /proc/[0-9]*/status 2>/dev/null | awk -v root="$1" '
        /^Pid:/ { pid = $2 }
        /^PPid:/ { parent[pid] = $2 }
        /^VmHWM:/ { hwm[pid] = $2 }
        END {
            inside[root] = 1
            for (grown = 1; grown; ) {
                grown = 0
                for (p in parent) if (!(p in inside) && (parent[p] in inside)) { inside[p] = 1; grown = 1 }
            }
            for (p in inside) if (p in hwm) print p, hwm[p]
        }'
}

# Records the peak resident memory (kB) of the processes below $1 in $2 as "pid kB" lines, every
# MODELZOO_MEMORY_POLL_S seconds (0: off), until $1 ends: a rank the kernel kills leaves no summary of its
# own, and the last sample is the best figure available where the kernel log is not readable.
modelzoo_watch_memory() {
    local root=$1 file=$2 interval=${MODELZOO_MEMORY_POLL_S:-2} pid kb stop="" sleeper=""
    local -A peak=()
    [ -n "$file" ] && [[ $interval =~ ^[0-9]*\.?[0-9]+$ ]] || return 0
    awk -v s="$interval" 'BEGIN { exit !(s + 0 > 0) }' || return 0
    # SIGTERM ends the loop between two writes, so the caller may remove the file as soon as we are gone.
    trap 'stop=1; [ -z "$sleeper" ] || kill "$sleeper" 2>/dev/null' TERM
    while [ -z "$stop" ] && kill -0 "$root" 2>/dev/null; do
        while read -r pid kb; do
            peak[$pid]=$kb
        done < <(modelzoo_memory_sample "$root")
        if [ ${#peak[@]} -gt 0 ]; then
            for pid in "${!peak[@]}"; do echo "$pid ${peak[$pid]}"; done >"$file.tmp" && mv -f "$file.tmp" "$file"
        fi
        [ -n "$stop" ] && break
        sleep "$interval" &
        sleeper=$!
        wait "$sleeper"
        sleeper=""
    done
}

# The peak resident memory of process $1 as far as it is known: the kernel's OOM report (dmesg, when
# readable), else the last sample of modelzoo_watch_memory in $2, else "unknown".
modelzoo_peak_memory() {
    local pid=$1 file=$2 line kb
    line=$(dmesg 2>/dev/null | grep -E "Killed process $pid " | tail -n 1)
    if [ -n "$line" ]; then
        # mm/oom_kill.c: "Killed process <pid> (<comm>) total-vm:..kB, anon-rss:..kB, file-rss:..kB, shmem-rss:..kB"
        kb=$(printf '%s\n' "$line" | awk '{ n = 0; s = $0
            while (match(s, /(anon|file|shmem)-rss:[0-9]+kB/)) { f = substr(s, RSTART, RLENGTH); sub(/^[a-z]+-rss:/, "", f); n += f + 0; s = substr(s, RSTART + RLENGTH) }
            print n }')
        if modelzoo_is_int "$kb" && [ "$kb" -gt 0 ]; then
            echo "$(((kb + 512) / 1024)) MB (kernel log)"
            return
        fi
    fi
    kb=$(awk -v p="$pid" '$1 == p { print $2 }' "$file" 2>/dev/null | tail -n 1)
    if modelzoo_is_int "$kb"; then
        echo "at least $(((kb + 512) / 1024)) MB (last sample, every ${MODELZOO_MEMORY_POLL_S:-2} s)"
    else
        echo "unknown"
    fi
}

# "<global rank> <pid>" for every rank torchrun reports as ended by SIGKILL in its log $1 (exitcode -9).
modelzoo_killed_ranks() {
    awk '/^ *rank *: *[0-9]+/ { sub(/^ *rank *: */, ""); rank = $1 }
         /^ *exitcode *: *-9 *\(pid: *[0-9]+\)/ { sub(/.*\(pid: */, ""); sub(/\).*/, ""); print rank, $0 }' \
        "$1" 2>/dev/null | sort -u
}

# One line per process the kernel killed (exit 137 / SIGKILL): most often the out-of-memory killer.
modelzoo_report_killed() {
    local what=$1 pid=$2 memory_file=$3
    echo "[Error] $what (pid $pid) was killed by SIGKILL, probably by the kernel's out-of-memory killer;" \
        "its peak resident memory: $(modelzoo_peak_memory "$pid" "$memory_file")." \
        "Lower --batch_size or --workers, or free memory on this node." >&2
}

modelzoo_main() {
    local test_path_dir model_root
    test_path_dir=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)
    model_root=$(cd "$test_path_dir/.." && pwd)
    MODELZOO_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    cd "$model_root" || modelzoo_die "cannot enter $model_root"
    export PYTHONPATH="$MODELZOO_REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
    PYTHON=${PYTHON:-python3}

    data_path=${data_path:-}
    device_id=${device_id:-0}
    workers=${workers:-}
    precision_mode=${precision_mode:-allow_mix_precision}
    precision_tag=${precision_tag:-}
    pth_path=${pth_path:-}
    modelzoo_parse_args "$@"

    modelzoo_is_int "$RANK_SIZE" && [ "$RANK_SIZE" -ge 1 ] || modelzoo_die "RANK_SIZE must be a positive integer, got '$RANK_SIZE'"
    modelzoo_is_int "$batch_size" && [ "$batch_size" -ge 1 ] || modelzoo_die "--batch_size must be a positive integer, got '$batch_size'"
    [ -z "${epochs:-}" ] || { modelzoo_is_int "$epochs" && [ "$epochs" -ge 1 ]; } || modelzoo_die "--epochs must be a positive integer, got '$epochs'"
    [ -z "$workers" ] || modelzoo_is_int "$workers" || modelzoo_die "--workers must be a non-negative integer, got '$workers'"
    modelzoo_is_int "$device_id" || modelzoo_die "--device_id must be a non-negative integer, got '$device_id'"

    # Ranks: RANK_SIZE per node on NNODES nodes; torchrun numbers them node by node
    # (RANK = NODE_RANK * RANK_SIZE + LOCAL_RANK), so this node holds first_rank .. first_rank+RANK_SIZE-1.
    local nnodes=${NNODES:-1} node_rank=${NODE_RANK:-0}
    modelzoo_is_int "$nnodes" && [ "$nnodes" -ge 1 ] || modelzoo_die "NNODES must be a positive integer, got '$nnodes'"
    modelzoo_is_int "$node_rank" && [ "$node_rank" -lt "$nnodes" ] || modelzoo_die "NODE_RANK must be 0..$((nnodes - 1)) with NNODES=$nnodes, got '$node_rank'"
    local world_size=$((RANK_SIZE * nnodes)) first_rank=$((node_rank * RANK_SIZE))
    # --batch_size is the global batch over every rank of every node; train_command hands the per-rank
    # share to an entry point whose flag is per process.
    if [ $((batch_size % world_size)) -ne 0 ]; then
        modelzoo_die "global batch size $batch_size is not divisible by $world_size ranks (--batch_size is the global batch; RANK_SIZE=$RANK_SIZE x NNODES=$nnodes)"
    fi
    local per_rank_batch=$((batch_size / world_size))

    # Data: the user's, or the demo dataset in the real dataset's own format.
    if [ -z "$data_path" ]; then
        data_path="$model_root/demo_data/$demo_dataset"
        echo "================================================================================"
        echo "  No --data_path given: training on the built-in ${demo_dataset} DEMO dataset"
        echo "  ($data_path). Numbers from it say nothing about the real dataset."
        echo "  Pass --data_path=/path/to/${demo_dataset} for a real run."
        echo "================================================================================"
        "$PYTHON" -m common.demo_data "$demo_dataset" --out "$data_path" --if-missing >/dev/null ||
            modelzoo_die "could not write the demo dataset to $data_path"
    fi
    [ -e "$data_path" ] || modelzoo_die "--data_path '$data_path' does not exist"
    data_path=$(cd "$(dirname "$data_path")" && pwd)/$(basename "$data_path")

    # Device id: ASCEND_DEVICE_ID from the environment wins in 1p; 8p logs and summarises on device 0.
    if [ "$world_size" -gt 1 ]; then
        export ASCEND_DEVICE_ID=0
    else
        export ASCEND_DEVICE_ID=${ASCEND_DEVICE_ID:-$device_id}
        echo "device id is ${ASCEND_DEVICE_ID}"
    fi

    MODELZOO_START_TIME=$(date +%s.%N)
    export MODELZOO_START_TIME
    # The CANN environment comes before the device count: without it torch_npu finds no NPU.
    if [ "${etp_running_flag:-false}" != "true" ] && [ -f "$test_path_dir/env_npu.sh" ]; then
        # shellcheck disable=SC1091
        source "$test_path_dir/env_npu.sh"
    fi

    # Ranks versus devices.
    local accelerators
    accelerators=$("$PYTHON" -m common.device_count 2>/dev/null | tail -n 1)
    modelzoo_is_int "$accelerators" || accelerators=0
    if [ "$accelerators" -gt 0 ] && [ "$RANK_SIZE" -gt "$accelerators" ]; then
        modelzoo_die "RANK_SIZE=$RANK_SIZE ranks asked for on a node with $accelerators accelerator(s); run RANK_SIZE=$accelerators bash test/$(basename "$0") ..."
    fi
    if [ "$accelerators" -eq 0 ]; then
        local cores
        cores=$(nproc 2>/dev/null || echo 1)
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(((cores / RANK_SIZE) > 0 ? cores / RANK_SIZE : 1))}
        [ "$RANK_SIZE" -gt 1 ] && echo "No NPU/GPU found: running $RANK_SIZE ranks on the CPU (gloo), $OMP_NUM_THREADS thread(s) each."
    fi

    # Precision: mixed precision unless the origin dtype is asked for.
    AMP_FLAGS=()
    case $precision_mode in
        allow_mix_precision | allow_fp32_to_fp16 | force_fp16)
            if [ "$accelerators" -gt 0 ]; then
                AMP_FLAGS=(--amp "--opt-level=${opt_level:-O2}" "--loss-scale=${loss_scale:-dynamic}")
            else
                # On the CPU bf16 pays only with bf16 instructions (AVX512-BF16, AMX) and not for every
                # model: --amp=auto times both on the model and keeps the faster (fp32 without them).
                AMP_FLAGS=(--amp=auto "--opt-level=${opt_level:-O2}")
            fi
            ;;
        must_keep_origin_dtype) AMP_FLAGS=(--opt-level=O0) ;;
        *) modelzoo_die "--precision_mode must be allow_mix_precision or must_keep_origin_dtype, got '$precision_mode'" ;;
    esac
    [ "${export_hf32:-0}" = 1 ] && export ALLOW_HF32=1

    # Outputs by global rank: test/output/<r>/train_<r>.log. A node removes only its own ranks' folders (on a
    # shared filesystem the other nodes' logs are theirs); global rank 0's folder holds the summary.
    CaseName="${Network}_bs${batch_size}_${world_size}p${precision_tag}_${mode}"
    local out_root="$test_path_dir/output" out_dir="$test_path_dir/output/$ASCEND_DEVICE_ID" rank
    local holds_rank0=0
    [ "$first_rank" -eq 0 ] && holds_rank0=1
    if [ "$world_size" -gt 1 ]; then
        for ((rank = first_rank; rank < first_rank + RANK_SIZE; rank++)); do
            rm -rf "${out_root:?}/$rank"
        done
    else
        rm -rf "$out_dir"
    fi
    mkdir -p "$out_root"
    [ "$holds_rank0" = 1 ] && mkdir -p "$out_dir"
    export MODELZOO_OUTPUT_DIR=$out_dir MODELZOO_NETWORK=$Network MODELZOO_CASE_NAME=$CaseName
    export MODELZOO_BATCH_SIZE=$batch_size MODELZOO_RANK_SIZE=$world_size MODELZOO_MODE=$mode

    CMD=()
    train_command
    [ ${#CMD[@]} -gt 0 ] || modelzoo_die "the test script's train_command set no command"
    local log="$out_dir/train_${ASCEND_DEVICE_ID}.log" torchrun_log="$out_root/torchrun.log" child rc
    if [ "$world_size" -gt 1 ]; then
        log="$out_root/$first_rank/train_$first_rank.log"
        local rdzv=(--standalone)
        if [ "$nnodes" -gt 1 ]; then
            torchrun_log="$out_root/torchrun_node$node_rank.log"
            rdzv=(--nnodes="$nnodes" --node_rank="$node_rank" --master_addr="${MASTER_ADDR:?set MASTER_ADDR for multi-node}" --master_port="${MASTER_PORT:-29688}")
        fi
        echo "Launching $RANK_SIZE ranks x $nnodes node(s) (ranks $first_rank..$((first_rank + RANK_SIZE - 1)) here, $per_rank_batch images each per step): logs in $out_root/<rank>/train_<rank>.log"
        "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node="$RANK_SIZE" --max_restarts=0 \
            -m common.launch_rank "$out_root" -- "${CMD[@]}" "${AMP_FLAGS[@]}" "${MODELZOO_PASSTHROUGH[@]}" \
            >"$torchrun_log" 2>&1 &
    else
        echo "Training log: $log"
        nohup "$PYTHON" "${CMD[@]}" "${AMP_FLAGS[@]}" "${MODELZOO_PASSTHROUGH[@]}" >"$log" 2>&1 &
    fi
    child=$!
    local memory_file watcher
    memory_file=$(mktemp "${TMPDIR:-/tmp}/modelzoo_memory.XXXXXX" 2>/dev/null) || memory_file=""
    modelzoo_watch_memory "$child" "$memory_file" </dev/null >/dev/null 2>&1 &
    watcher=$!
    trap 'kill -TERM $child 2>/dev/null; wait $child; kill $watcher 2>/dev/null; wait $watcher; rm -f "$memory_file"; exit 130' INT TERM
    wait $child
    rc=$?
    trap - INT TERM
    kill "$watcher" 2>/dev/null
    wait "$watcher" 2>/dev/null

    if [ $rc -ne 0 ]; then
        local killed=0 pid
        if [ "$world_size" -gt 1 ]; then
            while read -r rank pid; do
                [ -n "$pid" ] || continue
                modelzoo_report_killed "rank $rank" "$pid" "$memory_file"
                killed=1
                [ -f "$out_root/$rank/train_$rank.log" ] && log="$out_root/$rank/train_$rank.log"
            done < <(modelzoo_killed_ranks "$torchrun_log")
        fi
        if [ $killed = 0 ] && [ $rc -eq 137 ]; then
            local what="the training process"
            [ "$world_size" -gt 1 ] && what="torchrun"
            modelzoo_report_killed "$what" "$child" "$memory_file"
        fi
        [ -z "$memory_file" ] || rm -f "$memory_file"
        echo "[Error] training exited with code $rc. Last lines of $log:" >&2
        tail -n 25 "$log" >&2 2>/dev/null
        [ "$world_size" -gt 1 ] && tail -n 15 "$torchrun_log" >&2 2>/dev/null
        exit $rc
    fi
    [ -z "$memory_file" ] || rm -f "$memory_file"
    if [ "$holds_rank0" != 1 ]; then
        echo "node $node_rank finished; the summary is written on node 0 ($out_dir/${CaseName}.log)"
        return 0
    fi
    [ -f "$out_dir/${CaseName}.log" ] || modelzoo_die "training ended but wrote no $out_dir/${CaseName}.log (see $log)"
    cat "$out_dir/final_result.txt"
    echo "Summary: $out_dir/${CaseName}.log"
}
