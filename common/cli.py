"""Flags every entry point shares, and the runtime they configure (device, process group, precision).

Both spellings the ModelZoo uses are accepted (`--loss-scale` / `--loss_scale`, `--opt-level` /
`--apex_level` / `--opt_level`, ...). Flags the originals used to pick ranks by hand (`--world_size`,
`--rank_id`, `--dist-url`, ...) are accepted for compatibility; the launcher's environment decides.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from common.amp import OPT_LEVELS, MixedPrecision
from common.device import DEVICE_CHOICES, DeviceInfo, make_deterministic, select_device
from common.distributed import DistContext, init_distributed, modelzoo_env_to_torchrun
from common.errors import ConfigError, ModelZooError
from common.loader import seed_everything
from common.memory import parse_micro_batch
from common.winograd import ALGOS as CONV_ALGOS
from common.winograd import apply_conv_algo


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def amp_value(text: str) -> bool | str:
    """`--amp=auto`, or a switch spelled out (`--amp=on|off`)."""
    value = text.strip().lower()
    if value == "auto":
        return "auto"
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"takes no value, or auto, on or off; got {text!r}")


def micro_batch_arg(text: str) -> str | int:
    try:
        return parse_micro_batch(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("--micro_batch ", "")) from None


def add_common_args(parser: argparse.ArgumentParser, *, seed: int = 1, workers: int | None = None) -> None:
    """Device, precision, distribution, reproducibility and speed flags."""
    group = parser.add_argument_group("device and distribution (common)")
    group.add_argument("--device", default="auto", type=str.lower, choices=DEVICE_CHOICES)
    group.add_argument(
        "--device_id", "--device-id", "--npu_idx", "--cuda_idx", "--gpu", dest="device_id", type=int,
        default=None, help="device index for a 1p run (default: LOCAL_RANK, then ASCEND_DEVICE_ID, then 0)",
    )  # fmt: skip
    group.add_argument(
        "--workers",
        "--num_workers",
        "-j",
        dest="workers",
        type=non_negative_int,
        default=workers,
        help="loader processes per rank (default: from the cores per rank; see common.loader.auto_workers)",
    )
    group.add_argument(
        "--dist_timeout", type=positive_float, default=1800.0, help="seconds before a stuck collective fails"
    )
    for flags in (("--distributed",), ("--multiprocessing-distributed",)):
        group.add_argument(
            *flags, action="store_true", help="accepted for compatibility; the launcher decides"
        )
    for flags in (
        ("--world_size", "--world-size", "--num_gpus", "--device_num"),
        ("--rank", "--rank_id", "--dist_rank"),
    ):
        group.add_argument(*flags, dest=flags[0].lstrip("-").replace("-", "_"), type=int, default=None,
                           help="accepted for compatibility; RANK_SIZE / torchrun decide")  # fmt: skip
    group.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for flags in (
        ("--dist_backend", "--dist-backend"),
        ("--dist_url", "--dist-url"),
        ("--addr",),
        ("--port",),
    ):
        group.add_argument(
            *flags, dest=flags[0].lstrip("-").replace("-", "_"), default=None, help=argparse.SUPPRESS
        )

    group = parser.add_argument_group("mixed precision (common)")
    group.add_argument(
        "--amp", dest="amp", nargs="?", const=True, default=False, type=amp_value,
        help="mixed precision training; --amp=auto: the same on an accelerator, on the CPU bf16 only where "
        "the CPU has bf16 instructions and timing the model's first steps finds it faster (else fp32); "
        "evaluating or resuming a checkpoint uses what its run chose",
    )  # fmt: skip
    group.add_argument("--no-amp", "--no_amp", dest="amp", action="store_false", help="fp32 training")
    group.add_argument(
        "--use_apex", "--apex", dest="use_apex", nargs="?", const=1, default=0, type=int,
        help="mixed precision through apex.amp when it imports (implies --amp)",
    )  # fmt: skip
    group.add_argument(
        "--opt-level", "--opt_level", "--apex_level", "--apex-opt-level", "--apex_opt_level", dest="opt_level",
        default="O2", type=str.upper, choices=OPT_LEVELS, help="O0 = fp32; O1-O3 = mixed precision",
    )  # fmt: skip
    group.add_argument(
        "--loss-scale", "--loss_scale", "--loss_scale_value", "--loss-scale-value", dest="loss_scale",
        default="dynamic", help="'dynamic' or a static scale such as 128 (fp16 only)",
    )  # fmt: skip
    group.add_argument(
        "--amp-dtype", "--amp_dtype", dest="amp_dtype", default="auto", choices=("auto", "fp16", "bf16"),
        help="auto: bf16 without a loss scale where the device has bf16 in hardware (NVIDIA compute "
        "capability >= 8.0, Ascend 910B and later) and on the CPU, fp16 with a loss scale elsewhere",
    )  # fmt: skip
    group.add_argument(
        "--max_skipped_steps", type=positive_int, default=50,
        help="stop when this many steps in a row had non-finite gradients",
    )  # fmt: skip

    group = parser.add_argument_group("reproducibility and speed (common)")
    group.add_argument("--seed", type=int, default=seed)
    group.add_argument(
        "--deterministic", action="store_true", help="deterministic kernels (exact resume; slower)"
    )
    group.add_argument(
        "--channels_last", "--channels-last", dest="channels_last", action="store_const", const=True,
        default=None, help="channels-last memory format for model and inputs: NHWC (2-D), NDHWC (3-D). "
        "Default: on for 2-D networks on CUDA, off elsewhere",
    )  # fmt: skip
    group.add_argument(
        "--no-channels_last", "--no_channels_last", "--no-channels-last", dest="channels_last",
        action="store_const", const=False, help="contiguous (NCHW) memory format everywhere",
    )  # fmt: skip
    group.add_argument(
        "--compile", action="store_true", help="torch.compile the model (slow start, faster steps)"
    )
    group.add_argument(
        "--conv_algo", "--conv-algo", dest="conv_algo", default="direct", choices=CONV_ALGOS,
        help="3x3 convolutions on CPU: direct (oneDNN), winograd (F(4x4,3x3)), or auto: time both per "
        "layer shape at first use and keep the faster (a long CPU run's choice; not with --deterministic)",
    )  # fmt: skip
    group.add_argument("--log_interval", type=positive_int, default=10, help="steps between step log lines")
    group.add_argument("--warmup_steps", type=non_negative_int, default=5, help="steps excluded from FPS")

    group = parser.add_argument_group("memory (common)")
    group.add_argument(
        "--micro_batch", "--micro-batch", dest="micro_batch", type=micro_batch_arg, default="auto",
        help="auto: before the first step, measure a step at 1 and 2 samples, project the per-device batch and, "
        "if it does not fit the memory budget, accumulate gradients over the fewest micro-batches that fit "
        "(same global batch); off: stop instead, naming the largest per-device batch that fits; N: always "
        "split each batch into N micro-batches",
    )  # fmt: skip

    group = parser.add_argument_group("data (common)")
    group.add_argument(
        "--skip_bad_samples", action="store_true",
        help="leave out samples with an unreadable, missing or mis-sized image or mask and train on the rest "
        "(counted and listed; default: refuse the data, naming every bad file)",
    )  # fmt: skip


def add_schedule_args(
    parser: argparse.ArgumentParser, *, val_interval: int = 1, time_limit_basis: str = "wall"
) -> None:
    """When a run stops and how often it validates: one name per concept in every folder.

    The originals' spellings stay as aliases: --train_steps (UNet, MindSpore U-Net), --max_iters (ISIC),
    --max_time / --max_time_basis (V-Net), --val_step (ISIC), --eval_interval (MindSpore U-Net).
    """
    from common.clock import BASES

    group = parser.add_argument_group("schedule (common)")
    group.add_argument(
        "--max_steps", "--train_steps", "--max_iters", dest="max_steps", type=non_negative_int, default=0,
        help="stop after this many training steps in all (0: no cap); the last epoch may be partial",
    )  # fmt: skip
    group.add_argument(
        "--time_limit", "--max_time", dest="time_limit", type=non_negative_float, default=0.0,
        help="seconds of training (from the first step); each epoch runs only the steps that still fit, "
        "judged by the mean time per step so far (validation and checkpoints included). 0: no limit",
    )  # fmt: skip
    group.add_argument(
        "--time_limit_basis", "--max_time_basis", dest="time_limit_basis", choices=BASES,
        default=time_limit_basis,
        help="wall-clock seconds, or CPU seconds per torch thread (a budget on a shared machine)",
    )  # fmt: skip
    group.add_argument(
        "--val_interval", "--val_step", "--eval_interval", dest="val_interval", type=positive_int,
        default=val_interval, help="validate every N epochs (and after the last one)",
    )  # fmt: skip
    group.add_argument(
        "--precise_bn", choices=("auto", "on", "off", "compare"), default="auto",
        help="recompute BatchNorm's running statistics over training batches (evaluation transform) before "
        "each validation, so validation, checkpoints and export use statistics of the final weights; auto: on "
        "below a per-device batch of 8; compare: keep the running averages and score both (common/precise_bn.py)",
    )  # fmt: skip
    group.add_argument(
        "--precise_bn_batches", type=positive_int, default=200,
        help="at most this many batches per rank for --precise_bn",
    )  # fmt: skip


@dataclass(frozen=True)
class RunOptions:
    """How to run, whatever is trained: the common flags as one typed object.

    Built once at the entry point (`RunOptions.from_args`); `common/` reads these fields, never the flags.
    """

    device: str = "auto"
    device_id: int | None = None
    dist_timeout: float = 1800.0
    amp: bool | str = False  # True, False or "auto" (--amp=auto)
    use_apex: bool = False
    opt_level: str = "O2"
    loss_scale: str | float = "dynamic"
    amp_dtype: str = "auto"
    max_skipped_steps: int = 50
    seed: int = 0
    deterministic: bool = False
    channels_last: bool | None = None  # None: auto (common.trainer.memory_format_for), resolved by prepare
    compile: bool = False
    conv_algo: str = "direct"
    log_interval: int = 10
    warmup_steps: int = 5
    hf32: bool = False
    launcher_world_size: int | None = None  # --world_size as given (the launcher decides; a mismatch warns)
    micro_batch: str | int = "auto"  # "auto", "off" or a number of micro-batches (common.memory)

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, hf32: bool | None = None) -> RunOptions:
        """The common flags of `add_common_args`; `hf32` defaults to the scripts' ALLOW_HF32=1."""
        defaults = cls()
        values = {name: getattr(args, name, getattr(defaults, name)) for name in cls.__dataclass_fields__}
        values["use_apex"] = bool(getattr(args, "use_apex", 0))
        values["launcher_world_size"] = getattr(args, "world_size", None)
        values["hf32"] = os.environ.get("ALLOW_HF32") == "1" if hf32 is None else hf32
        values["micro_batch"] = parse_micro_batch(values["micro_batch"])
        return cls(**values)


