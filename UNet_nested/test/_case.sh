# shellcheck shell=bash
# Shared by this folder's test/*.sh. The caller sets RANK_SIZE, batch_size, epochs (may be empty), mode
# and optionally train_steps, then sources this file with the script's arguments: the case name follows
# --arch (UNet, or NestedUNet for UNet++), and train_command hands the script's variables to train.py.
Network="UNet"
unet_prev=""
for unet_arg in "$@"; do
    case $unet_arg in
        --arch=*) Network=${unet_arg#--arch=} ;;
        *) if [ "$unet_prev" = "--arch" ]; then Network=$unet_arg; fi ;;
    esac
    unet_prev=$unet_arg
done
demo_dataset=dsb2018

train_command() {
    CMD=(train.py --data_path="$data_path" --batch_size="$batch_size" --arch="$Network")
    if [ -n "${epochs:-}" ]; then CMD+=(--epochs="$epochs"); fi
    if [ -n "${workers:-}" ]; then CMD+=(--workers="$workers"); fi
    if [ -n "${train_steps:-}" ]; then CMD+=(--train_steps="$train_steps"); fi
    if [ "$mode" = eval ]; then CMD+=(--evaluate); fi
    if [ -n "${pth_path:-}" ]; then CMD+=(--resume="$pth_path"); fi
}

# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../../common/scripts/modelzoo.sh"
