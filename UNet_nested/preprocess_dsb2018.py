"""Turn Kaggle DSB 2018 `stage1_train` into the reference's `dsb2018_96` layout (one binary mask per image).

    python preprocess_dsb2018.py [--data_path inputs/data-science-bowl-2018] [--output inputs/dsb2018_96]
                                 [--input_w 96 --input_h 96] [--skip_bad_samples]

Reads `stage1_train/<id>/images/<id>.png` (RGBA; the alpha channel is dropped) and the instance masks
`stage1_train/<id>/masks/*.png`, takes their union, resizes both to the training size and writes

    <output>/images/<id>.png      RGB, input_h x input_w
    <output>/masks/0/<id>.png     0/255, input_h x input_w

Differences from 4uiiurz1/pytorch-nested-unet's script (references.md 3.4): the mask stays binary (a pixel
is foreground when at least half of it was; the reference resized the 0/1 mask bilinearly and kept the
soft edges), images are resized with an antialiasing filter, folders are processed in sorted order and
written atomically, and a folder without an image or without masks, or with an unreadable or mis-sized
file, is named in one error with every other such folder (the reference crashed on the first). With
`--skip_bad_samples` those folders are left out instead, counted on the console and listed in
`<output>/skipped_samples.txt` and the manifest. The manifest (`.prepared.json`) records the source
files' sizes and times: an unchanged source is not processed again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import repo_path  # noqa: F401  (puts the monorepo root on sys.path)
from dataset import resize_image, resize_mask

from common.cli import positive_int, run_main
from common.datacheck import (
    SKIP_FLAG,
    SKIP_HINT,
    SKIPPED_LIST,
    BadSample,
    format_problems,
    skipped_count,
    write_skipped_list,
)
from common.errors import ConfigError, DataError
from common.filelock import file_lock
from common.imageio import read_image, read_mask, write_png

MANIFEST = ".prepared.json"
PREPARE_VERSION = 1
STAGE1 = "stage1_train"
KAGGLE_FOLDER = "data-science-bowl-2018"
STAGE1_TREE = """\
<data_path>/stage1_train/<id>/images/<id>.png     one RGBA image per folder
<data_path>/stage1_train/<id>/masks/<mask>.png    one 0/255 PNG per nucleus"""


@dataclass
class Sample:
    id: str
    image: Path
    masks: list[Path]


@dataclass
class PrepareReport:
    output: Path
    written: list[str] = field(default_factory=list)
    skipped: list[BadSample] = field(default_factory=list)  # left out under skip_bad
    reused: bool = False

    def describe(self) -> str:
        what = "reused" if self.reused else "wrote"
        text = f"{what} {len(self.written)} image/mask pairs in {self.output}"
        if self.skipped:
            text += (
                f"; {SKIP_FLAG}: skipped {skipped_count(self.skipped)} folder(s), listed in "
                f"{self.output / SKIPPED_LIST}:\n"
                + format_problems([(b.path, b.problem) for b in self.skipped])
            )
        return text


def locate_stage1(data_path: str | Path) -> Path | None:
    """The `stage1_train` folder under `data_path` (also `data-science-bowl-2018/stage1_train`), or
    `data_path` itself when it holds `<id>/images/` folders; None when there is none."""
    root = Path(data_path)
    for candidate in (root / STAGE1, root / KAGGLE_FOLDER / STAGE1):
        if candidate.is_dir():
            return candidate
    if root.is_dir() and any((entry / "images").is_dir() for entry in root.iterdir() if entry.is_dir()):
        return root
    return None


def _pngs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() == ".png"
    )


def find_samples(stage1: str | Path) -> tuple[list[Sample], list[BadSample]]:
    """Complete sample folders (sorted by id) and the others (no image, no masks) as bad samples."""
    stage1 = Path(stage1)
    if not stage1.is_dir():
        raise DataError(stage1, f"folder not found; expected the Kaggle layout:\n{STAGE1_TREE}")
    samples: list[Sample] = []
    problems: list[BadSample] = []
    for folder in sorted(p for p in stage1.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = _pngs(folder / "images")
        own = [p for p in images if p.stem == folder.name]
        masks = _pngs(folder / "masks")
        if not images:
            problems.append(BadSample(folder.name, str(folder), "no image (expected images/<id>.png)"))
        elif len(images) > 1 and not own:
            problems.append(
                BadSample(folder.name, str(folder), f"{len(images)} images and none named {folder.name}.png")
            )
        elif not masks:
            problems.append(BadSample(folder.name, str(folder), "no masks (expected masks/*.png)"))
        else:
            samples.append(Sample(folder.name, own[0] if own else images[0], masks))
    return samples, problems


def merge_masks(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image uint8 (H, W, 3), union of the instance masks bool (H, W)) at the native size."""
    image = read_image(sample.image, "RGB")
    union = np.zeros(image.shape[:2], dtype=bool)
    for path in sample.masks:
        mask = read_mask(path)
        if mask.shape != union.shape:
            raise DataError(path, f"mask size {mask.shape} differs from the image's {union.shape}")
        union |= mask
    return image, union