@dataclass
class Runtime:
    """What the common flags configured for this process."""

    device: DeviceInfo
    dist: DistContext
    amp: MixedPrecision
    options: RunOptions
    flags: dict  # every flag of the entry point as given, for config.json only

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def print(self, *values: Any) -> None:
        self.dist.print(*values)


def setup_runtime(options: RunOptions | argparse.Namespace) -> Runtime:
    """Device first (HCCL/NCCL bind to the current device), then the process group, seeds and precision.

    Entry points pass their parsed flags (turned into `RunOptions` here, at the boundary) or the options.
    """
    flags = {} if isinstance(options, RunOptions) else dict(vars(options))
    if not isinstance(options, RunOptions):
        options = RunOptions.from_args(options)
    if options.deterministic and options.conv_algo == "auto":
        raise ConfigError(
            "--conv_algo auto chooses by timing, so two runs may choose differently; with --deterministic "
            "use --conv_algo direct or winograd"
        )
    modelzoo_env_to_torchrun()
    device = select_device(options.device, options.device_id)
    ctx = init_distributed(device, timeout_s=options.dist_timeout)
    if options.launcher_world_size not in (None, ctx.world_size) and ctx.world_size > 1:
        warnings.warn(
            f"--world_size {options.launcher_world_size} ignored: the launcher started {ctx.world_size} ranks",
            stacklevel=2,
        )
    if options.deterministic:
        make_deterministic(device)
    if options.hf32 and device.kind == "npu":
        torch.npu.conv.allow_hf32 = True
        torch.npu.matmul.allow_hf32 = True
    seed_everything(options.seed)
    amp = MixedPrecision(
        device,
        enabled=True if options.use_apex else options.amp,
        opt_level=options.opt_level,
        loss_scale=options.loss_scale,
        dtype=options.amp_dtype,
        prefer_apex=options.use_apex,
        max_consecutive_skips=options.max_skipped_steps,
        deterministic=options.deterministic,
    )
    return Runtime(device=device, dist=ctx, amp=amp, options=options, flags=flags)


