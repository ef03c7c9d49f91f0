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
# * writes test/output/<id>/train_<id>.log (one log per rank in 8p) and leaves test/output/<id>/ with
#   <CaseName>.log, train_<CaseName>_loss.txt, summary.json and progress.png, all written by Python;
# * launches RANK_SIZE ranks through torchrun (one failing rank stops all, the script exits non-zero);
#   RANK_SIZE may be lowered (RANK_SIZE=2 bash test/train_full_8p.sh); NNODES/NODE_RANK/MASTER_ADDR/
#   MASTER_PORT select multi-node; on a machine without accelerators the ranks run on the CPU (gloo);
# * sources test/env_npu.sh only when etp_running_flag is not "true" (it is a no-op without CANN).

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
Flags accept --key=value and --key value. Results: test/output/<device id>/${Network}_bs<batch>_<N>p_${mode}.log
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
    if [ "$RANK_SIZE" -gt 1 ]; then
        export ASCEND_DEVICE_ID=0
    else
        export ASCEND_DEVICE_ID=${ASCEND_DEVICE_ID:-$device_id}
        echo "device id is ${ASCEND_DEVICE_ID}"
    fi

    # Ranks versus devices.
    local nnodes=${NNODES:-1} accelerators
    accelerators=$("$PYTHON" -m common.device --count 2>/dev/null | tail -n 1)
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
                # bf16 autocast is emulated (slow) on CPUs without AMX/AVX512-BF16: fp32 unless asked.
                AMP_FLAGS=(--opt-level=O0)
            fi
            ;;
        must_keep_origin_dtype) AMP_FLAGS=(--opt-level=O0) ;;
        *) modelzoo_die "--precision_mode must be allow_mix_precision or must_keep_origin_dtype, got '$precision_mode'" ;;
    esac
    [ "${export_hf32:-0}" = 1 ] && export ALLOW_HF32=1

    CaseName="${Network}_bs${batch_size}_${RANK_SIZE}p${precision_tag}_${mode}"
    local out_root="$test_path_dir/output" out_dir="$test_path_dir/output/$ASCEND_DEVICE_ID" rank
    rm -rf "$out_dir"
    mkdir -p "$out_dir"
    for ((rank = 1; rank < RANK_SIZE; rank++)); do
        rm -rf "${out_root:?}/$rank"
    done
    export MODELZOO_OUTPUT_DIR=$out_dir MODELZOO_NETWORK=$Network MODELZOO_CASE_NAME=$CaseName
    export MODELZOO_BATCH_SIZE=$batch_size MODELZOO_RANK_SIZE=$RANK_SIZE MODELZOO_MODE=$mode
    MODELZOO_START_TIME=$(date +%s.%N)
    export MODELZOO_START_TIME

    if [ "${etp_running_flag:-false}" != "true" ] && [ -f "$test_path_dir/env_npu.sh" ]; then
        # shellcheck disable=SC1091
        source "$test_path_dir/env_npu.sh"
    fi

    CMD=()
    train_command
    [ ${#CMD[@]} -gt 0 ] || modelzoo_die "the test script's train_command set no command"
    local log="$out_dir/train_${ASCEND_DEVICE_ID}.log" child rc
    if [ "$RANK_SIZE" -gt 1 ]; then
        local rdzv=(--standalone)
        if [ "$nnodes" -gt 1 ]; then
            rdzv=(--nnodes="$nnodes" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:?set MASTER_ADDR for multi-node}" --master_port="${MASTER_PORT:-29688}")
        fi
        echo "Launching $RANK_SIZE ranks x $nnodes node(s): logs in $out_root/<rank>/train_<rank>.log"
        "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node="$RANK_SIZE" --max_restarts=0 \
            -m common.launch_rank "$out_root" -- "${CMD[@]}" "${AMP_FLAGS[@]}" "${MODELZOO_PASSTHROUGH[@]}" \
            >"$out_root/torchrun.log" 2>&1 &
    else
        echo "Training log: $log"
        nohup "$PYTHON" "${CMD[@]}" "${AMP_FLAGS[@]}" "${MODELZOO_PASSTHROUGH[@]}" >"$log" 2>&1 &
    fi
    child=$!
    trap 'kill -TERM $child 2>/dev/null; wait $child; exit 130' INT TERM
    wait $child
    rc=$?
    trap - INT TERM

    if [ $rc -ne 0 ]; then
        echo "[Error] training exited with code $rc. Last lines of $log:" >&2
        tail -n 25 "$log" >&2 2>/dev/null
        [ "$RANK_SIZE" -gt 1 ] && tail -n 15 "$out_root/torchrun.log" >&2 2>/dev/null
        exit $rc
    fi
    [ -f "$out_dir/${CaseName}.log" ] || modelzoo_die "training ended but wrote no $out_dir/${CaseName}.log (see $log)"
    cat "$out_dir/final_result.txt"
    echo "Summary: $out_dir/${CaseName}.log"
}
