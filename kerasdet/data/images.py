"""Reading images of any supported kind into uint8 RGB.

JPEG, PNG, BMP (Pillow) and TIFF (tifffile, then Pillow) files; gray, gray+alpha, palette, RGB, RGBA,
16-bit and float images. Rules: gray is repeated to 3 channels, alpha is dropped (not composited:
the stored colour is the object's colour), 16-bit values are scaled linearly to 0..255 (v / 257,
rounded), float images are taken as 0..1 when their maximum is <= 1 and as 0..255 otherwise.
EXIF orientation is ignored, like tf.io.decode_image, so that boxes stay in stored-pixel coordinates.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from kerasdet.data.records import BadInputError

TIFF_SUFFIXES = (".tif", ".tiff")


def is_tiff(path: str) -> bool:
    return os.fspath(path).lower().endswith(TIFF_SUFFIXES)


def to_rgb_uint8(array: np.ndarray, where: str = "image") -> np.ndarray:
    """Convert a decoded pixel array (HW, HW1, HW2, HW3, HW4; uint8/uint16/int/float) to uint8 RGB."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 2, 3, 4):
        a = np.moveaxis(a, 0, -1)  # planar TIFF (C, H, W)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4):
        raise BadInputError(f"{where}: unsupported image shape {a.shape}")
    if a.shape[-1] in (1, 2):  # gray (+ alpha)
        a = np.repeat(a[..., :1], 3, axis=-1)
    else:
        a = a[..., :3]
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise BadInputError(f"{where}: image has non-finite pixel values")
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
        return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        # 16-bit data (uint16, or Pillow's int32 "I" mode holding 16-bit values).
        return np.clip(np.rint(a.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    raise BadInputError(f"{where}: unsupported pixel type {a.dtype}")


def _read_tiff(path: str) -> np.ndarray:
    try:
        import tifffile

        return tifffile.imread(path, key=0)
    except Exception:  # not a TIFF tifffile understands: let Pillow try (it names the file on failure)
        with Image.open(path) as img:
            return _pillow_array(img)


def _pillow_array(img: Image.Image) -> np.ndarray:
    # Alpha is dropped explicitly (no compositing) so the stored colour is what the model sees.
    if img.mode == "RGBA":
        return np.asarray(img)[..., :3]
    if img.mode == "LA":
        return np.asarray(img.convert("L"))
    if img.mode == "PA":
        return np.asarray(img.convert("RGBA"))[..., :3]
    if img.mode in ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(img.convert("RGB"))
    return np.asarray(img)  # I;16*, I, F: keep the values, to_rgb_uint8 scales them


def read_image(path: str, where: str | None = None) -> np.ndarray:
    """Read an image file as uint8 RGB [H, W, 3].

    Raises BadInputError naming ``where`` (default: the path) for a missing, unreadable or corrupt file.
    """
    where = where or os.fspath(path)
    if not os.path.isfile(path):
        raise BadInputError(f"{where}: image file not found: {path}")
    try:
        if is_tiff(path):
            array = _read_tiff(path)
        else:
            with Image.open(path) as img:
                img.load()
                array = _pillow_array(img)
    except BadInputError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise BadInputError(f"{where}: cannot decode image {path}: {exc}") from exc
    return to_rgb_uint8(array, where)


def image_size(path: str, where: str | None = None) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels.

    Raises BadInputError naming ``where`` for a missing or unreadable file.
    """
    where = where or os.fspath(path)
    if not os.path.isfile(path):
        raise BadInputError(f"{where}: image file not found: {path}")
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        if is_tiff(path):  # TIFF variants Pillow cannot open (e.g. some float layouts)
            shape = _read_tiff_shape(path, where, exc)
            return shape
        raise BadInputError(f"{where}: cannot read image header of {path}: {exc}") from exc
    return int(height), int(width)


def _read_tiff_shape(path, where, original):
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            shape = tif.pages[0].shape
            axes = tif.pages[0].axes
    except Exception as exc:
        raise BadInputError(f"{where}: cannot read image header of {path}: {original}") from exc
    size = dict(zip(axes, shape))
    return int(size["Y"]), int(size["X"])


def check_image(path: str, expected_hw: tuple[int, int] | None, mode: str, where: str):
    """Check an image at load time; returns its (height, width).

    mode: "header" reads the header only (fast: catches missing, non-image and truncated-header files
    and size mismatches), "decode" decodes the pixels too (catches truncated or corrupt data).
    Raises BadInputError naming ``where``.
    """
    if mode == "decode":
        h, w = read_image(path, where).shape[:2]
    elif mode == "header":
        h, w = image_size(path, where)
    else:
        raise ValueError(f"check_images must be 'header', 'decode' or 'none', got {mode!r}")
    if expected_hw is not None and tuple(expected_hw) != (h, w):
        raise BadInputError(f"{where}: annotation says the image is {expected_hw[0]}x{expected_hw[1]} "
                            f"(HxW) but {path} is {h}x{w}")
    return h, w
