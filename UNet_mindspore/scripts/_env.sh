# shellcheck shell=bash
# Sourced by scripts/*.sh: work from the model folder with the monorepo's `common` importable, the demo
# data when no DATASET is given, and a CPU-sized run on a machine without NPU/GPU for that demo.
UNET_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO_ROOT=$(cd "$UNET_ROOT/.." && pwd)
cd "$UNET_ROOT" || exit 1
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# MindSpore's scripts select the device with DEVICE_ID; common/device.py reads ASCEND_DEVICE_ID.
export ASCEND_DEVICE_ID=${ASCEND_DEVICE_ID:-${DEVICE_ID:-0}}
PYTHON=${PYTHON:-python3}
if [ "${etp_running_flag:-false}" != "true" ] && [ -f "$UNET_ROOT/test/env_npu.sh" ]; then
    # shellcheck disable=SC1091
    source "$UNET_ROOT/test/env_npu.sh"
fi

# Prints the folder of the ISBI 2012 demo stacks (written once, 30 pages of 256x256).
unet_demo_data() {
    local out="$UNET_ROOT/demo_data/isbi2012"
    {
        echo "================================================================================"
        echo "  No DATASET given: using the built-in ISBI 2012 DEMO data ($out)."
        echo "  Numbers from it say nothing about the real data."
        echo "================================================================================"
    } >&2
    "$PYTHON" -m common.demo_data isbi2012 --out "$out" --if-missing >/dev/null || return 1
    echo "$out"
}

# Fills DEMO_FLAGS: on a machine without NPU/GPU, a CPU-sized demo run (later flags override it).
unet_demo_flags() {
    local count
    count=$("$PYTHON" -m common.device_count 2>/dev/null | tail -n 1)
    DEMO_FLAGS=()
    if [ "${count:-0}" = 0 ]; then
        DEMO_FLAGS=(--image_size=188 --train_steps=3 --warmup_steps=1 --workers=0)
        echo "No NPU/GPU found: CPU-sized demo run (${DEMO_FLAGS[*]}); flags given after DATASET override these." >&2
    fi
}
