"""Checkpoints that survive crashes and cannot run code.

* `save_checkpoint` writes a temporary file in the target folder, fsyncs it and renames it over the old
  file: a process killed mid-write, or a full disk, leaves the previous checkpoint intact.
* `load_checkpoint` reads with `weights_only=True`: tensors and plain containers only, so a file carrying a
  pickled payload is refused before anything in it executes.
* `load_weights` accepts the originals' files (raw state_dicts, `{'state_dict': ...}`, `module.` prefixes
  from DDP/DataParallel) and names every missing, unexpected or mis-shaped key when they do not fit.
* `rng_state` / `set_rng_state` capture python, numpy, torch and device generators as plain data.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import secrets
import shutil
import tempfile
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from common.errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "network")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` atomically; on failure the previous file at `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(dict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from exc
        raise
    _fsync_dir(path.parent)
    return path


def _write_error(path: Path, exc: OSError) -> CheckpointError:
    reason = "no space left on device" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
    kept = f"the previous checkpoint {path} is intact" if path.exists() else "no earlier checkpoint exists"
    return CheckpointError(f"could not write checkpoint {path}: {reason}; {kept}")


def link_checkpoint(source: str | Path, path: str | Path) -> Path:
    """Make `path` hold the checkpoint `source` holds, atomically, without writing it again.

    A hard link when the filesystem allows one: checkpoints are never changed in place (every save writes
    a new file and renames it over the old name), so the next save of `source` leaves `path` holding
    this version. That halves the checkpoint I/O of an epoch that is also the new best. Elsewhere
    (no hard links, another filesystem) the bytes are copied, still through a temporary file.
    """
    source, path = Path(source), Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        try:
            os.link(source, tmp)
        except OSError:
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 * 2**20)
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, exc) from exc
    _fsync_dir(path.parent)
    return path


def remove_interrupted_writes(folder: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files that a run killed mid-write left in `folder` (they are never read).

    `save_checkpoint` and `link_checkpoint` write `.<name>.<random>.tmp` and rename it over `<name>`, so
    the checkpoint itself is intact. `names` are the checkpoint names (globs allowed) to look for.
    """
    removed = []
    for name in names:
        for leftover in sorted(Path(folder).glob(f".{name}.*.tmp")):
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def _damaged_member(path: Path) -> str | None:
    """For torch's zip format: the first member whose CRC-32 does not match, or None (also for the legacy
    non-zip format, which torch.load checks itself)."""
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
        return f"damaged archive: {exc}"
    return f"member {bad} fails its CRC check" if bad else None


_BOILERPLATE = (
    "Weights only load failed",
    "Please file an issue",
    "Check the documentation",
    "(1) ",
    "(2) ",
)


