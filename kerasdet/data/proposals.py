"""Category-independent region proposals (R-CNN, SPP-net, Fast R-CNN) and the cache they are read from.

Sources, both from OpenCV contrib's ``cv2.ximgproc`` (the optional extra ``kerasdet[proposals]`` =
opencv-contrib-python-headless), imported only when a proposal is computed:

- ``selective_search``: Uijlings et al.'s hierarchical grouping. ``mode="fast"`` is the R-CNN paper's
  "fast mode" (HSV and Lab colour spaces, Felzenszwalb segmentations with k = 50 and 100, the
  colour+texture+size+fill and texture+size+fill similarities: OpenCV's fast switch with base_k=50,
  inc_k=50 instead of its own 150/150 default), about 2000 boxes per VOC image. "quality" is the
  slower, higher-recall mode; "single" one strategy only.
- ``edge_boxes``: Zitnick and Dollar's EdgeBoxes. OpenCV's implementation scores boxes on any edge
  map with its orientation map. The structured-edge model (model.yml.gz, in opencv_extra's testdata,
  not in the wheel) gives the paper's edges: pass ``model_path``. Without it the edges are
  model-free: Sobel gradient magnitude of the smoothed image thinned by non-maximum suppression
  along the gradient, orientation from the gradient direction (mod pi, as the structured edges'
  computeOrientation gives). That keeps EdgeBoxes usable offline; its recall is lower than with the
  trained edges (docs/TRAINING.md, "Proposals").

Boxes are float32 (x1, y1, x2, y2) in the original image's pixels (the records' convention), clipped
to the image, without duplicates or boxes under one pixel a side, in the order the method ranks them.

The cache (``write_proposal_cache`` / ``ProposalCache``) is one .npz per data set split:
    ids        unicode [n]       str(image_id) of each record
    paths      unicode [n]       the record's image_path (catches a cache of another split whose ids
                                 repeat, as the synthetic train and val ids do)
    offsets    int64 [n + 1]     entry i's boxes are boxes[offsets[i]:offsets[i + 1]]
    boxes      float32 [total, 4]
    metadata   unicode []        JSON: method, settings, kerasdet version, count, seconds
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from kerasdet.atomic_files import replaced_atomically
from kerasdet.numpy_boxes import pairwise_iou_numpy

__all__ = ["selective_search", "edge_boxes", "compute_proposals", "write_proposal_cache",
           "ProposalCache", "load_proposal_cache", "proposal_recall", "ProposalCacheError",
           "MissingProposalsError", "METHODS"]

METHODS = ("selective_search", "edge_boxes")
_INSTALL_HINT = ("pip install 'kerasdet[proposals]' (opencv-contrib-python-headless). If it is installed "
                 "and this still fails, another OpenCV wheel (opencv-python, opencv-python-headless, "
                 "opencv-contrib-python) shadows it: they all install the same `cv2` package, so "
                 "uninstall the others and reinstall opencv-contrib-python-headless")


class ProposalCacheError(ValueError):
    """A proposal cache file that cannot be used; the message names the file."""


class MissingProposalsError(KeyError):
    """An image without an entry in the proposal cache; the message names the image id and the file."""

    def __str__(self):  # KeyError would print the message quoted as a repr
        return str(self.args[0]) if self.args else ""


def _ximgproc():
    """cv2 with the contrib module ximgproc, or an ImportError saying what to install."""
    try:
        import cv2
    except ImportError as error:
        raise ImportError(f"region proposals need OpenCV with its contrib modules: {_INSTALL_HINT}") from error
    if not hasattr(cv2, "ximgproc") or not hasattr(cv2.ximgproc, "segmentation"):
        raise ImportError(f"the installed OpenCV ({getattr(cv2, '__file__', '?')}) has no cv2.ximgproc "
                          f"(contrib modules): {_INSTALL_HINT}")
    return cv2


def _rgb_uint8(image):
    """uint8 [h, w, 3] RGB from an array (gray, RGB, RGBA, float 0..255) or an image file path."""
    if isinstance(image, (str, os.PathLike)):
        from kerasdet.data.images import read_image

        image = read_image(os.fspath(image))
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 1:
        raise ValueError(f"expected an image [h, w, 3], got an array of shape {image.shape}")
    image = image[:, :, :3]
    if image.dtype != np.uint8:
        image = np.clip(np.round(image.astype(np.float32)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def clean_boxes(xywh, height, width, min_size=1.0, scale=1.0):
    """float32 (x1, y1, x2, y2) from OpenCV's (x, y, w, h) rows: scaled by ``scale`` (back to the
    original image), clipped to it, boxes with a side under max(min_size, 1) px and repeats of an
    earlier box dropped; the ranking order is kept."""
    xywh = np.asarray(xywh, np.float64).reshape(-1, 4)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1) * scale
    boxes = np.clip(boxes, 0.0, [width, height, width, height]).astype(np.float32)
    side = max(float(min_size), 1.0)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= side) & ((boxes[:, 3] - boxes[:, 1]) >= side)
    boxes = boxes[keep]
    if len(boxes):
        # np.unique sorts; taking the first index of each box and re-sorting those keeps the ranking.
        _, first = np.unique(boxes, axis=0, return_index=True)
        boxes = boxes[np.sort(first)]
    return boxes.reshape(-1, 4)


def _downscaled(cv2, image, max_side):
    """(image, factor back to the original): the image shrunk so its longer side is ``max_side``."""
    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return image, 1.0
    factor = max(h, w) / float(max_side)
    size = (max(1, int(round(w / factor))), max(1, int(round(h / factor))))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return small, w / size[0]


def _seed_c_rand(seed):
    """Seeds the C library's rand(), which OpenCV's selective search draws its ranking from (the
    paper's pseudo-random ranking: each region's hierarchy level times a random number). Without
    it the same image gets the same boxes in another order each call, so a top-k cut would differ.
    Best effort: where the C library cannot be reached the ranking stays unseeded."""
    import ctypes

    try:
        ctypes.CDLL(None).srand(ctypes.c_uint(int(seed)))
    except (OSError, AttributeError, TypeError):
        pass


def selective_search(image, mode="fast", max_proposals=2000, min_size=1.0, base_k=50, inc_k=50,
                     sigma=0.8, max_side=None, seed=0):
    """Selective search boxes of one image: float32 [N, 4] (x1, y1, x2, y2), N <= max_proposals.

    Args:
        image: uint8 RGB [h, w, 3] (gray and float arrays are converted), or an image file path.
        mode: "fast" (R-CNN's), "quality" or "single".
        max_proposals: keep the first this many of the ranking (None: all).
        min_size: drop boxes whose width or height is under this many pixels (at least 1).
        base_k, inc_k, sigma: the Felzenszwalb segmentations' k (base_k, base_k + inc_k, ...) and
            smoothing; the defaults give the paper's k = 50, 100.
        max_side: run on a copy shrunk to this longer side (faster on large photos); boxes are
            scaled back to the original pixels.
        seed: seeds the random ranking (see ``_seed_c_rand``; process-wide C rand(), so calls from
            several threads at once are not reproducible); None leaves it unseeded.
    """
    cv2 = _ximgproc()
    if mode not in ("fast", "quality", "single"):
        raise ValueError(f"selective_search mode must be 'fast', 'quality' or 'single', got {mode!r}")
    rgb = _rgb_uint8(image)
    height, width = rgb.shape[:2]
    small, scale = _downscaled(cv2, rgb, max_side)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    # OpenCV converts from BGR to HSV / Lab itself, so it must get BGR.
    search.setBaseImage(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    if mode == "fast":
        search.switchToSelectiveSearchFast(int(base_k), int(inc_k), float(sigma))
    elif mode == "quality":
        search.switchToSelectiveSearchQuality(int(base_k), int(inc_k), float(sigma))
    else:
        search.switchToSingleStrategy(int(base_k), float(sigma))
    if seed is not None:
        _seed_c_rand(seed)
    boxes = clean_boxes(search.process(), height, width, min_size, scale)
    return boxes if max_proposals is None else boxes[:int(max_proposals)]


def gradient_edges(cv2, rgb):
    """Model-free (edges, orientation) float32 [h, w] for EdgeBoxes: the Sobel magnitude of the
    smoothed gray image, thinned by non-maximum suppression across the edge (EdgeBoxes groups
    connected edge pixels; thick ridges would merge neighbouring contours) and scaled to [0, 1];
    the orientation is the edge's direction mod pi."""
    gray = cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0, (0, 0), 1.0)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    magnitude = np.sqrt(gx * gx + gy * gy)
    angle = np.arctan2(gy, gx)
    # Neighbours along the gradient, rounded to the 8-neighbourhood.
    dx = np.rint(np.cos(angle)).astype(np.int64)
    dy = np.rint(np.sin(angle)).astype(np.int64)
    h, w = gray.shape
    ys, xs = np.mgrid[0:h, 0:w]
    padded = np.pad(magnitude, 1)
    ahead = padded[ys + 1 + dy, xs + 1 + dx]
    behind = padded[ys + 1 - dy, xs + 1 - dx]
    thin = np.where((magnitude >= ahead) & (magnitude >= behind), magnitude, 0.0)
    top = np.percentile(thin[thin > 0], 99) if np.any(thin > 0) else 1.0
    edges = np.clip(thin / max(top, 1e-6), 0.0, 1.0).astype(np.float32)
    # The edge runs perpendicular to the gradient.
    orientation = np.mod(angle + np.pi / 2, np.pi).astype(np.float32)
    return edges, orientation


