"""Reading images of any supported kind into uint8 RGB.

JPEG, PNG, BMP (Pillow) and TIFF (tifffile, then Pillow) files; gray, gray+alpha, palette, RGB, RGBA,
16-bit and float images. Rules: gray is repeated to 3 channels, alpha is dropped (not composited:
the stored colour is the object's colour), 16-bit values are scaled linearly to 0..255 (v / 257,
rounded), float images are taken as 0..1 when their maximum is <= 1 and as 0..255 otherwise.
EXIF orientation is ignored, like tf.io.decode_image, so that boxes stay in stored-pixel coordinates.
"""
from __future__ import annotations

import os
import threading

import numpy as np
from PIL import Image, UnidentifiedImageError

from kerasdet.data.records import BadInputError

TIFF_SUFFIXES = (".tif", ".tiff")

# 100 megapixels (10000 x 10000, 300 MB as uint8 RGB): far above any detection data set's images,
# far below what a decompression bomb (a few KB declaring 50000 x 50000) would allocate.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
MAX_PIXELS_ENV = "KERASDET_MAX_IMAGE_PIXELS"
_max_pixels_override = None


def max_image_pixels() -> int:
    """The largest height x width an image may declare: ``set_max_image_pixels``, else the
    KERASDET_MAX_IMAGE_PIXELS environment variable, else DEFAULT_MAX_IMAGE_PIXELS."""
    if _max_pixels_override is not None:
        return _max_pixels_override
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        limit = int(float(value))
    except ValueError:
        raise ValueError(f"{MAX_PIXELS_ENV}={value!r} is not a number of pixels") from None
    if limit < 1:
        raise ValueError(f"{MAX_PIXELS_ENV}={value!r} must be >= 1")
    return limit


def set_max_image_pixels(limit) -> None:
    """Raise (or lower) the decompression-bomb limit for this process; None restores the default
    (environment variable or DEFAULT_MAX_IMAGE_PIXELS). kerasdet's --max-image-pixels sets it."""
    global _max_pixels_override
    if limit is not None and int(limit) < 1:
        raise ValueError(f"max_image_pixels must be >= 1, got {limit}")
    _max_pixels_override = None if limit is None else int(limit)


def check_image_pixels(height, width, where: str, limit=None) -> None:
    """BadInputError naming ``where`` and the limit when ``height`` x ``width`` exceeds it: called
    with the size a header or an annotation declares, before anything of that size is allocated."""
    limit = max_image_pixels() if limit is None else int(limit)
    if int(height) * int(width) > limit:
        raise BadInputError(
            f"{where}: the image declares {int(height)} x {int(width)} (HxW) = "
            f"{int(height) * int(width):,} pixels, more than the limit of {limit:,} (a decompression "
            f"bomb, or a genuinely huge image: raise the limit with max_image_pixels=, "
            f"{MAX_PIXELS_ENV} or --max-image-pixels)")


_pillow_limit_lock = threading.Lock()


def _open_limited(path):
    """Image.open without Pillow's own bomb check, which would refuse a raised limit and names
    neither the record nor the limit: kerasdet checks the header's size itself right after (open
    reads the header only). The lock keeps Pillow's setting intact for the rest of the process."""
    with _pillow_limit_lock:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


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


def read_image(path: str, where: str | None = None, max_image_pixels: int | None = None) -> np.ndarray:
    """Read an image file as uint8 RGB [H, W, 3].

    Raises BadInputError naming ``where`` (default: the path) for a missing, unreadable or corrupt
    file, and for one whose header declares more than ``max_image_pixels`` pixels (checked before
    decoding; default ``max_image_pixels()``).
    """
    where = where or os.fspath(path)
    if not os.path.isfile(path):
        raise BadInputError(f"{where}: image file not found: {path}")
    try:
        header_hw = image_size(path, where)
    except BadInputError as exc:
        raise BadInputError(f"{where}: cannot decode image {path}: {exc.__cause__ or exc}") from exc
    check_image_pixels(*header_hw, where, max_image_pixels)
    try:
        if is_tiff(path):
            array = _read_tiff(path)
        else:
            with _open_limited(path) as img:
                img.load()
                array = _pillow_array(img)
    except BadInputError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
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
        with _open_limited(path) as img:
            width, height = img.size
    except Image.DecompressionBombError as exc:
        raise BadInputError(f"{where}: {path}: {exc}") from exc
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


def check_image(path: str, expected_hw: tuple[int, int] | None, mode: str, where: str,
                max_image_pixels: int | None = None):
    """Check an image at load time; returns its (height, width).

    mode: "header" reads the header only (fast: catches missing, non-image and truncated-header files
    and size mismatches), "decode" decodes the pixels too (catches truncated or corrupt data).
    Either way a header declaring more than ``max_image_pixels`` pixels is refused before decoding.
    Raises BadInputError naming ``where``.
    """
    if mode == "decode":
        h, w = read_image(path, where, max_image_pixels).shape[:2]
    elif mode == "header":
        h, w = image_size(path, where)
        check_image_pixels(h, w, where, max_image_pixels)
    else:
        raise ValueError(f"check_images must be 'header', 'decode' or 'none', got {mode!r}")
    if expected_hw is not None and tuple(expected_hw) != (h, w):
        raise BadInputError(f"{where}: annotation says the image is {expected_hw[0]}x{expected_hw[1]} "
                            f"(HxW) but {path} is {h}x{w}")
    return h, w
