"""Normalise LUNA16 for V-Net: isotropic spacing, fixed size, clipped and scaled Hounsfield units.

    python3 normalize_dataset.py root_path [vox_spacing Z_MAX Y_MAX X_MAX] [--workers N] [--dry-run] [--no_cache]

As the ModelZoo's script, it reads `root_path/lung_ct_image/<uid>.mhd` (CT in HU, MetaImage with .raw or
.zraw; .nii/.nii.gz/.nrrd also work) and `root_path/seg-lungs-LUNA16/<uid>.mhd` (labels 3 = left lung,
4 = right lung, 5 = trachea and main bronchi) and writes `normalized_lung_ct/<uid>.mhd` (float32) and
`normalized_lung_mask/<uid>.mhd` (uint8 0/1, compressed) plus `normalization.json`, written last, which
records the settings and the cases (a tree without it is incomplete; `train.py` reuses a complete one).
Defaults: 2.5 mm voxels and 128 x 160 x 160 (Z, Y, X), the ModelZoo README's command.

Per case:
1. check: the CT has a mask, both read, they share a grid (size, spacing, origin, direction), no NaN/inf;
2. resample onto an isotropic grid of the requested size centred on the scan (one SimpleITK resampling:
   trilinear for the CT, padding with -1000 HU; nearest neighbour for the labels), so the written
   origin is the true position of the cropped/padded box (the reference kept the old origin);
3. CT: clip to [-1000, 400] HU and scale with the LUNA16 mean/std (see intensity.py);
4. mask: lung = labels 3 and 4 (`--lung_labels`); the trachea (5) is background unless listed, as the
   LUNA16 lung masks were meant for lung parenchyma; `--lung_labels 3,4,5` includes the airways.
The report lists, per case, how much lung the crop cut off (raise the size if it is more than a few %).

Cases run in parallel worker processes (`--workers`, default min(8, CPUs)); each receives all it needs
as arguments, so any multiprocessing start method works (the reference relied on fork and globals).
Then every normalised case is read back, checked and written as the memory-mapped `.npy` files training
reads (`cache_volumes`; `--no_cache` leaves that to the first training run).
Every problem is collected and reported at the end in one error naming each file; `--dry-run` performs
the checks and the crop report without writing anything.
"""

from __future__ import annotations

import repo_path  # noqa: F401  # isort: skip  (puts the monorepo root on sys.path)

import argparse
import hashlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from geometry import centered_grid, grid_of, resample_array
from intensity import HU_WINDOW, LUNA_LUNG_LABELS, LUNA_MEAN, LUNA_STD, LabelMap, normalize_ct

from common.cli import run_main
from common.datacheck import format_problems, pair_by_stem, require_dir
from common.errors import ConfigError, DataError, ModelZooError
from common.filelock import file_lock
from common.imageio import check_finite, read_volume, same_geometry, volume_ext, write_volume

CT_DIR = "lung_ct_image"
MASK_DIR = "seg-lungs-LUNA16"
OUT_CT_DIR = "normalized_lung_ct"
OUT_MASK_DIR = "normalized_lung_mask"
MARKER = "normalization.json"
FORMAT_VERSION = 1
DEFAULT_SPACING = 2.5
DEFAULT_SIZE = (128, 160, 160)
LOST_LUNG_WARNING = 0.02  # warn when the crop cuts more than this fraction of the lung

EXPECTED_TREE = f"""\
<root_path>/
  {CT_DIR}/<seriesuid>.mhd (+ .raw or .zraw)     CT in Hounsfield units
  {MASK_DIR}/<seriesuid>.mhd (+ .zraw)          labels 3/4 = left/right lung, 5 = trachea
"""


@dataclass(frozen=True)
class Settings:
    """What the normalised tree depends on; recorded in normalization.json and compared on reuse."""

    vox_spacing: float = DEFAULT_SPACING
    size: tuple[int, int, int] = DEFAULT_SIZE
    lung_labels: str = LUNA_LUNG_LABELS

    def __post_init__(self) -> None:
        if not (isinstance(self.vox_spacing, (int, float)) and self.vox_spacing > 0):
            raise ConfigError(f"vox_spacing must be a positive number of mm, got {self.vox_spacing!r}")
        if len(self.size) != 3 or any(int(s) < 16 or int(s) % 16 for s in self.size):
            raise ConfigError(
                f"Z_MAX Y_MAX X_MAX must be multiples of 16 (V-Net halves each axis four times), got "
                f"{' '.join(str(s) for s in self.size)}"
            )
        LabelMap.parse(self.lung_labels)

    def as_dict(self) -> dict:
        return {
            "vox_spacing": float(self.vox_spacing),
            "size": [int(s) for s in self.size],
            "lung_labels": LabelMap.parse(self.lung_labels).spec,
            "hu_window": list(HU_WINDOW),
            "mean": LUNA_MEAN,
            "std": LUNA_STD,
            "version": FORMAT_VERSION,
        }


