"""Instance masks: COCO polygons and RLE (through pycocotools.mask) to binary arrays and back.

NumPy only (no TensorFlow), so evaluation can use it; the pipeline's per-instance grids are in
kerasdet.data.mask_grids."""
from __future__ import annotations

import warnings

import numpy as np
from pycocotools import mask as mask_utils

from kerasdet.data.records import BadInputError


def segmentation_to_mask(segmentation, height: int, width: int, where: str = "mask") -> np.ndarray:
    """Rasterize one COCO segmentation (polygon list, uncompressed or compressed RLE) to uint8 [H, W].

    Raises BadInputError naming ``where`` for a malformed segmentation.
    """
    try:
        if isinstance(segmentation, list):
            polygons = [p for p in segmentation if len(p) >= 6]  # < 3 points cannot enclose a pixel
            if not polygons:
                return np.zeros((height, width), np.uint8)
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        elif isinstance(segmentation, dict) and "counts" in segmentation:
            rle = segmentation
            if isinstance(rle["counts"], list):  # uncompressed RLE (COCO crowd regions)
                rle = mask_utils.frPyObjects(rle, height, width)
            elif isinstance(rle["counts"], str):
                rle = {"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}
            if [int(s) for s in rle["size"]] != [height, width]:
                raise BadInputError(f"{where}: RLE size {list(rle['size'])} does not match the image "
                                    f"{height}x{width}")
        else:
            raise BadInputError(f"{where}: unsupported segmentation of type {type(segmentation).__name__}")
        with warnings.catch_warnings():
            # pycocotools' Cython decode trips numpy 2's __array__(copy=) DeprecationWarning; harmless.
            warnings.simplefilter("ignore", DeprecationWarning)
            mask = mask_utils.decode(rle)
    except BadInputError:
        raise
    except Exception as exc:  # pycocotools raises bare TypeErrors / ValueErrors without context
        raise BadInputError(f"{where}: malformed segmentation: {exc}") from exc
    return np.ascontiguousarray(mask, dtype=np.uint8).reshape(height, width)


def mask_to_rle(mask: np.ndarray) -> dict:
    """Compressed COCO RLE of a binary [H, W] mask, with ``counts`` as a JSON-friendly str."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def masks_for_record(record, where: str | None = None) -> np.ndarray:
    """All of a record's instance masks as uint8 [N, H, W] (zeros for objects without a mask)."""
    n = record.num_objects
    out = np.zeros((n, record.height, record.width), np.uint8)
    if record.masks is None:
        return out
    for i, segmentation in enumerate(record.masks):
        if segmentation is not None:
            out[i] = segmentation_to_mask(segmentation, record.height, record.width,
                                          f"{where or record.image_id} object {i}")
    return out


def mask_bounding_box(mask: np.ndarray) -> np.ndarray:
    """Tight (x1, y1, x2, y2) of a binary mask in continuous coordinates; zeros for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return np.zeros(4, np.float32)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
