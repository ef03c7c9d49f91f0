"""`python -m common.device_count`: how many NPUs (else CUDA GPUs) this node has, for the shell library,
which asks before every run.

Where no accelerator can be, it answers 0 without importing torch (3-4 s on a small CPU, paid before each
script's training even starts): no device node of a driver (Ascend's /dev/davinci<N>, NVIDIA's
/dev/nvidia<N>, WSL's /dev/dxg, ROCm's /dev/kfd) and no torch_npu to import. Otherwise torch counts
(`common.device.device_count`), torch_npu first.
"""

from __future__ import annotations

import glob
import importlib.util
import sys

DEVICE_NODES = ("/dev/davinci[0-9]*", "/dev/nvidia[0-9]*", "/dev/dxg", "/dev/kfd")


def may_have_accelerators() -> bool:
    """False only when neither a driver's device node nor torch_npu is present."""
    if any(glob.glob(pattern) for pattern in DEVICE_NODES):
        return True
    if "torch_npu" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("torch_npu") is not None
    except (ImportError, ValueError):  # a broken install: let torch_npu's own import decide
        return True


def count() -> int:
    if not may_have_accelerators():
        return 0
    from common.device import device_count

    return device_count("npu") or device_count("cuda")


def main() -> int:
    print(count())
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
