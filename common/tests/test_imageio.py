"""common.imageio: round trips, conversions, the mask policy and DataError on every kind of bad file."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image

from common.errors import DataError
from common.imageio import (
    IMAGE_EXTENSIONS,
    VOLUME_EXTENSIONS,
    Volume,
    binarize_mask,
    check_finite,
    read_image,
    read_label,
    read_mask,
    read_tiff_stack,
    read_volume,
    same_geometry,
    strip_volume_ext,
    write_png,
    write_tiff_stack,
    write_volume,
)
from common.testing import shared_data

RNG = np.random.default_rng(1234)


def _disk_mask(h: int = 48, w: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - h / 2) ** 2 + (xx - w / 3) ** 2 < 15**2


def _smooth_rgb(h: int = 40, w: int = 56) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=2).clip(0, 255).astype(np.uint8)


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _no_temp_files(folder: Path) -> bool:
    return not any(p.name.startswith(".tmp-") for p in folder.iterdir())


# ----------------------------------------------------------------------------------------------- 2-D round trips


def test_png_round_trip_rgb_gray_and_bool(tmp_path):
    rgb = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    gray = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
    mask = _disk_mask(20, 30)
    write_png(tmp_path / "rgb.png", rgb)
    write_png(tmp_path / "gray.png", gray)
    write_png(tmp_path / "mask.png", mask)
    assert np.array_equal(read_image(tmp_path / "rgb.png"), rgb)
    assert np.array_equal(read_image(tmp_path / "gray.png", "L"), gray)
    stored = np.array(Image.open(tmp_path / "mask.png"))
    assert set(np.unique(stored)) == {0, 255}  # bool is stored as 0/255
    assert np.array_equal(read_mask(tmp_path / "mask.png"), mask)
    assert _no_temp_files(tmp_path)


def test_write_png_replaces_existing_file_and_creates_folder(tmp_path):
    target = tmp_path / "sub" / "a.png"
    write_png(target, np.zeros((4, 4), np.uint8))
    write_png(target, np.full((4, 4), 9, np.uint8))
    assert np.array_equal(read_image(target, "L"), np.full((4, 4), 9, np.uint8))
    assert _no_temp_files(target.parent)
    with pytest.raises(ValueError):
        write_png(tmp_path / "bad.png", np.zeros((4, 4), np.float32))


def test_jpeg_round_trip_is_close(tmp_path):
    rgb = _smooth_rgb()
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb).mean() < 2.0


def test_tiff_and_bmp_first_page(tmp_path):
    gray = RNG.integers(0, 256, (16, 24), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", gray)
    Image.fromarray(gray).save(tmp_path / "a.bmp")
    assert np.array_equal(read_image(tmp_path / "a.tif", "L"), gray)
    assert np.array_equal(read_image(tmp_path / "a.bmp", "L"), gray)
    stack = RNG.integers(0, 256, (3, 16, 24), dtype=np.uint8)
    write_tiff_stack(tmp_path / "stack.tif", stack)
    assert np.array_equal(read_image(tmp_path / "stack.tif", "L"), stack[0])


def test_multipage_tiff_round_trip_and_pil_fallback(tmp_path, monkeypatch):
    stack = RNG.integers(0, 256, (5, 32, 40), dtype=np.uint8)
    path = tmp_path / "train-volume.tif"
    write_tiff_stack(path, stack)
    out = read_tiff_stack(path)
    assert out.shape == (5, 32, 40) and out.dtype == np.uint8
    assert np.array_equal(out, stack)

    import common.imageio as imageio

    def broken(_path):
        raise ValueError("simulated: compression needs imagecodecs")

    monkeypatch.setattr(imageio, "_tiff_pages_tifffile", broken)
    assert np.array_equal(read_tiff_stack(path), stack)  # PIL ImageSequence path

    single = tmp_path / "one.tif"
    tifffile.imwrite(single, stack[0])
    assert read_tiff_stack(single).shape == (1, 32, 40)


def test_rgba_drops_alpha_without_compositing(tmp_path):
    rgba = RNG.integers(0, 256, (10, 12, 4), dtype=np.uint8)
    rgba[..., 3] = RNG.integers(0, 256, (10, 12))  # alpha varies: a composite would change RGB
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png"), rgba[..., :3])


def test_gray_la_and_palette_convert_to_rgb(tmp_path):
    gray = RNG.integers(0, 256, (10, 12), dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (10, 12, 3)
    assert all(np.array_equal(out[..., c], gray) for c in range(3))

    la = np.stack([gray, np.full_like(gray, 17)], axis=2)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert np.array_equal(read_image(tmp_path / "la.png", "L"), gray)

    indices = RNG.integers(0, 3, (10, 12), dtype=np.uint8)
    palette = [10, 20, 30, 200, 100, 0, 5, 250, 60]
    pal = Image.fromarray(indices, "P")
    pal.putpalette(palette)
    pal.save(tmp_path / "p.png")
    expected = np.array(palette, np.uint8).reshape(3, 3)[indices]
    assert np.array_equal(read_image(tmp_path / "p.png"), expected)


def test_rgb_to_l_uses_luma(tmp_path):
    rgb = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    assert np.abs(read_image(tmp_path / "c.png", "L").astype(float) - luma).max() <= 1.0


def test_16bit_image_scaled_by_full_range(tmp_path):
    values = np.array([[0, 128, 129, 257], [32768, 65407, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "a16.png")
    assert Image.open(tmp_path / "a16.png").mode.startswith("I")
    expected = np.round(values / 257.0).astype(np.uint8)
    assert np.array_equal(read_image(tmp_path / "a16.png", "L"), expected)
    rgb = read_image(tmp_path / "a16.png")
    assert rgb.shape == (2, 4, 3) and np.array_equal(rgb[..., 1], expected)


def test_read_image_rejects_bad_mode_and_float(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", np.ones((4, 4), np.float32))
    with pytest.raises(DataError, match="float"):
        read_image(tmp_path / "f.tif")
    with pytest.raises(ValueError):
        read_image(tmp_path / "f.tif", mode="RGBA")


# ----------------------------------------------------------------------------------------------- mask policy


def test_mask_0_255_and_0_1(tmp_path):
    mask = _disk_mask()
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m255.png")
    Image.fromarray(mask.astype(np.uint8)).save(tmp_path / "m01.png")
    for name in ("m255.png", "m01.png"):
        out = read_mask(tmp_path / name)
        assert out.dtype == bool and np.array_equal(out, mask)


def test_mask_palette_indices_not_colours(tmp_path):
    mask = _disk_mask()
    pal = Image.fromarray(mask.astype(np.uint8), "P")
    pal.putpalette([0, 0, 0, 128, 0, 0])  # ISIC 2017 style: index 1 is dark red, below 128 as grey
    pal.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert np.array_equal(read_mask(tmp_path / "p.png"), mask)
    assert np.array_equal(read_label(tmp_path / "p.png"), mask.astype(np.uint8))


def test_mask_jpeg_compressed_close_to_truth(tmp_path):
    mask = _disk_mask(96, 128)
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.jpg", quality=75)
    decoded = np.array(Image.open(tmp_path / "m.jpg"))
    assert len(np.unique(decoded)) > 2  # the file really carries compression noise
    out = read_mask(tmp_path / "m.jpg")
    wrong = int(np.count_nonzero(out != mask))
    assert wrong <= 10, f"{wrong} pixels differ"


def test_mask_16bit_and_rgb_and_bilevel(tmp_path):
    mask = _disk_mask()
    Image.fromarray(mask.astype(np.uint16) * 65535).save(tmp_path / "m16.png")
    Image.fromarray(mask.astype(np.uint16) * 255).save(tmp_path / "m16_255.png")
    assert np.array_equal(read_mask(tmp_path / "m16.png"), mask)
    assert np.array_equal(read_mask(tmp_path / "m16_255.png"), mask)  # 16-bit file, 8-bit range

    rgb = np.zeros((*mask.shape, 3), np.uint8)
    rgb[mask, 1] = 255  # foreground drawn in green only: "any channel" must catch it
    Image.fromarray(rgb).save(tmp_path / "mrgb.png")
    assert np.array_equal(read_mask(tmp_path / "mrgb.png"), mask)

    Image.fromarray(mask).convert("1").save(tmp_path / "m1.png")
    assert np.array_equal(read_mask(tmp_path / "m1.png"), mask)


def test_mask_threshold_rule_and_refusals():
    assert np.array_equal(
        binarize_mask(np.array([[0, 127, 128, 255]], np.uint8)), [[False, False, True, True]]
    )
    assert np.array_equal(
        binarize_mask(np.array([[0, 32767, 32768, 65535]], np.uint16)), [[False, False, True, True]]
    )
    assert np.array_equal(binarize_mask(np.array([[0.0, 1.0]], np.float32)), [[False, True]])
    with pytest.raises(DataError, match="read_label"):
        binarize_mask(np.array([[0, 1, 2]], np.uint8), "labels.png")
    with pytest.raises(DataError, match="negative"):
        binarize_mask(np.array([[0, -1]], np.int32))
    with pytest.raises(DataError, match="65535"):
        binarize_mask(np.array([[0, 70000]], np.int32))
    with pytest.raises(DataError, match="channels"):
        binarize_mask(np.zeros((2, 2, 5), np.uint8))


def test_read_label_keeps_values_and_refuses_colour(tmp_path):
    labels = RNG.integers(0, 6, (10, 12), dtype=np.uint8)
    Image.fromarray(labels).save(tmp_path / "l.png")
    assert np.array_equal(read_label(tmp_path / "l.png"), labels)
    grey_rgb = np.repeat(labels[:, :, None], 3, axis=2)
    Image.fromarray(grey_rgb).save(tmp_path / "lrgb.png")
    assert np.array_equal(read_label(tmp_path / "lrgb.png"), labels)
    colour = grey_rgb.copy()
    colour[0, 0] = (1, 2, 3)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(DataError, match="colour"):
        read_label(tmp_path / "colour.png")


# ----------------------------------------------------------------------------------------------- bad 2-D files


@pytest.mark.parametrize("ext", [".jpg", ".png", ".tif"])
def test_truncated_image_raises_data_error_naming_file(tmp_path, ext):
    path = tmp_path / f"broken_sample{ext}"
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    _truncate(path)
    for reader in (read_image, read_mask):
        with pytest.raises(DataError) as info:
            reader(path)
        assert "broken_sample" in str(info.value) and "cannot decode" in str(info.value)
        assert info.value.path == path


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL's fallback reader warns before it fails
def test_truncated_multipage_tiff_raises(tmp_path):
    path = tmp_path / "stack.tif"
    write_tiff_stack(path, RNG.integers(0, 256, (5, 64, 64), dtype=np.uint8))
    with tifffile.TiffFile(path) as tif:
        third_page = tif.pages[3].offset
    data = path.read_bytes()
    for cut in (len(data) // 2, third_page):  # inside pixel data, and exactly at a page boundary
        path.write_bytes(data[:cut])
        with pytest.raises(DataError, match="stack.tif"):
            read_tiff_stack(path)


def test_missing_directory_and_non_image_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(DataError, match="directory"):
        read_image(tmp_path)
    (tmp_path / "text.png").write_text("this is not a png")
    with pytest.raises(DataError, match="text.png"):
        read_mask(tmp_path / "text.png")


# ----------------------------------------------------------------------------------------------- volumes

# A direction matrix that is a real rotation, not the identity, so a geometry bug shows.
_DIRECTION = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _volume(dtype=np.int16) -> Volume:
    array = RNG.integers(-1000, 1000, (6, 7, 8)).astype(dtype)
    return Volume(
        array=array, spacing=(2.5, 0.75, 0.8), origin=(-198.1, -195.0, -335.2), direction=_DIRECTION
    )


@pytest.mark.parametrize(
    "name, compress",
    [
        ("ct.mhd", False),
        ("ct.mhd", True),
        ("ct.nii.gz", True),
        ("ct.nii", False),
        ("ct.nrrd", True),
        ("ct.mha", True),
    ],
)
def test_volume_round_trip_keeps_geometry(tmp_path, name, compress):
    vol = _volume()
    write_volume(tmp_path / name, vol.array, like=vol, compress=compress)
    if name.endswith(".mhd"):
        assert (tmp_path / ("ct.zraw" if compress else "ct.raw")).exists()
    back = read_volume(tmp_path / name)
    assert back.array.dtype == np.int16
    assert np.array_equal(back.array, vol.array)
    assert same_geometry(back, vol, tol=1e-4) is None, same_geometry(back, vol)
    assert np.allclose(back.spacing, (2.5, 0.75, 0.8))
    assert _no_temp_files(tmp_path)


def test_write_volume_explicit_geometry_and_checks(tmp_path):
    mask = np.zeros((3, 4, 5), bool)
    mask[1, 2, 3] = True
    write_volume(tmp_path / "m.nii.gz", mask, spacing=(3.0, 2.0, 1.0), origin=(1.0, 2.0, 3.0))
    back = read_volume(tmp_path / "m.nii.gz")
    assert back.array.dtype == np.uint8 and back.array.sum() == 1 and back.array[1, 2, 3] == 1
    assert np.allclose(back.spacing, (3.0, 2.0, 1.0)) and np.allclose(back.origin, (1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="shape"):
        write_volume(tmp_path / "x.nii.gz", np.zeros((2, 2, 2)), like=_volume())
    with pytest.raises(ValueError):
        write_volume(tmp_path / "x.png", np.zeros((2, 2, 2)))


def _write_mhd(tmp_path: Path, compress: bool) -> tuple[Path, Path]:
    vol = _volume()
    header = tmp_path / "case.mhd"
    write_volume(header, vol.array, like=vol, compress=compress)
    return header, tmp_path / ("case.zraw" if compress else "case.raw")


def test_mhd_missing_data_file(tmp_path):
    header, raw = _write_mhd(tmp_path, compress=False)
    raw.unlink()
    with pytest.raises(DataError) as info:
        read_volume(header)
    assert info.value.path == raw and "missing" in str(info.value) and "case.mhd" in str(info.value)


def test_mhd_short_raw_reports_expected_and_actual_size(tmp_path):
    header, raw = _write_mhd(tmp_path, compress=False)
    expected = 6 * 7 * 8 * 2
    _truncate(raw)
    with pytest.raises(DataError) as info:
        read_volume(header)
    message = str(info.value)
    assert info.value.path == raw and str(expected) in message and str(expected // 2) in message


def test_mhd_long_raw_is_a_header_mismatch(tmp_path):
    header, raw = _write_mhd(tmp_path, compress=False)
    raw.write_bytes(raw.read_bytes() * 2)
    with pytest.raises(DataError, match="ElementType"):
        read_volume(header)


def test_mhd_short_zraw(tmp_path):
    header, zraw = _write_mhd(tmp_path, compress=True)
    _truncate(zraw)
    with pytest.raises(DataError, match="CompressedDataSize") as info:
        read_volume(header)
    assert info.value.path == zraw


def test_corrupt_nii_gz(tmp_path):
    vol = _volume(np.float32)
    path = tmp_path / "case.nii.gz"
    write_volume(path, vol.array, like=vol)
    original = path.read_bytes()
    _truncate(path, 0.6)  # SimpleITK alone would read this silently, filling zeros
    with pytest.raises(DataError, match="case.nii.gz"):
        read_volume(path)
    damaged = bytearray(original)
    for i in range(len(damaged) // 2, len(damaged) // 2 + 64):
        damaged[i] ^= 0x5A
    path.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match="case.nii.gz"):
        read_volume(path)
    path.write_bytes(gzip.compress(b"not a nifti header at all" * 40))
    with pytest.raises(DataError, match="NIfTI"):
        read_volume(path)


def test_read_volume_rejects_unknown_extension_and_2d(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="volume"):
        read_volume(tmp_path / "a.png")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), np.uint8)), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(DataError, match="3-D"):
        read_volume(tmp_path / "flat.nii.gz")


def test_check_finite_counts():
    arr = np.zeros((2, 3, 4), np.float32)
    arr[0, 0, 0] = np.nan
    arr[1, 1, 1] = np.nan
    arr[1, 2, 3] = -np.inf
    with pytest.raises(DataError) as info:
        check_finite(arr, "ct.nii.gz")
    message = str(info.value)
    assert "ct.nii.gz" in message and "3 of 24" in message and "2 NaN" in message and "1 infinite" in message
    check_finite(np.ones(5, np.float32), "ok")
    check_finite(np.arange(5), "ints")


def test_same_geometry_reports_each_difference():
    a = _volume()
    assert same_geometry(a, Volume(a.array.copy(), a.spacing, a.origin, a.direction)) is None
    assert same_geometry(a, Volume(a.array[:-1], a.spacing, a.origin, a.direction)).startswith("shape")
    assert same_geometry(a, Volume(a.array, (2.5, 0.75, 0.9), a.origin, a.direction)).startswith("spacing")
    assert same_geometry(a, Volume(a.array, a.spacing, (-198.1, -195.0, -335.0), a.direction)).startswith(
        "origin"
    )
    eye = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert same_geometry(a, Volume(a.array, a.spacing, a.origin, eye)).startswith("direction")
    nudged = Volume(a.array, (2.5 + 5e-5, 0.75, 0.8), a.origin, a.direction)
    assert same_geometry(a, nudged) is None and same_geometry(a, nudged, tol=1e-6) is not None


def test_extensions_and_strip():
    assert ".nii.gz" in VOLUME_EXTENSIONS and ".mhd" in VOLUME_EXTENSIONS and ".png" in IMAGE_EXTENSIONS
    assert strip_volume_ext("hippocampus_001.nii.gz") == "hippocampus_001"
    assert strip_volume_ext("CASE.NII.GZ") == "CASE"
    assert strip_volume_ext("1.3.6.1.4.mhd") == "1.3.6.1.4"
    assert strip_volume_ext("a.png") == "a.png"


# ----------------------------------------------------------------------------------------------- real data


@pytest.mark.shared_data
def test_real_dsb2018_rgba_image_and_instance_mask():
    root = shared_data("dsb2018", "stage1_train")
    case = sorted(p for p in root.iterdir() if p.is_dir())[0]
    image_path = case / "images" / f"{case.name}.png"
    raw = np.array(Image.open(image_path))
    assert raw.ndim == 3 and raw.shape[2] == 4 and (raw[..., 3] == 255).all()  # README: RGBA, alpha 255
    image = read_image(image_path)
    assert image.dtype == np.uint8 and np.array_equal(image, raw[..., :3])
    mask_path = sorted((case / "masks").glob("*.png"))[0]
    mask = read_mask(mask_path)
    assert mask.shape == image.shape[:2] and mask.dtype == bool and 0 < mask.sum() < mask.size


@pytest.mark.shared_data
def test_real_isic2018_jpeg_and_mask():
    root = shared_data("isic2018")
    image_path = sorted((root / "ISIC2018_Task1-2_Training_Input").glob("*.jpg"))[0]
    mask_path = root / "ISIC2018_Task1_Training_GroundTruth" / f"{image_path.stem}_segmentation.png"
    image, mask = read_image(image_path), read_mask(mask_path)
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    assert mask.shape == image.shape[:2] and mask.dtype == bool
    assert np.array_equal(mask, np.array(Image.open(mask_path)) == 255)  # README: values {0, 255}


@pytest.mark.shared_data
def test_real_isbi2012_tif_slice():
    root = shared_data("isbi2012", "train")
    image = read_image(root / "images" / "0.tif", "L")
    assert image.shape == (512, 512) and image.dtype == np.uint8
    cells = read_mask(root / "labels" / "0.tif")  # 255 = cell interior
    assert cells.shape == (512, 512) and 0.73 <= cells.mean() <= 0.83


@pytest.mark.shared_data
def test_real_luna16_mhd_zraw_lung_mask():
    header = shared_data(
        "luna16", "seg-lungs-LUNA16", "1.3.6.1.4.1.14519.5.2.1.6279.6001.105756658031515062000744821260.mhd"
    )
    vol = read_volume(header)
    assert vol.array.shape == (121, 512, 512) and vol.array.dtype == np.int16
    assert set(np.unique(vol.array).tolist()) == {0, 3, 4, 5}
    assert np.allclose(vol.spacing, (2.5, 0.7617189884185791, 0.7617189884185791))
    assert np.allclose(vol.origin, (-198.100006, -195.0, -335.209991))


@pytest.mark.shared_data
def test_real_msd_hippocampus_nii_gz_pair():
    root = shared_data("msd_hippocampus_3d")
    image = read_volume(root / "imagesTr" / "hippocampus_001.nii.gz")
    label = read_volume(root / "labelsTr" / "hippocampus_001.nii.gz")
    assert image.array.ndim == 3 and image.array.dtype == np.uint8  # README: 001 is stored as uint8
    assert same_geometry(image, label) is None
    assert np.allclose(image.spacing, (1.0, 1.0, 1.0))
    assert set(np.unique(label.array).tolist()) == {0, 1, 2}
    float_image = read_volume(root / "imagesTr" / "hippocampus_004.nii.gz")
    assert float_image.array.dtype == np.float32
    check_finite(float_image.array, "hippocampus_004.nii.gz")