def edge_boxes(image, max_proposals=2000, model_path=None, edges=None, alpha=0.65, beta=0.75,
               min_score=0.01, min_size=1.0, max_side=None):
    """EdgeBoxes of one image: float32 [N, 4] (x1, y1, x2, y2) in score order.

    Args:
        image: uint8 RGB [h, w, 3] or an image file path.
        max_proposals: how many boxes EdgeBoxes returns at most.
        model_path: the structured-edge model file (model.yml.gz from opencv_extra's
            testdata/cv/ximgproc); needed for ``edges="structured"``.
        edges: "structured" (needs model_path), "gradient" (model-free, see the module docstring)
            or None: "structured" when model_path is given, else "gradient".
        alpha, beta, min_score: EdgeBoxes' step size, NMS threshold and minimum box score
            (the paper's 0.65 / 0.75 setting).
    """
    cv2 = _ximgproc()
    if edges is None:
        edges = "structured" if model_path else "gradient"
    if edges not in ("structured", "gradient"):
        raise ValueError(f"edge_boxes edges must be 'structured' or 'gradient', got {edges!r}")
    rgb = _rgb_uint8(image)
    height, width = rgb.shape[:2]
    small, scale = _downscaled(cv2, rgb, max_side)
    if edges == "structured":
        if not model_path:
            raise ValueError("edge_boxes(edges='structured') needs the structured-edge model file "
                             "model.yml.gz (opencv_extra testdata/cv/ximgproc/model.yml.gz; not in the "
                             "OpenCV wheel): pass model_path=..., or use edges='gradient'")
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"edge_boxes: structured-edge model file {model_path!r} does not exist")
        detector = cv2.ximgproc.createStructuredEdgeDetection(os.fspath(model_path))
        edge_map = detector.detectEdges(small.astype(np.float32) / 255.0)
        orientation = detector.computeOrientation(edge_map)
        edge_map = detector.edgesNms(edge_map, orientation)
    else:
        edge_map, orientation = gradient_edges(cv2, small)
    finder = cv2.ximgproc.createEdgeBoxes(alpha=float(alpha), beta=float(beta), minScore=float(min_score))
    finder.setMaxBoxes(int(max_proposals) if max_proposals else 10000)
    found = finder.getBoundingBoxes(edge_map, orientation)
    xywh = found[0] if isinstance(found, tuple) else found
    boxes = clean_boxes(xywh, height, width, min_size, scale)
    return boxes if max_proposals is None else boxes[:int(max_proposals)]


