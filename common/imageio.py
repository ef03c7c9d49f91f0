"""Reading and writing the images, masks and volumes of every model folder, with one error policy.

Every read failure a user can cause (missing file, truncated download, wrong header, a mask that is not
binary) raises `common.errors.DataError(path, problem)`, so the message names the file and says what is
wrong, at the moment the file is read and not three epochs later inside a DataLoader worker.

2-D
    `read_image(path, mode)`   -> uint8 (H, W, 3) or (H, W); JPEG, PNG, TIFF (first page), BMP.
    `read_mask(path)`          -> bool (H, W) under the mask policy of `binarize_mask`.
    `read_label(path)`         -> raw integer labels (H, W), no binarisation.
    `read_tiff_stack(path)`    -> (pages, H, W) from a multipage TIFF (ISBI 2012 train-volume.tif).
    `write_png`, `write_tiff_stack` write atomically (temporary file in the same folder + os.replace).
3-D
    `Volume` (array z,y,x + SimpleITK geometry), `read_volume`, `write_volume`, `same_geometry`,
    `check_finite` for .mhd/.mha (+ .raw/.zraw), .nii, .nii.gz and .nrrd through SimpleITK.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageSequence

from common.errors import DataError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".mhd", ".mha", ".nrrd", ".nhdr")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_SITK_SINGLE_FILE = (".nii.gz", ".nii", ".mha", ".nrrd")


# ----------------------------------------------------------------------------------------------- helpers


def _require_file(path: Path) -> None:
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        raise DataError(path, "is a directory, expected a file")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then os.replace it onto `path`.

    A reader (another rank, a resumed run) therefore sees either the old file or the complete new one,
    never a half-written one. The temporary name keeps the full suffix because SimpleITK picks its
    writer from the extension.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{uuid.uuid4().hex[:12]}-{path.name}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _decode_failure(path: Path, exc: BaseException) -> DataError:
    return DataError(path, f"cannot decode: truncated or not an image ({exc})")


def _open_decoded(path: Path) -> Image.Image:
    """Open with PIL and force the full decode, so a truncated file fails here.

    PIL is lazy: Image.open only parses the header, and pixel data is decoded on first access. We call
    .load() so the failure surfaces inside the reader with the file name attached. We deliberately do
    not set ImageFile.LOAD_TRUNCATED_IMAGES: it would turn a truncated download into grey pixels.
    """
    _require_file(path)
    try:
        im = Image.open(path)
    except PermissionError as exc:
        raise DataError(path, "cannot be read: permission denied") from exc
    except Image.DecompressionBombError as exc:
        raise DataError(path, f"image is larger than PIL's safety limit ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise _decode_failure(path, exc) from exc
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
        im.close()
        raise _decode_failure(path, exc) from exc
    return im


def _scale_16bit(arr: np.ndarray) -> np.ndarray:
    """16-bit -> uint8 by the fixed range 0..65535 (value * 255 / 65535, rounded).

    A fixed range keeps the contrast between images comparable; a per-image min/max stretch would
    not. A 12-bit camera image (0..4095) therefore comes out dark (0..16): rescale such data yourself
    before training if that matters. 32-bit 'I' images are clipped to 0..65535 first.
    """
    v = np.clip(arr.astype(np.int64), 0, 65535)
    return ((v + 128) // 257).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- 2-D read


def read_image(path: str | Path, mode: str = "RGB") -> np.ndarray:
    """Decode an image to uint8: mode "RGB" -> (H, W, 3), mode "L" -> (H, W).

    Conversions:
    - RGBA/LA: the alpha channel is dropped, not composited. DSB 2018 stage1 images are RGBA PNGs whose
      alpha is always 255, so dropping it is exact there.
    - palette, grayscale and bilevel images -> RGB by PIL's conversion (grey replicated in 3 channels).
    - RGB -> "L" by PIL's ITU-R 601-2 luma (L = 0.299 R + 0.587 G + 0.114 B).
    - 16-bit (I;16*) and 32-bit integer (I) images are scaled to uint8 by the fixed range 0..65535.
    - TIFF: the first page only (use `read_tiff_stack` for all pages).
    - 32-bit float images are refused: there is no range to scale them by.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"read_image mode must be 'RGB' or 'L', got {mode!r}")
    path = Path(path)
    with _open_decoded(path) as im:
        src = im.mode
        if src in _SIXTEEN_BIT_MODES:
            gray = _scale_16bit(np.asarray(im))
            return gray if mode == "L" else np.repeat(gray[:, :, None], 3, axis=2)
        if src == "F":
            raise DataError(
                path, "32-bit float image: expected 8- or 16-bit integer pixels; convert it first"
            )
        if src != mode:
            im = im.convert(mode)
        return np.array(im, dtype=np.uint8)


