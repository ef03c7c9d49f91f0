"""common.augment: paired geometry keeps masks binary, identities hold, colour ops follow their references."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch

from common import augment as A

RNG = np.random.default_rng(7)
IMG = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (24, 32), dtype=np.uint8)
_yy, _xx = np.mgrid[:24, :32]
MASK = (_yy - 11) ** 2 + (_xx - 13) ** 2 < 64  # bool disc, off-centre so rotations move it


def _geometric_ops():
    return {
        "rot90": lambda i, m: A.rot90(i, m, 1),
        "rot90_3": lambda i, m: A.rot90(i, m, 3),
        "hflip": A.hflip,
        "vflip": A.vflip,
        "rotate": lambda i, m: A.rotate(i, m, 17.5, fill=0),
        "rotate_neg": lambda i, m: A.rotate(i, m, -8.0, fill=30),
        "crop": lambda i, m: A.crop(i, m, 3, 5, 12, 20),
        "crop_outside": lambda i, m: A.crop(i, m, -4, 20, 30, 20),
        "center": lambda i, m: A.center_crop_or_pad(i, m, 20, 40),
        "resize_down": lambda i, m: A.resize(i, m, 13, 17),
        "resize_up": lambda i, m: A.resize(i, m, 50, 70),
    }


@pytest.mark.parametrize("name", list(_geometric_ops()))
@pytest.mark.parametrize("mask_kind", ["bool", "uint8_255", "uint8_01"])
def test_masks_stay_binary_and_keep_dtype(name, mask_kind):
    mask = {"bool": MASK, "uint8_255": MASK.astype(np.uint8) * 255, "uint8_01": MASK.astype(np.uint8)}[
        mask_kind
    ]
    values = set(np.unique(mask).tolist())
    for image in (IMG, GRAY):
        out_img, out_mask = _geometric_ops()[name](image, mask)
        assert out_mask.dtype == mask.dtype
        assert set(np.unique(out_mask).tolist()) <= values
        assert out_img.shape[:2] == out_mask.shape
        assert out_img.dtype == np.uint8 and out_img.ndim == image.ndim
    assert mask is not MASK or np.array_equal(MASK, mask)  # inputs untouched


def test_inputs_are_never_modified_and_outputs_are_new():
    img, mask = IMG.copy(), MASK.copy()
    img.setflags(write=False)  # like a cached memmap row
    mask.setflags(write=False)
    for op in _geometric_ops().values():
        out_img, out_mask = op(img, mask)
        assert out_img.flags.writeable and out_mask.flags.writeable
        assert not np.shares_memory(out_img, img)
    assert np.array_equal(img, IMG) and np.array_equal(mask, MASK)


def test_rot90_and_flip_identities():
    img, mask = IMG, MASK
    for _ in range(4):
        img, mask = A.rot90(img, mask, 1)
    assert np.array_equal(img, IMG) and np.array_equal(mask, MASK)
    once_img, once_mask = A.rot90(IMG, MASK, 1)
    assert np.array_equal(once_img, np.rot90(IMG)) and once_img.shape == (32, 24, 3)
    assert np.array_equal(once_mask, np.rot90(MASK))
    twice = A.hflip(*A.hflip(IMG, MASK))
    assert np.array_equal(twice[0], IMG) and np.array_equal(twice[1], MASK)
    assert np.array_equal(A.hflip(IMG, MASK)[0], IMG[:, ::-1])
    assert np.array_equal(A.vflip(*A.vflip(GRAY, MASK))[0], GRAY)
    assert np.array_equal(A.vflip(GRAY, None)[0], GRAY[::-1]) and A.vflip(GRAY, None)[1] is None


def test_rotate_zero_is_identity_and_quarter_turn_matches_rot90():
    img, mask = A.rotate(IMG, MASK, 0.0)
    assert np.array_equal(img, IMG) and np.array_equal(mask, MASK)
    square = IMG[:24, :24]
    square_mask = MASK[:24, :24]
    turned, turned_mask = A.rotate(square, square_mask, 90.0)  # counter-clockwise, like np.rot90
    assert np.array_equal(turned, np.rot90(square)) and np.array_equal(turned_mask, np.rot90(square_mask))


def test_rotate_fills_corners_and_keeps_canvas():
    flat = np.full((40, 40, 3), 200, np.uint8)
    out, out_mask = A.rotate(flat, np.ones((40, 40), bool), 45.0, fill=7)
    assert out.shape == flat.shape
    assert (out[0, 0] == 7).all() and (out[20, 20] == 200).all()
    assert not out_mask[0, 0] and out_mask[20, 20]
    nearest, _ = A.rotate(IMG, MASK, 33.0, interpolation="nearest")
    assert set(np.unique(nearest)) <= set(np.unique(IMG)) | {0}  # nearest only copies values


def test_crop_and_center_crop_or_pad_offsets():
    img, mask = A.crop(IMG, MASK, 2, 3, 10, 11)
    assert np.array_equal(img, IMG[2:12, 3:14]) and np.array_equal(mask, MASK[2:12, 3:14])

    out, out_mask = A.crop(GRAY, MASK, -2, 30, 5, 4, fill=9)  # top rows and right columns lie outside
    expected = np.full((5, 4), 9, np.uint8)
    expected[2:, :2] = GRAY[0:3, 30:32]
    assert np.array_equal(out, expected)
    assert not out_mask[:2].any() and not out_mask[:, 2:].any()

    # Crop 24x32 -> 20x27: torchvision offsets round((24-20)/2)=2, round((32-27)/2)=round(2.5)=2.
    img, _ = A.center_crop_or_pad(IMG, MASK, 20, 27)
    assert np.array_equal(img, IMG[2:22, 2:29])
    # Pad 24x32 -> 29x32: (29-24)//2 = 2 rows before, 3 after.
    img, mask = A.center_crop_or_pad(IMG, MASK, 29, 32, fill=5)
    assert np.array_equal(img[2:26], IMG) and (img[:2] == 5).all() and (img[26:] == 5).all()
    assert np.array_equal(mask[2:26], MASK) and not mask[:2].any()
    # Mixed: crop height, pad width.
    img, _ = A.center_crop_or_pad(GRAY, None, 10, 40)
    assert np.array_equal(img[:, 4:36], GRAY[7:17]) and (img[:, :4] == 0).all()


def test_resize_shapes_values_and_nearest_mask():
    img, mask = A.resize(IMG, MASK, 48, 64)
    assert img.shape == (48, 64, 3) and mask.shape == (48, 64)
    assert np.array_equal(mask, np.kron(MASK, np.ones((2, 2), bool)))  # nearest, exact 2x
    small, small_mask = A.resize(GRAY, MASK, 7, 9)
    assert small.shape == (7, 9) and small_mask.shape == (7, 9)
    flat, _ = A.resize(np.full((30, 30, 3), 77, np.uint8), None, 11, 13)
    assert (flat == 77).all()  # interpolation of a constant is the constant
    four = A.resize(np.zeros((8, 8, 4), np.uint8), None, 4, 4)[0]
    assert four.shape == (4, 4, 4)
    as_float, _ = A.resize(GRAY.astype(np.float32) / 255, None, 12, 16)
    assert as_float.dtype == np.float32 and 0.0 <= as_float.min() and as_float.max() <= 1.0


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="mask shape"):
        A.hflip(IMG, MASK[:-1])


# ----------------------------------------------------------------------------------------------- colour


def test_color_jitter_zero_is_identity_and_mask_is_untouched():
    mask = MASK.copy()
    out = A.color_jitter(IMG, np.random.default_rng(0))
    assert np.array_equal(out, IMG) and out is not IMG
    _, mask_out = A.hflip(out, mask)
    assert np.array_equal(mask, MASK) and np.array_equal(mask_out, MASK[:, ::-1])


def test_color_jitter_same_seed_same_output_and_strength_matters():
    a = A.color_jitter(IMG, np.random.default_rng(3), 0.4, 0.4, 0.4, 0.1)
    b = A.color_jitter(IMG, np.random.default_rng(3), 0.4, 0.4, 0.4, 0.1)
    c = A.color_jitter(IMG, np.random.default_rng(4), 0.4, 0.4, 0.4, 0.1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.shape == IMG.shape and a.dtype == np.uint8
    gray = A.color_jitter(GRAY, np.random.default_rng(3), 0.4, 0.4, 0.4, 0.1)
    assert gray.shape == GRAY.shape
    with pytest.raises(ValueError):
        A.color_jitter(IMG, np.random.default_rng(0), hue=0.6)


def test_color_jitter_brightness_draw_matches_torchvision_semantics():
    # With one op enabled: draws are permutation(4) then one uniform in [1-b, 1+b].
    rng = np.random.default_rng(11)
    rng.permutation(4)
    factor = rng.uniform(0.8, 1.2)
    out = A.color_jitter(IMG, np.random.default_rng(11), brightness=0.2)
    expected = np.clip(IMG.astype(float) * factor, 0, 255)
    assert np.abs(out.astype(float) - expected).max() <= 1.0


def test_single_colour_adjustments():
    assert np.abs(A.adjust_brightness(IMG, 0.5).astype(float) - IMG * 0.5).max() <= 1.0
    flat = A.adjust_contrast(IMG, 0.0)
    assert np.ptp(flat) <= 1  # contrast 0 is a uniform grey (the mean luma)
    grey = A.adjust_saturation(IMG, 0.0)
    assert np.abs(grey[..., 0].astype(int) - grey[..., 2]).max() <= 1
    assert np.array_equal(A.adjust_saturation(GRAY, 0.0), GRAY)  # grey has nothing to desaturate
    assert np.array_equal(A.adjust_hue(GRAY, 0.3), GRAY)
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    shifted = A.adjust_hue(red, 1 / 3)  # a third of a turn: red -> green
    assert shifted[0, 0, 1] > 240 and shifted[0, 0, 0] < 15 and shifted[0, 0, 2] < 15


def test_rgb_to_hsv_matches_colorsys():
    colours = RNG.integers(0, 256, (200, 3), dtype=np.uint8)
    hsv = A.rgb_to_hsv_u8(colours[None])[0].astype(int)
    for (r, g, b), (h, s, v) in zip(colours, hsv):
        eh, es, ev = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
        # OpenCV's fixed-point division rounds to within about half a unit.
        assert v == max(r, g, b) and abs(s - es * 255) <= 0.6
        assert min(abs(h - eh * 180), 180 - abs(h - eh * 180)) <= 0.6


def test_hue_saturation_value_exact_shifts():
    red = np.zeros((3, 3, 3), np.uint8)
    red[..., 0] = 255
    rng = np.random.default_rng(0)
    # Fixed limits (lo, hi) with lo == hi make the draw deterministic: +60 OpenCV units = 120 degrees.
    green = A.hue_saturation_value(
        red, rng, hue_shift_limit=(60, 60), sat_shift_limit=(0, 0), val_shift_limit=(0, 0)
    )
    assert (green == [0, 255, 0]).all()
    darker = A.hue_saturation_value(red, rng, (0, 0), (0, 0), (-55, -55))
    assert (darker == [200, 0, 0]).all()
    white = A.hue_saturation_value(red, rng, (0, 0), (-255, -255), (0, 0))
    assert (white == 255).all()
    # 0 - 30 wraps to 150 = 300 degrees, magenta; OpenCV's vectorised path truncates blue to 254.
    wrapped = A.hue_saturation_value(red, rng, (-30, -30), (0, 0), (0, 0))
    assert (wrapped[..., 0] == 255).all() and (wrapped[..., 1] == 0).all() and (wrapped[..., 2] >= 254).all()
    brighter_gray = A.hue_saturation_value(GRAY, rng, 20, 30, (10, 10))  # grey: value shift only
    assert np.array_equal(brighter_gray, np.clip(GRAY.astype(int) + 10, 0, 255).astype(np.uint8))


def test_hue_saturation_value_zero_shift_and_seeding():
    same = A.hue_saturation_value(IMG, np.random.default_rng(0), 0, 0, 0)
    # Only the 8-bit HSV round trip's loss: hue is stored in 2-degree steps (up to ~4 levels).
    error = np.abs(same.astype(int) - IMG)
    assert error.max() <= 5 and error.mean() < 1.0
    a = A.hue_saturation_value(IMG, np.random.default_rng(5))
    b = A.hue_saturation_value(IMG, np.random.default_rng(5))
    assert np.array_equal(a, b) and a.dtype == np.uint8 and a.shape == IMG.shape


# ----------------------------------------------------------------------------------------------- tensors


def test_to_tensor_image_normalises_per_channel():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tensor = A.to_tensor_image(IMG, mean, std)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 24, 32)
    expected = (IMG.astype(np.float64) / 255 - np.array(mean)) / np.array(std)
    assert np.allclose(tensor.numpy(), expected.transpose(2, 0, 1), atol=1e-5)
    gray = A.to_tensor_image(GRAY, (0.5,), (0.5,))
    assert gray.shape == (1, 24, 32) and np.allclose(gray.numpy()[0], GRAY / 127.5 - 1, atol=1e-5)
    with pytest.raises(ValueError):
        A.to_tensor_image(IMG, (0.5, 0.5), (0.5, 0.5))


def test_to_tensor_mask_is_exactly_binary():
    for mask in (MASK, MASK.astype(np.uint8) * 255, MASK.astype(np.uint8)):
        tensor = A.to_tensor_mask(mask)
        assert tensor.dtype == torch.float32 and tensor.shape == (1, 24, 32)
        assert set(torch.unique(tensor).tolist()) == {0.0, 1.0}
        assert torch.equal(tensor[0].bool(), torch.from_numpy(MASK))


def test_same_seed_same_pipeline_output():
    def pipeline(seed):
        rng = np.random.default_rng(seed)
        img, mask = A.rot90(IMG, MASK, int(rng.integers(4)))
        img, mask = A.rotate(img, mask, float(rng.uniform(-10, 10)))
        if rng.random() < 0.5:
            img, mask = A.hflip(img, mask)
        img = A.color_jitter(img, rng, 0.2, 0.2, 0, 0.02)
        return A.resize(img, mask, 16, 16)

    (a, am), (b, bm) = pipeline(42), pipeline(42)
    assert np.array_equal(a, b) and np.array_equal(am, bm)