def compute_proposals(image, method="selective_search", **kwargs):
    """Boxes of one image by ``method`` ("selective_search" or "edge_boxes")."""
    if method == "selective_search":
        return selective_search(image, **kwargs)
    if method == "edge_boxes":
        return edge_boxes(image, **kwargs)
    raise ValueError(f"unknown proposal method {method!r}; choose one of {', '.join(METHODS)}")


# ----------------------------------------------------------------------------- cache
def _version():
    try:
        from kerasdet import __version__
    except ImportError:
        return "unknown"
    return __version__


def _save_npz(path, ids, paths, chunks, metadata):
    """Writes the cache to a temporary file next to ``path`` and renames it over ``path``: a reader
    (or an interrupted run) never sees half a file."""
    offsets = np.zeros(len(chunks) + 1, np.int64)
    offsets[1:] = np.cumsum([len(c) for c in chunks])
    boxes = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros([0, 4], np.float32)
    with replaced_atomically(path) as temporary:
        with open(temporary, "wb") as handle:  # a file object: np.savez would append .npz to a name
            np.savez(handle, ids=np.array(ids, dtype=str), paths=np.array(paths, dtype=str),
                     offsets=offsets, boxes=boxes.reshape(-1, 4),
                     metadata=np.array(json.dumps(metadata)))