def binarize_mask(array: np.ndarray, path: str | Path | None = None) -> np.ndarray:
    """Apply the mask policy to a decoded mask array; returns bool (H, W).

    Rule (the same for every dataset):
    1. Colour masks (H, W, 3|4): alpha is dropped and a pixel is foreground when ANY channel is
       foreground by the rule below (we test the channel maximum). (H, W, 2) gray+alpha: the gray.
    2. A mask whose values are all in {0, 1} is taken as 0/1 (ISIC 2017 palette PNGs store indices
       {0, 1}; many tools write 0/1 PNGs).
    3. Otherwise the range is 0..255 if every value is <= 255, else 0..65535, and
       foreground = value > range / 2, i.e. >= 128 for 8-bit data and >= 32768 for 16-bit data. This
       keeps JPEG-compressed masks (values near 0 and 255) correct to within the compression noise, and
       reads a 16-bit PNG holding 0/255 as 8-bit data.
    Refused with DataError: negative values, values above 65535, and masks with values above 1 of which
    none reaches the threshold (for example labels {0, 1, 2} or a probability map): those would silently
    become empty masks; read them with `read_label` and pick the foreground classes.
    """
    arr = np.asarray(array)
    if arr.ndim == 3:
        channels = arr.shape[2]
        if channels == 1:
            arr = arr[:, :, 0]
        elif channels == 2:
            arr = arr[:, :, 0]
        elif channels in (3, 4):
            arr = arr[:, :, :3].max(axis=2)
        else:
            raise DataError(path, f"mask has {channels} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA)")
    if arr.ndim != 2:
        raise DataError(path, f"mask has shape {arr.shape}; expected (H, W) or (H, W, C)")
    if arr.dtype == bool:
        return arr.copy()
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=bool)
    vmin, vmax = arr.min(), arr.max()
    if not (np.isfinite(vmin) and np.isfinite(vmax)):
        raise DataError(path, "mask contains NaN or infinite values")
    if vmin < 0:
        raise DataError(path, f"mask has negative values (min {vmin}); expected 0/1, 0/255 or 0/65535")
    if vmax <= 1 and (arr.dtype.kind in "iub" or bool(np.all((arr == 0) | (arr == 1)))):
        return arr == 1
    if vmax > 65535:
        raise DataError(path, f"mask values reach {vmax}; expected 0/1, 0/255 or 0/65535")
    full = 255 if vmax <= 255 else 65535
    threshold = full / 2
    if vmax <= threshold:
        values = np.unique(arr)
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if values.size > 8 else "")
        raise DataError(
            path,
            f"mask values {{{shown}}} are neither 0/1 nor 0/{full}: the largest, {vmax}, is below the "
            f"foreground threshold {threshold:g}, so the mask would be empty. If this is a label map, "
            "read it with read_label() and choose the foreground classes",
        )
    return arr > threshold


def read_mask(path: str | Path) -> np.ndarray:
    """Decode a binary mask to bool (H, W) under the policy documented in `binarize_mask`.

    Accepts 0/255 and 0/1 PNGs, palette PNGs (their indices are used, not their colours, so {0, 1}
    palette masks work), 16-bit masks, RGB/RGBA masks and JPEG-compressed masks.
    """
    path = Path(path)
    with _open_decoded(path) as im:
        if im.mode == "1":
            return np.array(im, dtype=bool)
        if im.mode not in ("P", "L", "LA", "RGB", "RGBA", "F", *_SIXTEEN_BIT_MODES):
            im = im.convert("RGB")
        arr = np.array(im)
    return binarize_mask(arr, path)


