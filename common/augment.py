"""Paired image/mask augmentation on numpy arrays with an explicit random generator.

Conventions shared by every function:
- image: (H, W) or (H, W, C) uint8 (geometric ops also take float32); mask: (H, W) bool or integer
  with values <= 255, or None when there is no mask (inference).
- Functions return NEW arrays; inputs are never modified in place (cached memmap rows are read-only).
- Masks are resampled with nearest neighbour only, so a binary mask stays binary and keeps its dtype;
  images use bilinear interpolation (antialiased when shrinking, as PIL and torchvision antialias=True).
- Randomness comes only from the `np.random.Generator` argument, so a seeded generator per sample
  (e.g. np.random.default_rng([seed, epoch, index])) makes augmentation reproducible in any worker.

Rotation and resizing use PIL (C code, a few ms for 512x512); colour ops use PIL's ImageEnhance exactly
as torchvision's ColorJitter does on PIL images; `hue_saturation_value` reimplements albumentations'
HueSaturationValue with OpenCV's 8-bit HSV conversion in numpy (no OpenCV dependency).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}

Pair = tuple[np.ndarray, "np.ndarray | None"]


# ----------------------------------------------------------------------------------------------- helpers


def _check(img: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {img.shape}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != img.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match image shape {img.shape[:2]}")
    return img, mask


def _pil_image_op(
    img: np.ndarray, op: Callable[[Image.Image, float | tuple], Image.Image], fill: float
) -> np.ndarray:
    """Run a PIL geometric op on a uint8/float32 image of any channel count.

    RGB uint8 goes through PIL in one piece; anything else channel by channel in "L" or "F" mode
    (PIL would premultiply alpha when resampling RGBA, which changes colours).
    """
    if img.dtype == np.uint8:
        mode = "L"
    elif img.dtype == np.float32:
        mode = "F"
    else:
        raise ValueError(f"image dtype must be uint8 or float32, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 3 and mode == "L":
        pil = Image.fromarray(np.ascontiguousarray(img), "RGB")
        return np.array(op(pil, (int(fill),) * 3))
    if img.ndim == 2:
        return np.array(op(Image.fromarray(np.ascontiguousarray(img), mode), fill))
    planes = [
        np.array(op(Image.fromarray(np.ascontiguousarray(img[:, :, c]), mode), fill))
        for c in range(img.shape[2])
    ]
    return np.stack(planes, axis=2)


def _pil_mask_op(
    mask: np.ndarray | None, op: Callable[[Image.Image, float], Image.Image]
) -> np.ndarray | None:
    """Run a PIL op (always nearest neighbour, fill 0 = background) on a mask and keep its dtype."""
    if mask is None:
        return None
    if mask.dtype != bool and mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError("mask values must lie in 0..255 (bool, 0/1 or 0/255)")
    out = np.array(op(Image.fromarray(np.ascontiguousarray(mask.astype(np.uint8)), "L"), 0))
    return out.astype(mask.dtype, copy=False)


def _canvas_crop(arr: np.ndarray, top: int, left: int, h: int, w: int, fill: float) -> np.ndarray:
    """Crop a (h, w) window at (top, left); the parts outside the array are filled with `fill`."""
    height, width = arr.shape[:2]
    if top >= 0 and left >= 0 and top + h <= height and left + w <= width:
        return arr[top : top + h, left : left + w].copy()
    out = np.full((h, w, *arr.shape[2:]), fill, dtype=arr.dtype)
    y0, y1 = max(top, 0), min(top + h, height)
    x0, x1 = max(left, 0), min(left + w, width)
    if y1 > y0 and x1 > x0:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = arr[y0:y1, x0:x1]
    return out


# ----------------------------------------------------------------------------------------------- geometric


def rot90(img: np.ndarray, mask: np.ndarray | None, k: int) -> Pair:
    """Rotate by k * 90 degrees counter-clockwise (np.rot90 on the first two axes); exact, no resampling."""
    img, mask = _check(img, mask)
    out_mask = None if mask is None else np.rot90(mask, k).copy()
    return np.rot90(img, k, axes=(0, 1)).copy(), out_mask


def hflip(img: np.ndarray, mask: np.ndarray | None) -> Pair:
    """Mirror left-right."""
    img, mask = _check(img, mask)
    return img[:, ::-1].copy(), None if mask is None else mask[:, ::-1].copy()


def vflip(img: np.ndarray, mask: np.ndarray | None) -> Pair:
    """Mirror top-bottom."""
    img, mask = _check(img, mask)
    return img[::-1].copy(), None if mask is None else mask[::-1].copy()


def rotate(
    img: np.ndarray,
    mask: np.ndarray | None,
    angle_deg: float,
    fill: float = 0,
    interpolation: str = "bilinear",
) -> Pair:
    """Rotate by `angle_deg` counter-clockwise about the image centre on the same canvas.

    Like torchvision RandomRotation(expand=False): corners leave the canvas and uncovered areas take
    `fill` (the mask takes 0). The image is resampled bilinearly (interpolation="nearest" reproduces
    torchvision's default), the mask with nearest neighbour. An angle of 0 returns exact copies.
    """
    img, mask = _check(img, mask)
    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
    resample = _RESAMPLE[interpolation]
    out = _pil_image_op(
        img, lambda im, f: im.rotate(angle_deg, resample=resample, expand=False, fillcolor=f), fill
    )
    out_mask = _pil_mask_op(
        mask, lambda m, f: m.rotate(angle_deg, resample=Image.Resampling.NEAREST, expand=False, fillcolor=f)
    )
    return out, out_mask


def crop(
    img: np.ndarray, mask: np.ndarray | None, top: int, left: int, h: int, w: int, fill: float = 0
) -> Pair:
    """Cut the (h, w) window whose top-left corner is (top, left); areas outside the image are filled
    with `fill` (mask: 0), as torchvision's crop does."""
    img, mask = _check(img, mask)
    if h <= 0 or w <= 0:
        raise ValueError(f"crop size must be positive, got {h}x{w}")
    out_mask = None if mask is None else _canvas_crop(mask, top, left, h, w, 0)
    return _canvas_crop(img, top, left, h, w, fill), out_mask


def center_crop_or_pad(
    img: np.ndarray, mask: np.ndarray | None, out_h: int, out_w: int, fill: float = 0
) -> Pair:
    """Centre crop to (out_h, out_w), padding with `fill` (mask: 0) along any axis that is too small.

    Offsets follow torchvision CenterCrop: crop offset round((size - out) / 2), pad before (out - size) // 2.
    """
    img, mask = _check(img, mask)
    height, width = img.shape[:2]

    def offset(size: int, out: int) -> int:
        return int(round((size - out) / 2.0)) if size >= out else -((out - size) // 2)

    top, left = offset(height, out_h), offset(width, out_w)
    return crop(img, mask, top, left, out_h, out_w, fill)


def resize(img: np.ndarray, mask: np.ndarray | None, h: int, w: int, interpolation: str = "bilinear") -> Pair:
    """Resize to (h, w): image bilinear (PIL, antialiased when shrinking), mask nearest neighbour."""
    img, mask = _check(img, mask)
    if h <= 0 or w <= 0:
        raise ValueError(f"resize size must be positive, got {h}x{w}")
    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
    resample = _RESAMPLE[interpolation]
    out = _pil_image_op(img, lambda im, f: im.resize((w, h), resample=resample), 0)
    out_mask = _pil_mask_op(mask, lambda m, f: m.resize((w, h), resample=Image.Resampling.NEAREST))
    return out, out_mask


# ----------------------------------------------------------------------------------------------- colour


def _as_pil_color(img: np.ndarray) -> Image.Image:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"colour ops need a uint8 image, got {img.dtype}")
    if img.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(img), "L")
    if img.ndim == 3 and img.shape[2] == 1:
        return Image.fromarray(np.ascontiguousarray(img[:, :, 0]), "L")
    if img.ndim == 3 and img.shape[2] == 3:
        return Image.fromarray(np.ascontiguousarray(img), "RGB")
    raise ValueError(f"colour ops need an (H, W), (H, W, 1) or (H, W, 3) image, got {img.shape}")