def _partial_path(path):
    return path + ".partial.npz"


def write_proposal_cache(dataset, path, method="selective_search", progress=True, resume=True,
                         save_every=100, **kwargs):
    """Computes the proposals of every record of ``dataset`` and writes them to ``path`` (.npz,
    layout in the module docstring). Returns the ProposalCache.

    Every ``save_every`` images the entries so far go (atomically) to ``PATH.partial.npz``; with
    ``resume`` a run of the same method and settings continues from it, and it is removed when the
    cache is complete. ``kwargs`` go to the method (selective_search / edge_boxes).
    """
    if method not in METHODS:
        raise ValueError(f"unknown proposal method {method!r}; choose one of {', '.join(METHODS)}")
    _ximgproc()  # fail before any work when the extra is missing
    from tqdm import tqdm

    path = os.fspath(path)
    settings = {k: v for k, v in sorted(kwargs.items())}
    done = {}
    partial = _partial_path(path)
    if resume and os.path.isfile(partial):
        try:
            previous = ProposalCache(partial)
        except ProposalCacheError:
            previous = None  # a partial file that cannot be read is simply recomputed
        if (previous is not None and previous.metadata.get("method") == method
                and previous.metadata.get("settings") == json.loads(json.dumps(settings))):
            done = {key: (previous.paths[key], previous.get(key)) for key in previous.ids}
    ids, paths, chunks = [], [], []
    seen = set()
    seconds = 0.0
    computed = 0
    records = dataset.records
    for count, record in enumerate(tqdm(records, desc=f"{method} {os.path.basename(path)}",
                                        unit="image", disable=not progress), 1):
        key = str(record.image_id)
        if key in seen:
            raise ValueError(f"image id {key!r} appears twice in the data set; the cache {path} keys on it")
        seen.add(key)
        if key in done and done[key][0] == record.image_path:
            boxes = done[key][1]
        else:
            start = time.perf_counter()
            boxes = compute_proposals(dataset.image_file(record), method, **kwargs)
            seconds += time.perf_counter() - start
            computed += 1
        ids.append(key)
        paths.append(record.image_path)
        chunks.append(np.asarray(boxes, np.float32).reshape(-1, 4))
        if save_every and count % save_every == 0 and count < len(records):
            _save_npz(partial, ids, paths, chunks, _metadata(method, settings, ids, chunks, seconds,
                                                            computed, complete=False))
    metadata = _metadata(method, settings, ids, chunks, seconds, computed, complete=True)
    _save_npz(path, ids, paths, chunks, metadata)
    if os.path.exists(partial):
        os.remove(partial)
    return ProposalCache(path)


def _metadata(method, settings, ids, chunks, seconds, computed, complete):
    return {"method": method, "settings": settings, "kerasdet_version": _version(), "count": len(ids),
            "total_boxes": int(sum(len(c) for c in chunks)), "seconds_computing": round(seconds, 3),
            "images_computed": computed,
            "seconds_per_image": round(seconds / computed, 4) if computed else None,
            "complete": complete}