def read_label(path: str | Path) -> np.ndarray:
    """Decode an integer label map (H, W) without binarisation (palette PNGs give their indices).

    Colour images are accepted only when the three channels are equal (a grey label map saved as RGB).
    """
    path = Path(path)
    with _open_decoded(path) as im:
        if im.mode == "1":
            return np.array(im, dtype=np.uint8)
        if im.mode == "F":
            raise DataError(path, "label map has float pixels; expected integer labels")
        if im.mode not in ("P", "L", "LA", "RGB", "RGBA", *_SIXTEEN_BIT_MODES):
            im = im.convert("RGB")
        arr = np.array(im)
    if arr.ndim == 3:
        if arr.shape[2] == 2:
            return arr[:, :, 0].copy()
        rgb = arr[:, :, :3]
        if not (np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2])):
            raise DataError(
                path, "label map has distinct colour channels; expected a single-channel label map"
            )
        return rgb[:, :, 0].copy()
    return arr


# ----------------------------------------------------------------------------------------------- TIFF stacks


def _tiff_pages_tifffile(path: Path) -> list[np.ndarray]:
    import logging

    import tifffile

    # tifffile only logs (it does not raise) when the chain of pages points past the end of the file,
    # which is what a multipage TIFF cut at a page boundary looks like; we turn that into an error.
    warnings: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    logger = logging.getLogger("tifffile")
    handler = _Collect(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        with tifffile.TiffFile(path) as tif:
            pages = [page.asarray() for page in tif.pages]
    finally:
        logger.removeHandler(handler)
    broken = [w for w in warnings if "invalid page offset" in w or "truncat" in w.lower()]
    if broken:
        raise ValueError(broken[0])
    return pages


def _tiff_pages_pil(path: Path) -> list[np.ndarray]:
    import warnings

    # PIL only warns when a tag points past the end of the file or EXIF data is corrupt, then carries on
    # with what it could read (a damaged IFD chain comes out as fewer pages): that file is broken.
    with warnings.catch_warnings(record=True) as caught, Image.open(path) as im:
        warnings.simplefilter("always")
        pages = []
        for frame in ImageSequence.Iterator(im):
            frame.load()
            pages.append(np.array(frame))
    broken = [
        str(w.message) for w in caught if "larger than file" in str(w.message) or "Corrupt" in str(w.message)
    ]
    if broken:
        raise ValueError(broken[0])
    return pages


def read_tiff_stack(path: str | Path) -> np.ndarray:
    """Read every page of a (multipage) TIFF -> (pages, H, W), or (pages, H, W, C) for colour pages.

    Uses tifffile and falls back to PIL's ImageSequence when tifffile cannot decode the file (for
    example LZW compression without the optional imagecodecs package). Pixel values are returned
    unchanged (no scaling). A truncated file raises DataError.
    """
    path = Path(path)
    _require_file(path)
    try:
        pages = _tiff_pages_tifffile(path)
    except Exception as tiff_exc:  # tifffile raises many types (ValueError, TiffFileError, KeyError, ...)
        try:
            pages = _tiff_pages_pil(path)
        except Exception as pil_exc:
            raise DataError(
                path,
                f"cannot decode TIFF stack: truncated or not a TIFF (tifffile: {tiff_exc}; PIL: {pil_exc})",
            ) from tiff_exc
    if not pages:
        raise DataError(path, "TIFF file has no pages")
    shapes = {p.shape for p in pages}
    if len(shapes) != 1:
        raise DataError(path, f"TIFF pages differ in shape: {sorted(shapes)}")
    return np.stack(pages)


def write_tiff_stack(path: str | Path, array: np.ndarray) -> None:
    """Write (pages, H, W) grayscale or (pages, H, W, 3|4) colour pages as one multipage TIFF, atomically."""
    import tifffile

    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 3:
        photometric = "minisblack"
    elif arr.ndim == 4 and arr.shape[3] in (3, 4):
        photometric = "rgb"
    else:
        raise ValueError(f"write_tiff_stack expects (pages, H, W) or (pages, H, W, 3|4), got {arr.shape}")
    _atomic_write(Path(path), lambda tmp: tifffile.imwrite(tmp, arr, photometric=photometric))


# ----------------------------------------------------------------------------------------------- PNG write


def write_png(path: str | Path, array: np.ndarray) -> None:
    """Write a PNG atomically. bool masks become 0/255 uint8; uint8 (H, W), (H, W, 3), (H, W, 4) and
    uint16 (H, W) are written as they are."""
    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        if arr.ndim == 3:
            image = Image.fromarray(np.ascontiguousarray(arr), "RGB" if arr.shape[2] == 3 else "RGBA")
        else:
            image = Image.fromarray(np.ascontiguousarray(arr), "L")
    elif arr.dtype == np.uint16 and arr.ndim == 2:
        image = Image.fromarray(np.ascontiguousarray(arr))
    else:
        raise ValueError(
            f"write_png expects bool or uint8 (H,W[,3|4]) or uint16 (H,W); got {arr.dtype} {arr.shape}"
        )
    _atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))