@dataclass
class CaseReport:
    id: str
    shape: list[int]
    spacing: list[float]
    labels: list[int]
    lung_ml: float
    lung_kept: float  # fraction of the lung volume inside the output box
    warnings: list[str] = field(default_factory=list)


def volume_files(folder: Path) -> list[Path]:
    """Volume headers/files in `folder` (not .raw/.zraw data files, not hidden files such as ._x.mhd)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and volume_ext(p) is not None
    )


def list_cases(root: str | Path) -> list[tuple[str, Path, Path]]:
    """[(seriesuid, ct, mask)] of a LUNA16 tree; one DataError lists every CT without a mask and the like."""
    root = Path(root)
    ct_dir = require_dir(root / CT_DIR, "LUNA16 CT", EXPECTED_TREE)
    mask_dir = require_dir(root / MASK_DIR, "LUNA16 lung mask", EXPECTED_TREE)
    cts, masks = volume_files(ct_dir), volume_files(mask_dir)
    if not cts:
        raise DataError(
            ct_dir, f"no CT volumes (.mhd, .nii.gz, ...) found.\nExpected layout:\n{EXPECTED_TREE}"
        )
    try:
        return pair_by_stem(cts, masks)
    except DataError as exc:
        raise DataError(
            exc.path,
            exc.problem.replace("image has no mask", "CT has no lung mask in " + MASK_DIR)
            .replace("mask has no image", "mask has no CT in " + CT_DIR)
            .replace("images with", "CT volumes with"),
        ) from None


def _integer_labels(mask: np.ndarray, path: Path) -> np.ndarray:
    if mask.dtype.kind == "f":
        check_finite(mask, path)
        if not np.array_equal(mask, np.round(mask)):
            raise DataError(path, "mask holds non-integer values; expected integer labels (3, 4, 5)")
        mask = mask.astype(np.int32)
    return mask


def process_case(
    case_id: str,
    ct_path: str | Path,
    mask_path: str | Path,
    settings: Settings,
    out_dir: str | Path | None = None,
) -> CaseReport:
    """Check one CT/mask pair and, with `out_dir`, write its normalised CT and mask there."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # one case per process; cases run in parallel
    ct_path, mask_path = Path(ct_path), Path(mask_path)
    ct = read_volume(ct_path)
    mask = read_volume(mask_path)
    diff = same_geometry(ct, mask, tol=1e-3)
    if diff:
        raise DataError(mask_path, f"mask geometry differs from its CT {ct_path.name}: {diff}")
    check_finite(ct.array, ct_path)
    labels = _integer_labels(mask.array, mask_path)
    lung = LabelMap.parse(settings.lung_labels)(labels).astype(np.uint8)
    source = grid_of(ct)
    target = centered_grid(source, settings.vox_spacing, settings.size)
    lung_out = resample_array(lung, source, target, "nearest", 0)
    voxel_ml = float(np.prod(ct.spacing)) / 1000.0
    lung_ml = float(lung.sum()) * voxel_ml
    kept = float(lung_out.sum()) * settings.vox_spacing**3 / 1000.0 / lung_ml if lung_ml > 0 else 1.0
    present = [int(v) for v in np.unique(labels)]
    warnings = []
    if lung_ml == 0:
        warnings.append(f"no lung voxels (labels present: {present}; lung = {settings.lung_labels})")
    elif kept < 1 - LOST_LUNG_WARNING:
        warnings.append(
            f"the {'x'.join(map(str, settings.size))} box at {settings.vox_spacing} mm keeps only "
            f"{100 * kept:.1f}% of the lung; raise Z_MAX Y_MAX X_MAX or the spacing"
        )
    lung_map = LabelMap.parse(settings.lung_labels)
    unexpected = sorted(set(present) - {0, 3, 4, 5})
    if unexpected and lung_map.above is None and set(lung_map.labels) <= {3, 4, 5}:
        warnings.append(f"labels {unexpected} are not LUNA16 lung-mask labels (0, 3, 4, 5)")
    low, high = float(ct.array.min()), float(ct.array.max())
    if low >= -200:  # no air anywhere: raw scanner values (no rescale intercept) or already scaled
        warnings.append(
            f"intensities span [{low:g}, {high:g}], which does not look like Hounsfield units (air is "
            "-1000 HU); a CT already rescaled or stored without its rescale slope/intercept?"
        )
    if out_dir is not None:
        out_dir = Path(out_dir)
        hu = resample_array(ct.array, source, target, "linear", HU_WINDOW[0])
        geometry = {"spacing": target.spacing, "origin": target.origin, "direction": target.direction}
        write_volume(out_dir / OUT_CT_DIR / f"{case_id}.mhd", normalize_ct(hu), compress=False, **geometry)
        write_volume(out_dir / OUT_MASK_DIR / f"{case_id}.mhd", lung_out, compress=True, **geometry)
    return CaseReport(
        id=case_id,
        shape=list(ct.shape),
        spacing=[float(s) for s in ct.spacing],
        labels=present,
        lung_ml=round(lung_ml, 2),
        lung_kept=round(kept, 4),
        warnings=warnings,
    )


