"""Which accelerator a process uses: Ascend NPU, NVIDIA GPU or CPU, chosen once, before the process group.

`select_device` is the only entry point. It imports `torch_npu` guarded (an install without Ascend CANN
fails inside `import torch_npu` in many ways, so every exception is caught), maps the ModelZoo and torchrun
variables to a device index, sets the current device before `torch.distributed` is initialised (HCCL and
NCCL bind to the current device at init) and reports what it found for the logs.
"""

from __future__ import annotations

import os
import platform
import warnings
from dataclasses import asdict, dataclass, field

import torch

from common.errors import ConfigError

DEVICE_CHOICES = ("auto", "npu", "gpu", "cuda", "cpu")
_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


def _import_torch_npu() -> bool:
    """True when torch_npu imports and registers the `npu` device; never raises."""
    try:
        import torch_npu  # noqa: F401
    except BaseException:  # noqa: BLE001 - a broken CANN install raises anything, even SystemExit
        return False
    return hasattr(torch, "npu")


def npu_available() -> bool:
    if not _import_torch_npu():
        return False
    try:
        return bool(torch.npu.is_available()) and torch.npu.device_count() > 0
    except BaseException:  # noqa: BLE001
        return False


def device_count(kind: str) -> int:
    """Number of devices of `kind` ("npu", "cuda", "cpu") visible to this process."""
    if kind == "npu":
        return torch.npu.device_count() if npu_available() else 0
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    return 1


def _resolve_kind(requested: str) -> str:
    requested = (requested or "auto").lower()
    if requested not in DEVICE_CHOICES:
        raise ConfigError(f"--device {requested!r} is not one of {', '.join(DEVICE_CHOICES)}")
    if requested == "gpu":
        requested = "cuda"
    if requested == "auto":
        if npu_available():
            return "npu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "npu" and not npu_available():
        raise ConfigError(
            "--device npu asked for, but torch_npu does not import or sees no NPU "
            "(install torch_npu matching this torch and source the CANN set_env.sh, or use --device auto)"
        )
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device gpu asked for, but torch sees no CUDA device (use --device auto or cpu)")
    return requested


def resolve_index(device_id: int | None = None) -> int:
    """Device index of this process.

    torchrun's LOCAL_RANK wins (one process per device on a node); otherwise an explicit --device_id, then
    the ModelZoo's ASCEND_DEVICE_ID, then 0. On CUDA the index is not remapped through
    CUDA_VISIBLE_DEVICES, so the ModelZoo log folders (test/output/<id>) keep their names.
    """
    if os.environ.get("LOCAL_RANK") not in (None, ""):
        return int(os.environ["LOCAL_RANK"])
    if device_id is not None and device_id >= 0:
        return int(device_id)
    if os.environ.get("ASCEND_DEVICE_ID") not in (None, ""):
        return int(os.environ["ASCEND_DEVICE_ID"])
    return 0


@dataclass(frozen=True)
class DeviceInfo:
    """What a process runs on. `device` is the torch.device; `backend` the process-group backend."""

    kind: str  # "npu", "cuda" or "cpu"
    index: int
    name: str
    backend: str
    versions: dict = field(default_factory=dict)
    # Where tensors go. select_device fills it; tests may point an NPU's tensors at the CPU (or "meta"),
    # since no NPU tensor can exist on a machine without one.
    torch_device: str | None = None

    @property
    def device(self) -> torch.device:
        if self.torch_device is not None:
            return torch.device(self.torch_device)
        return torch.device("cpu") if self.kind == "cpu" else torch.device(self.kind, self.index)

    @property
    def accumulate_dtype(self) -> torch.dtype:
        """dtype of running sums kept on the device: float64 on the CPU, float32 on an accelerator, where
        float64 kernels are slow or missing (NPU) and HCCL cannot all-reduce them."""
        return torch.float32 if self.is_accelerator else torch.float64

    @property
    def is_accelerator(self) -> bool:
        return self.kind != "cpu"

    def synchronize(self) -> None:
        """Wait for queued kernels, so wall-clock timings measure the work and not its submission."""
        if self.kind == "cuda":
            torch.cuda.synchronize(self.index)
        elif self.kind == "npu":
            torch.npu.synchronize(self.index)

    def describe(self) -> str:
        extra = ", ".join(f"{k} {v}" for k, v in self.versions.items() if v)
        return f"{self.kind}:{self.index} ({self.name}); {extra}"

    def as_dict(self) -> dict:
        return {**asdict(self), "device": str(self.device)}