def apply_conv_flag(runtime: Runtime, model: torch.nn.Module) -> torch.nn.Module:
    """Apply `--conv_algo` to the model's 3x3 convolutions (before DDP or compile wrap it) and say so."""
    algo = runtime.options.conv_algo
    if algo == "direct":
        return model
    if runtime.device.kind != "cpu":
        runtime.print(
            f"Convolutions: --conv_algo {algo} is for CPU runs; {runtime.device.kind} keeps its vendor "
            "library's choice (which already includes Winograd kernels)"
        )
        return model
    count = apply_conv_algo(model, algo)
    if count == 0:
        runtime.print(f"Convolutions: --conv_algo {algo} finds no 2-D 3x3 convolution here; all run direct")
        return model
    note = "; autocast regions run them direct" if runtime.amp.enabled else ""
    runtime.print(f"Convolutions: {algo} for {count} 3x3 convolutions (Winograd F(4x4,3x3) on CPU){note}")
    return model


def describe_config(runtime: Runtime, extra: dict | None = None) -> dict:
    """The effective configuration, printed at start and saved beside the checkpoints."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(runtime.flags.items())}
    config.update(
        device=runtime.device.as_dict(),
        world_size=runtime.dist.world_size,
        precision=runtime.amp.describe(),
        command=" ".join(sys.argv),
    )
    if extra:
        config.update(extra)
    return config


def print_config(runtime: Runtime, config: dict, path: str | Path | None = None) -> None:
    """Print the configuration on rank 0 and write it as JSON (atomically) when a path is given."""
    if not runtime.is_main:
        return
    print(
        f"Device: {runtime.device.describe()} | ranks: {runtime.dist.world_size} | {runtime.amp.describe()}"
    )
    print("Configuration: " + json.dumps(config, default=str, sort_keys=True), flush=True)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(config, default=str, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def check_choice(name: str, value: str, valid: list[str] | tuple[str, ...]) -> str:
    if value not in valid:
        raise ConfigError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
    return value


USER_ERROR_STATUS = 2  # argparse's status for bad flags; every entry point uses it for every user error


def status_of(task: Callable[[], object]) -> int:
    """Run `task` for a main() that returns a status: 0, or USER_ERROR_STATUS after one `[Error] ...` line
    for a ModelZooError (a user's mistake). Anything else is a bug and propagates with its traceback."""
    try:
        task()
    except ModelZooError as exc:
        print(f"[Error] {exc}", file=sys.stderr, flush=True)
        return USER_ERROR_STATUS
    return 0


def run_main(main: Callable[[], int | None]) -> None:
    """Run an entry point; a ModelZooError becomes one clear `[Error] ...` line and exit status 2.

    Bad data, bad flags and unusable checkpoints are the user's to fix, so they get the message without
    a traceback; anything else is a bug and keeps its traceback.
    """
    try:
        code = main()
    except ModelZooError as exc:
        print(f"[Error] {exc}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_STATUS) from None
    raise SystemExit(code or 0)
