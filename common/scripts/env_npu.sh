# shellcheck shell=bash
# Ascend runtime environment (shared/docs/modelzoo.md A.2). Sourced by every test/env_npu.sh.
# A no-op on machines without the CANN toolkit, so the same scripts run on GPU and CPU unchanged.

_cann_root=/usr/local/Ascend
if [ -f /etc/Ascend/ascend_cann_install.info ]; then
    _install_path=$(grep -E '^Install_Path=' /etc/Ascend/ascend_cann_install.info | head -n 1 | cut -d= -f2-)
    [ -n "$_install_path" ] && _cann_root=$_install_path
fi

if [ -d "$_cann_root/ascend-toolkit/latest" ] && [ -f "$_cann_root/ascend-toolkit/set_env.sh" ]; then
    # shellcheck disable=SC1091
    source "$_cann_root/ascend-toolkit/set_env.sh"
elif [ -f "$_cann_root/nnae/set_env.sh" ]; then
    # shellcheck disable=SC1091
    source "$_cann_root/nnae/set_env.sh"
else
    unset _cann_root _install_path
    return 0 2>/dev/null || exit 0
fi

export ASCEND_SLOG_PRINT_TO_STDOUT=0
export ASCEND_GLOBAL_LOG_LEVEL=3
export ASCEND_GLOBAL_EVENT_ENABLE=0
export TASK_QUEUE_ENABLE=1
export PTCOPY_ENABLE=1
export COMBINED_ENABLE=${COMBINED_ENABLE:-1}
export DYNAMIC_OP="ADD#MUL"
export HCCL_WHITELIST_DISABLE=1
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
export HCCL_IF_IP=${HCCL_IF_IP:-$(hostname -I 2>/dev/null | awk '{print $1}')}
ulimit -SHn 512000 2>/dev/null || true

if command -v msnpureport >/dev/null 2>&1; then
    for _dev in 0 1 2 3 4 5 6 7; do msnpureport -g error -d "$_dev" >/dev/null 2>&1; done
    msnpureport -e disable >/dev/null 2>&1
fi
unset _cann_root _install_path _dev