def _fingerprint(samples: list[Sample], height: int, width: int) -> str:
    digest = hashlib.sha256(json.dumps({"version": PREPARE_VERSION, "size": [height, width]}).encode())
    for sample in samples:
        for path in (sample.image, *sample.masks):
            st = path.stat()
            digest.update(
                f"\x00{sample.id}/{path.parent.name}/{path.name}\x00{st.st_size}\x00{st.st_mtime_ns}".encode()
            )
    return digest.hexdigest()


def _read_manifest(output: Path) -> dict | None:
    try:
        manifest = json.loads((output / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def prepared_skips(output: str | Path) -> list[tuple[str, str]]:
    """(path, problem) of the source folders left out when `output` was prepared; [] without a manifest."""
    manifest = _read_manifest(Path(output))
    skipped = manifest.get("skipped") if manifest else None
    return [(str(s[0]), str(s[1])) for s in skipped if len(s) == 2] if isinstance(skipped, list) else []


def _sample_id(stage1: Path, path: str) -> str:
    """The sample folder a listed file or folder belongs to (its first part below `stage1`)."""
    try:
        return Path(path).relative_to(stage1).parts[0]
    except (ValueError, IndexError):
        return Path(path).name


def refuse_bad_folders(stage1: Path, bad: list[BadSample], total: int) -> DataError:
    """The error for sample folders that cannot be used: every file named (capped), with the count."""
    return DataError(
        stage1,
        f"{skipped_count(bad)} of {total} sample folder(s) cannot be used ({len(bad)} problem(s)):\n"
        + format_problems([(b.path, b.problem) for b in bad])
        + f"\n{SKIP_HINT}",
    )


def preprocess(
    stage1: str | Path,
    output: str | Path,
    height: int = 96,
    width: int = 96,
    workers: int | None = None,
    log: Callable[[str], None] = print,
    *,
    skip_bad: bool = False,
) -> PrepareReport:
    """Write the prepared layout of `stage1` into `output` (replaced atomically).

    A folder without an image or masks, or with an unreadable or mis-sized file, is a bad sample: one
    DataError names them all, or with `skip_bad` they are left out, listed in `<output>/skipped_samples.txt`
    and returned in the report's `skipped`. Reuses `output` when its manifest matches the source files
    and the size (a reused preparation that left folders out is refused without `skip_bad` too). Safe to
    call from several processes at once (one works under a file lock, the others then reuse its result).
    """
    if height < 1 or width < 1:
        raise ConfigError(f"the output size must be positive, got {height}x{width}")
    stage1, output = Path(stage1), Path(output)
    samples, problems = find_samples(stage1)
    if not samples:
        listed = [(b.path, b.problem) for b in problems] or [(str(stage1), "empty")]
        raise DataError(stage1, "no usable sample folder:\n" + format_problems(listed))
    total = len(samples) + len(problems)
    fingerprint = _fingerprint(samples, height, width)
    output.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(output.parent / f".{output.name}.lock"):
        manifest = _read_manifest(output)
        if manifest is not None and manifest.get("fingerprint") == fingerprint:
            skipped = [
                BadSample(_sample_id(stage1, str(p)), str(p), str(why)) for p, why in manifest["skipped"]
            ]
            if skipped and not skip_bad:
                raise refuse_bad_folders(stage1, skipped, total)
            return PrepareReport(output, list(manifest["ids"]), skipped, reused=True)
        if output.exists() and manifest is None and any(output.iterdir()):
            raise ConfigError(
                f"{output} exists and was not written by preprocess_dsb2018.py (no {MANIFEST}); "
                "remove it or choose another --output / --prepared_dir"
            )
        log(f"Preparing {len(samples)} DSB 2018 samples from {stage1} at {height}x{width} into {output}")
        tmp = output.parent / f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        (tmp / "images").mkdir(parents=True)
        (tmp / "masks" / "0").mkdir(parents=True)

        def work(sample: Sample) -> BadSample | None:
            try:
                image, union = merge_masks(sample)
            except DataError as exc:
                return BadSample(sample.id, str(exc.path or sample.image), exc.problem)
            write_png(tmp / "images" / f"{sample.id}.png", resize_image(image, height, width))
            write_png(tmp / "masks" / "0" / f"{sample.id}.png", resize_mask(union, height, width))
            return None

        try:
            with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
                results = list(pool.map(work, samples))
            written = [s.id for s, r in zip(samples, results) if r is None]
            skipped = problems + [r for r in results if r is not None]
            if not written:
                listed = [(b.path, b.problem) for b in skipped]
                raise DataError(stage1, "no folder could be prepared:\n" + format_problems(listed))
            if skipped and not skip_bad:
                raise refuse_bad_folders(stage1, skipped, total)
            if skipped:
                write_skipped_list(tmp, skipped)
            manifest = {
                "version": PREPARE_VERSION,
                "fingerprint": fingerprint,
                "source": str(stage1.resolve()),
                "size": [height, width],
                "ids": written,
                "skipped": [[b.path, b.problem] for b in skipped],
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            if output.exists():
                shutil.rmtree(output)
            os.replace(tmp, output)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    report = PrepareReport(output, written, skipped)
    log(report.describe())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data_path", default=f"inputs/{KAGGLE_FOLDER}", help="folder holding stage1_train (or stage1_train)"
    )
    parser.add_argument("--output", default=None, help="default: inputs/dsb2018_<input_w> (the reference's)")
    parser.add_argument("--input_w", "--size", dest="input_w", type=positive_int, default=96)
    parser.add_argument("--input_h", type=positive_int, default=None, help="default: input_w")
    parser.add_argument(
        "--workers", type=positive_int, default=None, help="decoding threads (default: min(8, cores))"
    )
    parser.add_argument(
        SKIP_FLAG, dest="skip_bad_samples", action="store_true",
        help="leave out folders without an image or masks, or with an unreadable or mis-sized file "
        "(listed in <output>/skipped_samples.txt; default: refuse, naming every such file)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    height = args.input_h or args.input_w
    data_path = Path(args.data_path)
    if not data_path.exists():
        raise DataError(data_path, f"--data_path does not exist; expected:\n{STAGE1_TREE}")
    if not data_path.is_dir():
        raise DataError(data_path, f"--data_path is a file, not a folder; expected:\n{STAGE1_TREE}")
    stage1 = locate_stage1(data_path)
    if stage1 is None:
        raise DataError(data_path, f"no stage1_train folder found; expected:\n{STAGE1_TREE}")
    tag = str(args.input_w) if height == args.input_w else f"{args.input_w}x{height}"
    output = Path(args.output or f"inputs/dsb2018_{tag}")
    report = preprocess(
        stage1, output, height, args.input_w, workers=args.workers, skip_bad=args.skip_bad_samples
    )
    if report.reused:
        print(report.describe())
    return 0


if __name__ == "__main__":
    run_main(main)