def _back(pil: Image.Image, like: np.ndarray) -> np.ndarray:
    return np.array(pil).reshape(like.shape)


def _brightness(pil: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Brightness(pil).enhance(factor)


def _contrast(pil: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Contrast(pil).enhance(factor)


def _saturation(pil: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Color(pil).enhance(factor) if pil.mode == "RGB" else pil


def _hue(pil: Image.Image, shift: float) -> Image.Image:
    if pil.mode != "RGB":
        return pil  # grey images have no hue
    h, s, v = pil.convert("HSV").split()
    # PIL's hue byte spans a full turn in 0..255; the shift wraps around (truncation toward zero, as
    # torchvision's uint8 cast does on x86).
    delta = int(shift * 255) % 256
    hue = ((np.asarray(h, dtype=np.uint16) + delta) % 256).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(hue, "L"), s, v)).convert("RGB")


def adjust_brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """Multiply by `factor` (0 = black, 1 = unchanged), clipped to 0..255."""
    return _back(_brightness(_as_pil_color(img), factor), np.asarray(img))


def adjust_contrast(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the mean grey level (0 = flat grey, 1 = unchanged)."""
    return _back(_contrast(_as_pil_color(img), factor), np.asarray(img))


def adjust_saturation(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the grey version (0 = grey, 1 = unchanged); grey images are returned unchanged."""
    return _back(_saturation(_as_pil_color(img), factor), np.asarray(img))


def adjust_hue(img: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue by `shift` of a full turn, in [-0.5, 0.5]; grey images are returned unchanged."""
    if not -0.5 <= shift <= 0.5:
        raise ValueError(f"hue shift must lie in [-0.5, 0.5], got {shift}")
    return _back(_hue(_as_pil_color(img), shift), np.asarray(img))


def color_jitter(
    img: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0,
    contrast: float = 0,
    saturation: float = 0,
    hue: float = 0,
) -> np.ndarray:
    """torchvision ColorJitter on a uint8 image (the mask is never touched, so it is not an argument).

    Factors are drawn uniformly from [max(0, 1 - b), 1 + b] for brightness, contrast and saturation,
    the hue shift from [-hue, hue] of a full turn (hue <= 0.5); the four ops run in a random order.
    A zero strength skips its op, so all zeros return an exact copy. The draws are: a permutation of
    the four ops, then one uniform per enabled op in the order brightness, contrast, saturation, hue.
    """
    for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if value < 0:
            raise ValueError(f"{name} strength must be >= 0, got {value}")
    if not 0 <= hue <= 0.5:
        raise ValueError(f"hue strength must lie in [0, 0.5], got {hue}")
    arr = np.asarray(img)
    order = rng.permutation(4)
    ops: list[tuple[Callable[[Image.Image, float], Image.Image], float] | None] = [None] * 4
    if brightness > 0:
        ops[0] = (_brightness, rng.uniform(max(0.0, 1 - brightness), 1 + brightness))
    if contrast > 0:
        ops[1] = (_contrast, rng.uniform(max(0.0, 1 - contrast), 1 + contrast))
    if saturation > 0:
        ops[2] = (_saturation, rng.uniform(max(0.0, 1 - saturation), 1 + saturation))
    if hue > 0:
        ops[3] = (_hue, rng.uniform(-hue, hue))
    if all(op is None for op in ops):
        return arr.copy()
    pil = _as_pil_color(arr)
    for index in order:
        if ops[index] is not None:
            fn, factor = ops[index]
            pil = fn(pil, factor)
    return _back(pil, arr)


# ----------------------------------------------------------------------------------------------- HSV (albumentations)

_HSV_SHIFT = 12
_DIV = np.arange(256, dtype=np.float64)
with np.errstate(divide="ignore"):
    # OpenCV's fixed-point reciprocal tables for 8-bit RGB->HSV with a hue range of 180.
    _SDIV = np.where(_DIV > 0, np.round((255 << _HSV_SHIFT) / _DIV), 0).astype(np.int64)
    _HDIV = np.where(_DIV > 0, np.round((180 << _HSV_SHIFT) / (6.0 * _DIV)), 0).astype(np.int64)


def rgb_to_hsv_u8(img: np.ndarray) -> np.ndarray:
    """OpenCV's cvtColor(RGB2HSV) for uint8: H in 0..179 (degrees / 2), S and V in 0..255."""
    r, g, b = (img[..., c].astype(np.int32) for c in range(3))
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + half) >> _HSV_SHIFT
    h += np.where(h < 0, 180, 0).astype(np.int32)
    out = np.empty((*img.shape[:-1], 3), dtype=np.uint8)
    out[..., 0], out[..., 1], out[..., 2] = h, s, v
    return out


# For each hue sector, which of (v, p, q, t) = tab[0..3] becomes r, g and b.
_SECTORS = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


def hsv_to_rgb_u8(hsv: np.ndarray) -> np.ndarray:
    """OpenCV's cvtColor(HSV2RGB) for uint8 (H in 0..179), in float32 like OpenCV's SIMD path.

    OpenCV's vectorised loop truncates the final value (its scalar tail, the last few pixels of a
    call, rounds) and some builds fuse multiply-adds, so results can differ from a given OpenCV build
    by 1 grey level for about 0.02 % of colours.
    """
    shape = hsv.shape[:-1]
    flat = hsv.reshape(-1, 3)
    h = flat[:, 0].astype(np.float32) * np.float32(6.0 / 180.0)
    s = flat[:, 1].astype(np.float32) * np.float32(1.0 / 255.0)
    v = flat[:, 2].astype(np.float32) * np.float32(1.0 / 255.0)
    whole = np.floor(h)
    frac = h - whole  # stays float32, as in OpenCV
    sector = np.mod(whole.astype(np.int64), 6)
    one = np.float32(1.0)
    tab = np.stack([v, v * (one - s), v * (one - s * frac), v * (one - s * (one - frac))]) * np.float32(255.0)
    picks = _SECTORS[sector]  # (N, 3): which row of tab feeds r, g and b
    columns = np.arange(flat.shape[0])
    out = np.empty((flat.shape[0], 3), dtype=np.uint8)
    for c in range(3):
        out[:, c] = np.clip(tab[picks[:, c], columns], 0, 255)  # float -> uint8 truncates, as OpenCV
    return out.reshape(*shape, 3)


def _limits(value: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return -abs(float(value)), abs(float(value))
    lo, hi = value
    return float(lo), float(hi)


def hue_saturation_value(
    img: np.ndarray,
    rng: np.random.Generator,
    hue_shift_limit: float | Sequence[float] = 20,
    sat_shift_limit: float | Sequence[float] = 30,
    val_shift_limit: float | Sequence[float] = 20,
) -> np.ndarray:
    """albumentations HueSaturationValue on a uint8 RGB image (OpenCV hue units: 0..179).

    Draws hue, saturation and value shifts uniformly from (-limit, limit) (or a (lo, hi) pair), converts
    RGB -> HSV as OpenCV does for 8 bits, adds the shifts through lookup tables (hue wraps modulo 180,
    S and V clip to 0..255, each table truncated to uint8 as albumentations does) and converts back.
    Grey images (H, W) or (H, W, 1) get the value shift only, as albumentations >= 1.0 does.
    """
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise ValueError(f"hue_saturation_value needs a uint8 image, got {arr.dtype}")
    hue_shift = rng.uniform(*_limits(hue_shift_limit))
    sat_shift = rng.uniform(*_limits(sat_shift_limit))
    val_shift = rng.uniform(*_limits(val_shift_limit))
    ramp = np.arange(256, dtype=np.int16)
    lut_val = np.clip(ramp + val_shift, 0, 255).astype(np.uint8)
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 1):
        return lut_val[arr]
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"hue_saturation_value needs an RGB (H, W, 3) or grey image, got {arr.shape}")
    lut_hue = np.mod(ramp + hue_shift, 180).astype(np.uint8)
    lut_sat = np.clip(ramp + sat_shift, 0, 255).astype(np.uint8)
    hsv = rgb_to_hsv_u8(arr)
    shifted = np.stack([lut_hue[hsv[..., 0]], lut_sat[hsv[..., 1]], lut_val[hsv[..., 2]]], axis=-1)
    return hsv_to_rgb_u8(shifted)


# ----------------------------------------------------------------------------------------------- tensors


def to_tensor_image(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (H, W[, C]) -> float32 (C, H, W) as (img / 255 - mean) / std per channel.

    `mean` and `std` have one entry per channel, or one entry for all channels.
    """
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {arr.shape}")
    scale = 255.0 if arr.dtype == np.uint8 else 1.0
    channels = arr.shape[2]
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    if mean_t.shape[0] not in (1, channels) or std_t.shape[0] not in (1, channels):
        raise ValueError(f"mean/std need 1 or {channels} entries, got {len(mean)} and {len(std)}")
    tensor = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(torch.float32) / scale
    return (tensor - mean_t) / std_t


def to_tensor_mask(mask: np.ndarray) -> torch.Tensor:
    """Mask (H, W) -> float32 (1, H, W) with values exactly 0 and 1 (nonzero = foreground; floats > 0.5)."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {arr.shape}")
    binary = arr > 0.5 if arr.dtype.kind == "f" else arr != 0
    return torch.from_numpy(binary[None].astype(np.float32))