def _cann_version() -> str | None:
    for key in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"):
        home = os.environ.get(key)
        if home:
            info = os.path.join(home, "version.cfg")
            if os.path.exists(info):
                with open(info) as handle:
                    for line in handle:
                        if "version" in line.lower():
                            return line.split("=", 1)[-1].strip()
            return os.path.basename(os.path.realpath(home))
    return None


def _versions(kind: str) -> dict:
    versions = {"torch": str(torch.__version__), "python": platform.python_version()}
    if kind == "cuda":
        versions["cuda"] = torch.version.cuda
        versions["cudnn"] = str(torch.backends.cudnn.version())
    if kind == "npu":
        try:
            import torch_npu

            versions["torch_npu"] = getattr(torch_npu, "__version__", "unknown")
        except BaseException:  # noqa: BLE001
            pass
        versions["cann"] = _cann_version()
    return versions


def _device_name(kind: str, index: int) -> str:
    if kind == "cuda":
        return torch.cuda.get_device_name(index)
    if kind == "npu":
        try:
            return torch.npu.get_device_name(index)
        except BaseException:  # noqa: BLE001
            return "Ascend NPU"
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def select_device(requested: str = "auto", device_id: int | None = None) -> DeviceInfo:
    """Pick the device for this process and make it current.

    Args:
        requested: "auto" (NPU, else CUDA, else CPU), "npu", "gpu"/"cuda" or "cpu".
        device_id: index from --device_id; LOCAL_RANK and ASCEND_DEVICE_ID are used when it is None.
    """
    kind = _resolve_kind(requested)
    index = resolve_index(device_id) if kind != "cpu" else 0
    if kind != "cpu":
        available = device_count(kind)
        if index >= available:
            raise ConfigError(
                f"device index {index} asked for (LOCAL_RANK/--device_id/ASCEND_DEVICE_ID) but only "
                f"{available} {kind.upper()} device(s) are visible; lower RANK_SIZE or --device_id"
            )
        getattr(torch, kind).set_device(index)
    if kind == "cuda":
        # Fixed input sizes: let cuDNN pick the fastest algorithms once.
        torch.backends.cudnn.benchmark = True
    return DeviceInfo(
        kind=kind,
        index=index,
        name=_device_name(kind, index),
        backend=_BACKENDS[kind],
        versions=_versions(kind),
        torch_device="cpu" if kind == "cpu" else f"{kind}:{index}",
    )


_CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")  # the values torch accepts as deterministic


def make_deterministic(info: DeviceInfo) -> None:
    """Deterministic kernels, for exact resume and reproducibility checks (slower).

    Call before any CUDA work: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it creates its first handle
    (`common.cli.setup_runtime` calls this right after the process group starts, before any model exists;
    neither `select_device` nor NCCL's start-up runs a cuBLAS kernel).

    On an accelerator, an op without a deterministic kernel warns instead of stopping the run: on CUDA
    the backward of bilinear upsampling (every U-Net decoder here) and NLLLoss have none (see the list
    in `torch.use_deterministic_algorithms`), and neither have several NPU kernels.
    """
    workspace = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", _CUBLAS_DETERMINISTIC[0])
    if info.kind == "cuda" and workspace not in _CUBLAS_DETERMINISTIC:
        raise ConfigError(
            f"--deterministic on CUDA needs CUBLAS_WORKSPACE_CONFIG={' or '.join(_CUBLAS_DETERMINISTIC)}, "
            f"but the environment sets {workspace!r}; unset it or use one of those values"
        )
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.use_deterministic_algorithms(True, warn_only=info.is_accelerator)


def main(argv: list[str] | None = None) -> int:
    """`python -m common.device --count`: accelerators visible (0 on a CPU-only machine), for the scripts."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--count", action="store_true", help="print the number of NPUs, else CUDA GPUs")
    args = parser.parse_args(argv)
    if args.count:
        from common.device_count import count

        print(count())
    else:
        print(select_device("auto").describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
