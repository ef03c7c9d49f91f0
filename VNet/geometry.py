"""Voxel grids in physical space, and resampling a volume from one grid onto another (SimpleITK).

A CT is an array plus a grid: size, spacing, origin and direction place every voxel in millimetres. The
normalisation (`normalize_dataset.py`) resamples a scan onto an isotropic grid of a fixed size centred on
the scan; prediction (`predict.py`) resamples the network's probabilities back onto the scan's own grid,
so the written mask has the input's exact geometry.

Conventions follow `common.imageio.Volume`: `size` and `spacing` in array order (z, y, x); `origin` and
`direction` in SimpleITK order (x, y, z; 9 row-major direction cosines).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from common.imageio import Volume

INTERPOLATIONS = ("linear", "nearest")


@dataclass(frozen=True)
class Grid:
    """Where the voxels of a (z, y, x) array lie in patient space (mm)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def center(self) -> np.ndarray:
        """Physical position (x, y, z) of the grid's centre (the middle of the voxel centres)."""
        half = (np.asarray(self.size[::-1], float) - 1) / 2 * np.asarray(self.spacing[::-1], float)
        return np.asarray(self.origin, float) + self.matrix() @ half

    def extent_mm(self) -> tuple[float, float, float]:
        """Physical extent (z, y, x) covered by the voxels, in mm."""
        return tuple(float(n * s) for n, s in zip(self.size, self.spacing))


def grid_of(volume: Volume) -> Grid:
    return Grid(
        size=tuple(int(s) for s in volume.array.shape),
        spacing=tuple(float(s) for s in volume.spacing),
        origin=tuple(float(o) for o in volume.origin),
        direction=tuple(float(d) for d in volume.direction),
    )


def _spacing3(spacing: float | Sequence[float]) -> tuple[float, float, float]:
    values = (float(spacing),) * 3 if np.isscalar(spacing) else tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(s > 0 for s in values):
        raise ValueError(f"spacing must be one positive number or three (z, y, x), got {spacing!r}")
    return values


def centered_grid(grid: Grid, spacing: float | Sequence[float], size: Sequence[int] | None = None) -> Grid:
    """A grid with `grid`'s direction and centre, the given voxel spacing (mm, z y x) and size.

    Without `size`, the grid covers the same extent: round(old size x old spacing / new spacing) voxels
    per axis. With `size`, the box is centred on the scan, so a larger box pads and a smaller one crops
    equally on both sides (the reference's centre crop/pad, but with the origin moved to match).
    """
    new_spacing = _spacing3(spacing)
    if size is None:
        size = [max(1, int(round(n * s / t))) for n, s, t in zip(grid.size, grid.spacing, new_spacing)]
    new_size = tuple(int(s) for s in size)
    if len(new_size) != 3 or min(new_size) < 1:
        raise ValueError(f"size must be three positive integers (z, y, x), got {size!r}")
    half = (np.asarray(new_size[::-1], float) - 1) / 2 * np.asarray(new_spacing[::-1], float)
    origin = grid.center() - grid.matrix() @ half
    return Grid(new_size, new_spacing, tuple(float(o) for o in origin), grid.direction)


def _to_sitk(array: np.ndarray, grid: Grid):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing([float(s) for s in grid.spacing[::-1]])
    image.SetOrigin([float(o) for o in grid.origin])
    image.SetDirection([float(d) for d in grid.direction])
    return image


def resample_array(
    array: np.ndarray,
    source: Grid,
    target: Grid,
    interpolation: str = "linear",
    default: float = 0.0,
    dtype: np.dtype | type | None = None,
) -> np.ndarray:
    """`array` (on `source`) sampled at the voxel centres of `target`; points outside get `default`.

    "linear" is trilinear (intensities, probabilities); "nearest" keeps label values exact (masks).
    Linear resampling runs in float32; nearest keeps the input dtype unless `dtype` says otherwise.
    """
    import SimpleITK as sitk

    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if tuple(array.shape) != tuple(source.size):
        raise ValueError(f"array shape {array.shape} does not match the source grid size {source.size}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if interpolation == "linear" and array.dtype != np.float32:
        array = array.astype(np.float32)
    image = _to_sitk(array, source)
    interpolator = sitk.sitkLinear if interpolation == "linear" else sitk.sitkNearestNeighbor
    out = sitk.Resample(
        image,
        [int(s) for s in target.size[::-1]],
        sitk.Transform(),
        interpolator,
        [float(o) for o in target.origin],
        [float(s) for s in target.spacing[::-1]],
        [float(d) for d in target.direction],
        float(default),
        image.GetPixelID(),
    )
    result = sitk.GetArrayFromImage(out)
    return result.astype(dtype, copy=False) if dtype is not None else result


def resample_volume(
    volume: Volume, target: Grid, interpolation: str = "linear", default: float = 0.0
) -> Volume:
    """`volume` resampled onto `target`, returned with `target`'s geometry."""
    array = resample_array(volume.array, grid_of(volume), target, interpolation, default)
    return Volume(array=array, spacing=target.spacing, origin=target.origin, direction=target.direction)


def same_grid(a: Grid, b: Grid, tol: float = 1e-4) -> bool:
    return (
        a.size == b.size
        and np.allclose(a.spacing, b.spacing, rtol=0, atol=tol)
        and np.allclose(a.origin, b.origin, rtol=0, atol=tol)
        and np.allclose(a.direction, b.direction, rtol=0, atol=tol)
    )