class ProposalCache:
    """A proposal cache file read into memory; ``get(image_id)`` gives that image's boxes
    (float32 [N, 4], original pixels, ranked)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"proposal cache {self.path!r} does not exist (write it with "
                                    "`kerasdet proposals --data ... --out ...`)")
        try:
            with np.load(self.path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in ("ids", "paths", "offsets", "boxes", "metadata")}
        except KeyError as error:
            raise ProposalCacheError(f"proposal cache {self.path}: missing array {error}; not a kerasdet "
                                     "proposal cache") from None
        except Exception as error:  # zip / pickle / format errors of a damaged file
            raise ProposalCacheError(f"proposal cache {self.path} cannot be read ({type(error).__name__}: "
                                     f"{error}); write it again") from None
        self._validate(arrays)
        self.ids = [str(i) for i in arrays["ids"]]
        self.boxes = arrays["boxes"].astype(np.float32, copy=False)
        self.offsets = arrays["offsets"]
        self._index = {key: i for i, key in enumerate(self.ids)}
        self.paths = dict(zip(self.ids, (str(p) for p in arrays["paths"])))
        self.metadata = json.loads(str(arrays["metadata"]))

    def _validate(self, arrays):
        where = f"proposal cache {self.path}"
        ids, paths, offsets, boxes = (arrays[k] for k in ("ids", "paths", "offsets", "boxes"))
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ProposalCacheError(f"{where}: boxes have shape {boxes.shape}, expected [N, 4]")
        if not np.issubdtype(boxes.dtype, np.floating) or not np.all(np.isfinite(boxes)):
            raise ProposalCacheError(f"{where}: boxes hold non-finite values (or are not floats)")
        if ids.ndim != 1 or paths.shape != ids.shape or offsets.shape != (len(ids) + 1,):
            raise ProposalCacheError(f"{where}: {len(ids)} ids, {paths.shape} paths and {offsets.shape} "
                                     "offsets do not match")
        if offsets[0] != 0 or offsets[-1] != len(boxes) or np.any(np.diff(offsets) < 0):
            raise ProposalCacheError(f"{where}: offsets do not index the {len(boxes)} boxes")
        try:
            json.loads(str(arrays["metadata"]))
        except ValueError:
            raise ProposalCacheError(f"{where}: the metadata is not JSON") from None

    def __len__(self):
        return len(self.ids)

    def __contains__(self, image_id):
        return str(image_id) in self._index

    def get(self, image_id):
        key = str(image_id)
        i = self._index.get(key)
        if i is None:
            raise MissingProposalsError(f"image id {image_id!r} has no proposals in the cache {self.path} "
                                        f"({len(self)} images, method {self.metadata.get('method')}); "
                                        "write the cache for this data set and split")
        return self.boxes[self.offsets[i]:self.offsets[i + 1]]

    def for_file(self, image_path):
        """The boxes of an image file: the entry whose stored path ends in its file name, else the
        entry whose id is its stem."""
        name = os.path.basename(os.fspath(image_path))
        matches = [key for key, stored in self.paths.items() if stored.rsplit("/", 1)[-1] == name]
        if len(matches) == 1:
            return self.get(matches[0])
        stem = os.path.splitext(name)[0]
        if stem in self._index:
            return self.get(stem)
        raise MissingProposalsError(f"image {image_path} has no proposals in the cache {self.path} (no "
                                    f"entry for the file name {name!r} or the id {stem!r})")

    def check_dataset(self, dataset, where=""):
        """Every record of ``dataset`` has an entry for its own image file; else an error naming the
        first ids that have none (before a long run starts, not at its first missing image)."""
        missing = [r.image_id for r in dataset.records if str(r.image_id) not in self._index]
        if missing:
            listed = ", ".join(repr(i) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise MissingProposalsError(f"{where}{len(missing)} of {len(dataset.records)} images have no "
                                        f"proposals in the cache {self.path}: image ids {listed}")
        for record in dataset.records:
            stored = self.paths[str(record.image_id)]
            if stored and stored != record.image_path:
                raise ProposalCacheError(f"{where}proposal cache {self.path}: image id {record.image_id!r} "
                                         f"was cached for the file {stored!r}, but the data set's is "
                                         f"{record.image_path!r} (a cache of another split?)")

    def __repr__(self):
        return f"ProposalCache({self.path!r}, {len(self)} images, method={self.metadata.get('method')!r})"


def load_proposal_cache(cache):
    """A ProposalCache from a path (or the cache itself)."""
    return cache if isinstance(cache, ProposalCache) else ProposalCache(cache)


def proposal_recall(dataset, cache, thresholds=(0.5, 0.7), top_k=None):
    """Share of the ground-truth boxes (crowd regions excluded) that some proposal of their image
    overlaps at IoU >= t, for each t of ``thresholds``; ``top_k`` keeps each image's first k.

    Returns {"recall": {"0.5": r, ...}, "num_objects", "num_images", "mean_proposals"}.
    """
    cache = load_proposal_cache(cache)
    thresholds = tuple(float(t) for t in thresholds)
    hits = np.zeros(len(thresholds), np.int64)
    objects = 0
    counts = []
    for record in dataset.records:
        boxes = cache.get(record.image_id)
        if top_k is not None:
            boxes = boxes[:int(top_k)]
        counts.append(len(boxes))
        gt = record.boxes[~record.iscrowd]
        objects += len(gt)
        if len(gt) == 0 or len(boxes) == 0:
            continue
        best = pairwise_iou_numpy(gt, boxes).max(axis=1)
        hits += np.array([(best >= t).sum() for t in thresholds])
    return {"recall": {f"{t:g}": (float(h) / objects if objects else float("nan"))
                       for t, h in zip(thresholds, hits)},
            "num_objects": objects, "num_images": len(dataset.records),
            "mean_proposals": float(np.mean(counts)) if counts else 0.0}