# ----------------------------------------------------------------------------------------------- volumes


@dataclass
class Volume:
    """A 3-D image and its physical geometry.

    array: numpy array with axes (z, y, x), as SimpleITK's GetArrayFromImage returns it.
    spacing: voxel size in mm in the ARRAY order (z, y, x), i.e. reversed from SimpleITK's GetSpacing.
    origin: world position of voxel (0, 0, 0) in mm, in SimpleITK order (x, y, z).
    direction: 9 direction cosines, row-major, in SimpleITK order.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


def volume_ext(name: str | Path) -> str | None:
    """The volume extension of a file name (".nii.gz" counts as one), lower case, or None."""
    lower = Path(name).name.lower()
    for ext in sorted(VOLUME_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return ext
    return None


def strip_volume_ext(name: str | Path) -> str:
    """File name without its volume extension: "case_01.nii.gz" -> "case_01"; other names unchanged."""
    base = Path(name).name
    ext = volume_ext(base)
    return base[: -len(ext)] if ext else base


# MetaImage element sizes; MET_LONG/MET_ULONG are left out on purpose (their width varies by writer).
_MET_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


def _parse_metaimage_header(path: Path) -> tuple[dict[str, str], int]:
    """Key/value pairs of a MetaImage header and the byte length of the header (where LOCAL data starts)."""
    fields: dict[str, str] = {}
    with open(path, "rb") as fh:
        raw = fh.read(1 << 16)
    offset = 0
    for line in raw.splitlines(keepends=True):
        offset += len(line)
        text = line.decode("latin-1").strip()
        if "=" not in text:
            continue
        key, value = (part.strip() for part in text.split("=", 1))
        fields[key] = value
        if key == "ElementDataFile":  # always the last field; binary data may follow
            break
    return fields, offset


def _check_metaimage(path: Path) -> None:
    """Check the data file a .mhd/.mha header names before SimpleITK reads it.

    SimpleITK's own message for a missing or short data file names the header and blames
    "No such file or directory", so we check existence and size first and name the data file.
    """
    fields, header_len = _parse_metaimage_header(path)
    data_name = fields.get("ElementDataFile")
    if not data_name:
        raise DataError(path, "MetaImage header has no ElementDataFile line")
    try:
        dims = [int(v) for v in fields.get("DimSize", "").split()]
    except ValueError:
        raise DataError(
            path, f"MetaImage DimSize is not a list of integers: {fields.get('DimSize')!r}"
        ) from None
    if not dims:
        raise DataError(path, "MetaImage header has no DimSize line")
    if data_name.upper() == "LIST" or "%" in data_name or fields.get("BinaryData", "True").lower() != "true":
        return  # one file per slice, or ASCII data: SimpleITK checks those
    if data_name.upper() == "LOCAL":
        data_path, start = path, header_len
    else:
        data_path = Path(data_name) if os.path.isabs(data_name) else path.parent / data_name
        start = 0
        if not data_path.is_file():
            raise DataError(
                data_path, f"data file named by {path.name} (ElementDataFile = {data_name}) is missing"
            )
    actual = data_path.stat().st_size - start
    if fields.get("CompressedData", "False").lower() == "true":
        size = fields.get("CompressedDataSize")
        if size and size.isdigit() and actual < int(size):
            raise DataError(
                data_path,
                f"compressed data is too short: {path.name} says CompressedDataSize = {size} bytes, "
                f"the file holds {actual}",
            )
        return
    element = _MET_BYTES.get(fields.get("ElementType", ""))
    if element is None:
        return
    channels = int(fields.get("ElementNumberOfChannels", "1") or 1)
    expected = math.prod(dims) * element * channels
    header_size = int(fields.get("HeaderSize", "0") or 0)
    what = f"{'x'.join(map(str, dims))} x {fields['ElementType']}" + (
        f" x {channels}" if channels > 1 else ""
    )
    if actual < expected + max(header_size, 0):
        raise DataError(
            data_path,
            f"data file is too short: {path.name} expects {expected} bytes ({what}), the file holds {actual}",
        )
    if header_size == 0 and actual > expected and start == 0:
        raise DataError(
            data_path,
            f"data file is larger than {path.name} says: expected {expected} bytes ({what}), found {actual}; "
            "DimSize or ElementType in the header does not match the data",
        )


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Uncompressed file size a NIfTI-1/-2 header implies (vox_offset + voxels * bitpix / 8), or None."""
    if len(header) < 348:
        return None
    for endian in "<>":
        (sizeof_hdr,) = struct.unpack(endian + "i", header[:4])
        if sizeof_hdr == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            (bitpix,) = struct.unpack(endian + "h", header[72:74])
            (vox_offset,) = struct.unpack(endian + "f", header[108:112])
            break
        if sizeof_hdr == 540 and len(header) >= 540:
            (bitpix,) = struct.unpack(endian + "h", header[14:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            (vox_offset,) = struct.unpack(endian + "q", header[168:176])
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or any(d <= 0 for d in dims[1 : ndim + 1]) or bitpix <= 0:
        return None
    return int(vox_offset) + math.prod(dims[1 : ndim + 1]) * bitpix // 8


def _check_gzip_nifti(path: Path) -> None:
    """Detect a truncated or damaged .nii.gz before SimpleITK, which reads a truncated one silently
    (the missing voxels come back as zeros).

    Cheap test first: the gzip trailer stores the uncompressed size mod 2**32, which must match the
    size the NIfTI header implies. Only on a mismatch do we decompress the whole stream to tell
    truncation/corruption from harmless cases (trailing bytes, multi-member gzip).
    """
    with open(path, "rb") as fh:
        if fh.read(2) != b"\x1f\x8b":
            return  # not gzip at all: SimpleITK reports what it makes of it
        fh.seek(0, os.SEEK_END)
        if fh.tell() < 18:
            raise DataError(path, "gzip file is truncated (shorter than a gzip header and trailer)")
        fh.seek(-4, os.SEEK_END)
        (isize,) = struct.unpack("<I", fh.read(4))
    try:
        with gzip.open(path, "rb") as gz:
            header = gz.read(540)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(path, f"corrupt gzip stream ({exc})") from exc
    expected = _nifti_expected_bytes(header)
    if expected is None:
        raise DataError(path, "not a NIfTI file: the decompressed header is not a NIfTI-1 or NIfTI-2 header")
    if expected % (1 << 32) == isize:
        return
    total = 0
    try:
        with gzip.open(path, "rb") as gz:
            while chunk := gz.read(1 << 22):
                total += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(path, f"truncated or corrupt gzip: {exc}") from exc
    if total < expected:
        raise DataError(
            path, f"NIfTI data is too short: the header implies {expected} bytes, the file holds {total}"
        )


def _sitk_reason(exc: BaseException) -> str:
    """The useful part of a SimpleITK exception (it starts with the C++ source location)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Exception thrown in SimpleITK")]
    text = " ".join(lines) or str(exc)
    if "Unable to determine ImageIO reader" in text:
        return "no SimpleITK reader accepts it: the file is damaged or not in the format its extension says"
    return text


def read_volume(path: str | Path) -> Volume:
    """Read a 3-D volume (.mhd/.mha + .raw/.zraw, .nii, .nii.gz, .nrrd/.nhdr) with SimpleITK.

    Before SimpleITK runs, a .mhd header is parsed and its data file is checked (missing, shorter
    than DimSize x ElementType, shorter than CompressedDataSize), and a .nii.gz is checked for
    truncation; the DataError names the data file and gives the expected and actual sizes.
    Non-finite values are not checked here; call `check_finite` on float data.
    """
    import SimpleITK as sitk

    path = Path(path)
    _require_file(path)
    ext = volume_ext(path)
    if ext is None:
        raise DataError(path, f"not a volume file; expected one of {', '.join(VOLUME_EXTENSIONS)}")
    if ext in (".mhd", ".mha"):
        _check_metaimage(path)
    elif ext == ".nii.gz":
        _check_gzip_nifti(path)
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        image = reader.Execute()
    except RuntimeError as exc:
        raise DataError(path, f"cannot read volume ({_sitk_reason(exc)})") from exc
    if image.GetDimension() != 3:
        raise DataError(
            path, f"expected a 3-D volume, found {image.GetDimension()}-D of size {image.GetSize()}"
        )
    return Volume(
        array=sitk.GetArrayFromImage(image),
        spacing=tuple(float(s) for s in reversed(image.GetSpacing())),
        origin=tuple(float(o) for o in image.GetOrigin()),
        direction=tuple(float(d) for d in image.GetDirection()),
    )


def write_volume(
    path: str | Path,
    array: np.ndarray,
    like: Volume | None = None,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    direction: Sequence[float] | None = None,
    compress: bool = True,
) -> None:
    """Write a (z, y, x) array as a volume with the geometry of `like` (explicit arguments override it).

    `spacing` is in array order (z, y, x) like `Volume.spacing`; origin and direction in SimpleITK order.
    bool arrays are written as uint8 0/1. `compress` selects .zraw for .mhd and gzip encoding for
    .nrrd (.nii.gz is always compressed, .nii never). Single-file formats are written atomically; a .mhd
    writes two files and is not.
    """
    import SimpleITK as sitk

    path = Path(path)
    ext = volume_ext(path)
    if ext is None or ext == ".nhdr":
        raise ValueError(
            f"{path}: write_volume supports {', '.join(e for e in VOLUME_EXTENSIONS if e != '.nhdr')}"
        )
    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.ndim != 3:
        raise ValueError(f"write_volume expects a 3-D (z, y, x) array, got shape {arr.shape}")
    if like is not None and tuple(like.array.shape) != arr.shape:
        raise ValueError(
            f"array shape {arr.shape} differs from the reference volume's {tuple(like.array.shape)}"
        )
    spacing = spacing if spacing is not None else (like.spacing if like is not None else (1.0, 1.0, 1.0))
    origin = origin if origin is not None else (like.origin if like is not None else (0.0, 0.0, 0.0))
    direction = direction if direction is not None else (like.direction if like is not None else None)
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    image.SetSpacing([float(s) for s in reversed(tuple(spacing))])
    image.SetOrigin([float(o) for o in origin])
    if direction is not None:
        image.SetDirection([float(d) for d in direction])

    def write(target: Path) -> None:
        sitk.WriteImage(image, str(target), useCompression=compress)

    if ext in _SITK_SINGLE_FILE:
        _atomic_write(path, write)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)


def _fmt_vector(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{x:.6g}" for x in values) + ")"


def same_geometry(a: Volume, b: Volume, tol: float = 1e-4) -> str | None:
    """Describe the first geometric difference between two volumes (shape, spacing, origin, direction),
    or return None when they share a grid (absolute tolerance `tol`)."""
    if tuple(a.array.shape) != tuple(b.array.shape):
        return f"shape {tuple(a.array.shape)} != {tuple(b.array.shape)}"
    for name in ("spacing", "origin", "direction"):
        va, vb = np.asarray(getattr(a, name), float), np.asarray(getattr(b, name), float)
        if va.shape != vb.shape or not np.allclose(va, vb, rtol=0.0, atol=tol):
            return f"{name} {_fmt_vector(va)} != {_fmt_vector(vb)}"
    return None


def check_finite(array: np.ndarray, path: str | Path | None) -> None:
    """Raise DataError naming how many values are NaN or infinite; integer arrays always pass."""
    arr = np.asarray(array)
    if arr.dtype.kind not in "fc":
        return
    finite = np.isfinite(arr)
    bad = int(arr.size - np.count_nonzero(finite))
    if bad:
        nan = int(np.count_nonzero(np.isnan(arr)))
        raise DataError(path, f"{bad} of {arr.size} voxels are not finite ({nan} NaN, {bad - nan} infinite)")
