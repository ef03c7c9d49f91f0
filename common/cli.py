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


def add_common_args(parser: argparse.ArgumentParser, *, seed: int = 1, workers: int = 4) -> None:
    """Device, precision, distribution, reproducibility and speed flags."""
    group = parser.add_argument_group("device and distribution (common)")
    group.add_argument("--device", default="auto", type=str.lower, choices=DEVICE_CHOICES)
    group.add_argument(
        "--device_id", "--device-id", "--npu_idx", "--cuda_idx", "--gpu", dest="device_id", type=int,
        default=None, help="device index for a 1p run (default: LOCAL_RANK, then ASCEND_DEVICE_ID, then 0)",
    )  # fmt: skip
    group.add_argument(
        "--workers", "--num_workers", "-j", dest="workers", type=non_negative_int, default=workers
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
        "--amp", dest="amp", action="store_true", default=False, help="mixed precision training"
    )
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
        "--amp-dtype", "--amp_dtype", dest="amp_dtype", default="auto", choices=("auto", "fp16", "bf16")
    )
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
        "--channels_last", "--channels-last", action="store_true", help="NHWC memory format (2-D)"
    )
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


@dataclass
class Runtime:
    """What the common flags configured for this process."""

    device: DeviceInfo
    dist: DistContext
    amp: MixedPrecision
    args: argparse.Namespace

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def print(self, *values: Any) -> None:
        self.dist.print(*values)


def setup_runtime(args: argparse.Namespace) -> Runtime:
    """Device first (HCCL/NCCL bind to the current device), then the process group, seeds and precision."""
    if args.deterministic and getattr(args, "conv_algo", "direct") == "auto":
        raise ConfigError(
            "--conv_algo auto chooses by timing, so two runs may choose differently; with --deterministic "
            "use --conv_algo direct or winograd"
        )
    modelzoo_env_to_torchrun()
    device = select_device(args.device, args.device_id)
    ctx = init_distributed(device, timeout_s=args.dist_timeout)
    if args.world_size not in (None, ctx.world_size) and ctx.world_size > 1:
        warnings.warn(
            f"--world_size {args.world_size} ignored: the launcher started {ctx.world_size} ranks",
            stacklevel=2,
        )
    if args.deterministic:
        make_deterministic(device)
    if os.environ.get("ALLOW_HF32") == "1" and device.kind == "npu":
        torch.npu.conv.allow_hf32 = True
        torch.npu.matmul.allow_hf32 = True
    seed_everything(args.seed)
    amp = MixedPrecision(
        device,
        enabled=bool(args.amp or args.use_apex),
        opt_level=args.opt_level,
        loss_scale=args.loss_scale,
        dtype=args.amp_dtype,
        prefer_apex=bool(args.use_apex),
        max_consecutive_skips=args.max_skipped_steps,
    )
    return Runtime(device=device, dist=ctx, amp=amp, args=args)


def apply_conv_flag(runtime: Runtime, model: torch.nn.Module) -> torch.nn.Module:
    """Apply `--conv_algo` to the model's 3x3 convolutions (before DDP or compile wrap it) and say so."""
    algo = getattr(runtime.args, "conv_algo", "direct")
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
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(runtime.args).items())}
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


def status_of(task: Callable[[], object]) -> int:
    """Run `task` for a main() that returns a status: 0, or 1 after one `[Error] ...` line for a
    ModelZooError (a user's mistake). Anything else is a bug and propagates with its traceback."""
    try:
        task()
    except ModelZooError as exc:
        print(f"[Error] {exc}", file=sys.stderr, flush=True)
        return 1
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
        raise SystemExit(2) from None
    raise SystemExit(code or 0)