def read_marker(folder: str | Path) -> dict | None:
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "settings" in marker and "cases" in marker else None


def source_fingerprint(cases: Sequence[tuple[str, Path, Path]]) -> str:
    """sha256 over the case ids and the size and mtime of every source file (and its .raw/.zraw)."""
    digest = hashlib.sha256()
    for case_id, *paths in cases:
        digest.update(case_id.encode())
        for path in paths:
            for part in [Path(path), *(Path(path).with_suffix(s) for s in (".raw", ".zraw"))]:
                if part.is_file():
                    st = part.stat()
                    digest.update(f"{part.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def is_normalized(
    folder: str | Path, settings: Settings, cases: Sequence[tuple[str, Path, Path]] | None = None
) -> bool:
    """True when `folder` holds a complete normalisation with these settings (of exactly these sources)."""
    marker = read_marker(folder)
    if marker is None or marker["settings"] != settings.as_dict():
        return False
    return cases is None or marker.get("fingerprint") == source_fingerprint(cases)


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="case", disable=None, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        return None


def _run_cases(
    cases: Sequence[tuple[str, Path, Path]], settings: Settings, out_dir: Path | None, workers: int, desc: str
) -> tuple[list[CaseReport], list[tuple[Path, str]]]:
    reports: list[CaseReport] = []
    problems: list[tuple[Path, str]] = []
    bar = _progress(len(cases), desc)

    def record(case: tuple[str, Path, Path], fn: Callable[[], CaseReport]) -> None:
        try:
            reports.append(fn())
        except DataError as exc:
            problems.append((exc.path or case[1], exc.problem))
        except Exception as exc:  # noqa: BLE001 - a library failure still names its case
            problems.append((case[1], f"{type(exc).__name__}: {exc}"))
        if bar is not None:
            bar.update(1)

    if workers <= 1 or len(cases) <= 1:
        for case in cases:
            record(case, lambda case=case: process_case(*case, settings, out_dir))
    else:
        import multiprocessing

        # spawn: the caller may be a threaded process (torch, SimpleITK) where fork is unsafe.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {pool.submit(process_case, *case, settings, out_dir): case for case in cases}
            for future in as_completed(futures):
                record(futures[future], future.result)
    if bar is not None:
        bar.close()
    reports.sort(key=lambda r: r.id)
    return reports, problems


def _summary(reports: Sequence[CaseReport], settings: Settings) -> list[str]:
    if not reports:
        return []
    kept = [r.lung_kept for r in reports]
    extents = np.array([[n * s for n, s in zip(r.shape, r.spacing)] for r in reports])
    box = [n * settings.vox_spacing for n in settings.size]
    lines = [
        f"{len(reports)} case(s); scan extent (z, y, x) mm: min {np.round(extents.min(0)).astype(int).tolist()}, "
        f"max {np.round(extents.max(0)).astype(int).tolist()}; output box {[round(b) for b in box]} mm",
        f"lung kept inside the box: min {100 * min(kept):.1f}%, mean {100 * float(np.mean(kept)):.1f}%",
    ]
    for report in reports:
        lines.extend(f"  warning: {report.id}: {w}" for w in report.warnings)
    return lines