def _unpickler_reason(exc: BaseException) -> str:
    """The unpickler's own complaint inside torch's long weights-only message."""
    for line in str(exc).splitlines():
        line = line.replace("WeightsUnpickler error:", "").strip()
        if line and not line.startswith(_BOILERPLATE):
            return line[:200]
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> Any:
    """Read a checkpoint with `weights_only=True`; every failure is a CheckpointError naming the file.

    `mmap`: map the tensors instead of reading them (a start-up check of a large checkpoint); files in the
    legacy (non-zip) format cannot be mapped and are read.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    damaged = _damaged_member(path)
    if damaged:
        # Checked first: garbled bytes would otherwise load as wrong weights, or fail in the unpickler and
        # read as a hostile file.
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({damaged})")
    try:
        if mmap and zipfile.is_zipfile(path):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickler_reason(exc)
        if reason.startswith("Unsupported operand"):  # bytes that are no pickle at all, not code
            raise CheckpointError(f"checkpoint {path} is corrupted or not a checkpoint ({reason})") from exc
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled Python objects beyond tensors and plain containers, "
            f"which could run code when loaded ({reason}). Only load files you "
            "trust; re-save a trusted file's state_dict with torch.save(model.state_dict(), ...)"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - garbage bytes fail anywhere in the unpickler (KeyError, ...)
        reason = str(exc)[:200] or type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({reason})") from exc


def strip_module_prefix(state_dict: Mapping[str, Any]) -> OrderedDict:
    """Remove DDP/DataParallel's `module.` prefix (and torch.compile's `_orig_mod.`) from every key."""
    out = OrderedDict()
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def add_module_prefix(state_dict: Mapping[str, Any]) -> OrderedDict:
    """Keys as a DDP-wrapped model names them, for tools that expect the originals' 8p checkpoints."""
    return OrderedDict((k if k.startswith("module.") else f"module.{k}", v) for k, v in state_dict.items())


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare network inside DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def extract_state_dict(obj: Any, source: str = "checkpoint") -> OrderedDict:
    """The model weights inside a checkpoint of this zoo or of the original implementations."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                return strip_module_prefix(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return strip_module_prefix(obj)
    raise CheckpointError(
        f"{source} holds no model weights (expected a state_dict or a dict with 'state_dict')"
    )


def _list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", and {len(names) - limit} more" if len(names) > limit else "")


def load_weights(
    model: torch.nn.Module,
    source: str | Path | Mapping[str, Any],
    strict: bool = True,
    name: str | None = None,
) -> tuple[list[str], list[str]]:
    """Load weights from a path or a dict into `model` (wrappers and prefixes handled).

    Returns (missing, unexpected) keys when strict=False; with strict=True a mismatch raises a
    CheckpointError naming the missing, unexpected and mis-shaped keys. `name` (the file a dict was
    read from) goes into the messages; a path names itself.
    """
    name = str(source) if isinstance(source, (str, Path)) else (name or "checkpoint")
    obj = load_checkpoint(source) if isinstance(source, (str, Path)) else source
    state = extract_state_dict(obj, name)
    target = unwrap_model(model)
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if mismatched or (strict and (missing or unexpected)):
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys ({_list(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_list(unexpected)})")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches ({_list(mismatched, 4)})")
        raise CheckpointError(
            f"{name} does not fit {type(target).__name__}: "
            + "; ".join(problems)
            + ". Is it a checkpoint of "
            "another model, or of another --img_ch/--output_ch/--num_classes setting?" + _written_by(obj)
        )
    target.load_state_dict(state, strict=strict)
    return missing, unexpected


def _written_by(obj: Any) -> str:
    """What a training checkpoint says of the run that wrote it (its command, else its arch), for errors."""
    if not isinstance(obj, Mapping):
        return ""
    config = obj.get("config")
    command = config.get("command") if isinstance(config, Mapping) else None
    if isinstance(command, str) and command:
        return f" It was written by `{command}`: load it with the same model flags."
    arch = obj.get("arch")
    return f" It holds a {arch}." if isinstance(arch, str) and arch else ""


def _device_rng_module(kind: str):
    """torch.cuda / torch.npu when that device is usable in this process, else None."""
    if kind == "cuda":
        return torch.cuda if torch.cuda.is_available() else None
    module = getattr(torch, "npu", None)
    try:
        return module if module is not None and module.is_available() else None
    except BaseException:  # noqa: BLE001 - a broken torch_npu raises anything
        return None


def rng_state() -> dict:
    """Every random generator a training step touches, as tensors and plain Python data.

    Of the accelerator generators only the current device's is kept (`cuda` / `npu`: one uint8 tensor):
    a process drives one device, and the other devices' generators belong to other ranks.
    """
    version, mt_state, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(mt_state), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    for kind in ("cuda", "npu"):
        module = _device_rng_module(kind)
        if module is None:
            continue
        try:
            state[kind] = module.get_rng_state(module.current_device()).cpu()
        except BaseException:  # noqa: BLE001 - no generator is no reason to lose the checkpoint
            pass
    return state


def _device_state_for(saved: Any, index: int) -> torch.Tensor | None:
    """The generator state to restore into device `index` from a `cuda`/`npu` entry.

    The entry is one tensor (the saving process's current device). Checkpoints written before held a
    list with every visible device's state; there the entry of `index` is taken when it exists.
    """
    if isinstance(saved, torch.Tensor):
        return saved
    if isinstance(saved, (list, tuple)) and 0 <= index < len(saved):
        return saved[index]
    return None


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` captured; the device generator goes into this process's current device.

    A checkpoint is written by rank 0, so every rank restores rank 0's device generator into its own
    device. That is what each rank held when the checkpoint was written: every rank seeds its generator
    with the same value (`common.loader.seed_everything`, torch.manual_seed seeds every device) and draws
    the same number of values per step (same model, same batch shape), so the device streams of all ranks
    are equal. A checkpoint from a machine with more (or fewer) visible devices restores too: only the
    current device is touched.
    """
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    for kind in ("cuda", "npu"):
        module = _device_rng_module(kind) if kind in state else None
        if module is None:
            continue
        index = module.current_device()
        saved = _device_state_for(state[kind], index)
        if saved is not None:
            module.set_rng_state(saved.cpu(), index)