def normalize_tree(
    root: str | Path,
    settings: Settings = Settings(),
    out_dir: str | Path | None = None,
    workers: int | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Normalise every case of the LUNA16 tree at `root` into `out_dir` (default `root`).

    Returns the marker dict (settings, cases and per-case reports). Raises one DataError naming every
    bad case after the good ones are done; the marker is then not written, so the tree stays incomplete.
    """
    root = Path(root)
    out = Path(out_dir) if out_dir is not None else root
    cases = list_cases(root)
    if not dry_run and not overwrite and is_normalized(out, settings, cases):
        log(
            f"{out} already holds these {len(cases)} case(s) normalised with {settings.as_dict()}; reusing it"
        )
        return read_marker(out) or {}
    workers = max(1, min(workers or min(8, os.cpu_count() or 1), len(cases)))
    action = "checking" if dry_run else "normalising"
    log(
        f"{action} {len(cases)} case(s) from {root} -> {out if not dry_run else '(dry run: nothing written)'}: "
        f"{settings.vox_spacing} mm voxels, {'x'.join(map(str, settings.size))} (Z x Y x X), "
        f"lung = {LabelMap.parse(settings.lung_labels).describe()}, {workers} worker(s)"
    )
    if not dry_run:
        (out / MARKER).unlink(missing_ok=True)  # incomplete until every case is written
    reports, problems = _run_cases(cases, settings, None if dry_run else out, workers, action)
    for line in _summary(reports, settings):
        log(line)
    marker = {
        "settings": settings.as_dict(),
        "source": str(root.resolve()),
        "fingerprint": source_fingerprint(cases),
        "cases": [r.id for r in reports],
        "reports": [asdict(r) for r in reports],
    }
    if problems:
        raise DataError(
            root,
            f"{len(problems)} of {len(cases)} case(s) could not be {'checked' if dry_run else 'normalised'}:\n"
            + format_problems(problems),
        )
    if not dry_run:
        tmp = out / f".{MARKER}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(marker, indent=1) + "\n")
        os.replace(tmp, out / MARKER)
        log(f"wrote {len(reports)} case(s) to {out / OUT_CT_DIR} and {out / OUT_MASK_DIR}")
    return marker


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


def settings_tag(settings: Settings) -> str:
    return f"normalized_{settings.vox_spacing:g}mm_{'x'.join(map(str, settings.size))}"


def ensure_normalized(
    root: str | Path,
    settings: Settings,
    workers: int | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """The folder holding `root`'s normalisation with `settings`, normalising first when none exists.

    Looks in `root` itself (the seed's layout), then `root/normalized_<spacing>mm_<size>/`, then the same
    name in the user cache when `root` is read-only. Safe with N ranks: one normalises under a file
    lock, the others wait and reuse the result.
    """
    from common.cache import default_cache_dir

    root = Path(root)
    cases = list_cases(root)
    candidates = [root, root / settings_tag(settings), default_cache_dir(root) / settings_tag(settings)]
    for folder in candidates:
        if is_normalized(folder, settings, cases):
            return folder
    if _writable(root):
        # The seed's layout when root has no normalisation yet; never overwrite one made with other settings.
        has_other = (root / OUT_CT_DIR).exists() or read_marker(root) is not None
        out = candidates[1] if has_other else root
    else:
        out = candidates[2]
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out / ".normalization.lock"):
        if not is_normalized(out, settings, cases):
            normalize_tree(root, settings, out, workers=workers, log=log)
    return out


def cache_volumes(folder: str | Path, workers: int | None = None, log: Callable[[str], None] = print) -> Path:
    """Write the normalised cases in `folder` as the `.npy` files training maps (dataset.CaseReader), each
    checked once; returns the cache folder."""
    from dataset import check_cases, default_volume_cache_dir, resolve_data  # dataset imports this module

    spec = resolve_data(folder, dataset="luna16", log=log)
    check_cases(spec, skip_bad=False, workers=workers)
    cache = default_volume_cache_dir(spec)
    log(f"{len(spec.cases)} case(s) cached for training as memory-mapped .npy in {cache}")
    return cache


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root_path", type=Path, help=f"folder with {CT_DIR}/ and {MASK_DIR}/")
    parser.add_argument(
        "vox_spacing", nargs="?", type=float, default=DEFAULT_SPACING, help="isotropic voxel size in mm"
    )
    for name, default in zip(("Z_MAX", "Y_MAX", "X_MAX"), DEFAULT_SIZE):
        parser.add_argument(
            name, nargs="?", type=int, default=default, help=f"output size (default {default})"
        )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: root_path)")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default min(8, CPUs))")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="check every case and report the crop; write nothing")  # fmt: skip
    parser.add_argument(
        "--lung_labels", default=LUNA_LUNG_LABELS, help="labels that form the lung target (default 3,4)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="normalise again even if a complete copy exists"
    )
    parser.add_argument("--no_cache", "--no-cache", dest="no_cache", action="store_true",
                        help="do not write the memory-mapped .npy copies training reads (the first run will)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = Settings(args.vox_spacing, (args.Z_MAX, args.Y_MAX, args.X_MAX), args.lung_labels)
        if args.workers is not None and args.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {args.workers}")
        normalize_tree(args.root_path, settings, args.out, args.workers, args.dry_run, args.overwrite)
        if not (args.dry_run or args.no_cache):
            cache_volumes(args.out if args.out is not None else args.root_path, args.workers)
    except ModelZooError as exc:
        print(f"[Error] {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_main(main)
