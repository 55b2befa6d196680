"""The record type shared by every reader, the data set that holds them, and the bad-input policy.

Coordinates: boxes are float32 (x1, y1, x2, y2) in continuous 0-based pixel coordinates of the stored
image (a box covering pixel columns 0..9 is x1=0, x2=10). Readers convert their file's convention
into this one; everything downstream (pipeline, augmentation, TFRecord) assumes it.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from collections import Counter
from typing import Any, Sequence

import numpy as np

ON_BAD_CHOICES = ("error", "skip")


class BadInputError(ValueError):
    """An input file or record that cannot be used as it is; the message names the file and record."""


class FatalInputError(BadInputError):
    """Bad input that is never skipped, whatever ``on_bad`` says: NaN boxes and image file names that
    escape the image root (a broken annotation tool or a hostile file, not a missing sample)."""


def check_on_bad(on_bad: str) -> str:
    """Validate an ``on_bad`` policy argument ("error" raises, "skip" drops with a counted warning)."""
    if on_bad not in ON_BAD_CHOICES:
        raise ValueError(f"on_bad must be one of {ON_BAD_CHOICES}, got {on_bad!r}")
    return on_bad


class BadInputReport:
    """Counts what a reader skipped, dropped or fixed, and warns once with the totals.

    Keys are short reasons ("missing image", "degenerate box", ...); ``examples`` keeps the first few
    record names per reason so the warning says where to look.
    """

    # The printed list of a report stops here per reason: the counts stay exact.
    LIST_LIMIT = 200

    def __init__(self, source: str):
        self.source = source
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self.listed: dict[str, list[str]] = {}
        self.errors: list[str] = []
        self._seen: set = set()

    def add(self, reason: str, where: str, count: int = 1) -> None:
        if count <= 0:
            return
        self.counts[reason] += count
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(where)
        listed = self.listed.setdefault(reason, [])
        if len(listed) < self.LIST_LIMIT:
            listed.append(where)

    def add_once(self, reason: str, where: str, key) -> bool:
        """``add`` unless ``key`` was added before (a record skipped again in every epoch counts
        once); returns whether it was new."""
        if (reason, key) in self._seen:
            return False
        self._seen.add((reason, key))
        self.add(reason, where)
        return True

    def collect(self, error: Exception) -> None:
        """Keep a bad record's error (on_bad="error") so that one pass names all of them."""
        self.errors.append(str(error))

    def raise_collected(self) -> None:
        """Raise one BadInputError listing every collected error (each names its file and record)."""
        if not self.errors:
            return
        shown = self.errors[:self.LIST_LIMIT]
        more = len(self.errors) - len(shown)
        raise BadInputError(
            f"{self.source}: {len(self.errors)} bad record(s); fix them, or skip them with "
            "on_bad='skip' (kerasdet train --on-bad skip):\n"
            + "\n".join(f"  - {e}" for e in shown) + (f"\n  ... and {more} more" if more else ""))

    def describe(self) -> str:
        """The counted list: one line per reason with its count, then every record (up to
        LIST_LIMIT per reason); "" when nothing was skipped or fixed."""
        lines = []
        for reason, n in sorted(self.counts.items()):
            lines.append(f"{self.source}: {n} x {reason}")
            listed = self.listed.get(reason, [])
            lines += [f"  - {where}" for where in listed]
            if n > len(listed) and len(listed) == self.LIST_LIMIT:
                lines.append(f"  ... ({n - len(listed)} more)")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def warn(self) -> None:
        if not self.counts:
            return
        parts = [f"{n} x {reason} (e.g. {', '.join(self.examples[reason])})"
                 for reason, n in sorted(self.counts.items())]
        warnings.warn(f"{self.source}: " + "; ".join(parts), BadInputWarning, stacklevel=3)

    def __repr__(self) -> str:
        return f"BadInputReport({self.source!r}, {dict(self.counts)})"


class BadInputWarning(UserWarning):
    """Warning category for counted skips and fixes made by the readers."""


@dataclasses.dataclass
class DetectionRecord:
    """One image and its objects.

    Attributes:
        image_id: the data set's id (COCO: int image id; VOC: the file stem).
        image_path: path of the image relative to the data set root (POSIX separators).
        width, height: size of the stored image in pixels.
        boxes: float32 [N, 4] (x1, y1, x2, y2), continuous 0-based pixel coordinates.
        labels: int32 [N] contiguous 0-based class ids.
        difficult: bool [N] (VOC "difficult"; evaluation neither rewards nor penalizes them).
        iscrowd: bool [N] (COCO crowd regions; not to be used as positives).
        masks: None, or a list of N COCO segmentations (polygon list or RLE dict) or None entries.
    """

    image_id: Any
    image_path: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray = None
    iscrowd: np.ndarray = None
    masks: list | None = None

    def __post_init__(self):
        n = len(self.labels)
        self.boxes = np.asarray(self.boxes, np.float32).reshape(n, 4)
        self.labels = np.asarray(self.labels, np.int32).reshape(n)
        self.difficult = (np.zeros(n, bool) if self.difficult is None
                          else np.asarray(self.difficult, bool).reshape(n))
        self.iscrowd = (np.zeros(n, bool) if self.iscrowd is None
                        else np.asarray(self.iscrowd, bool).reshape(n))
        if self.masks is not None and len(self.masks) != n:
            raise BadInputError(f"record {self.image_id!r}: {len(self.masks)} masks for {n} boxes")

    @property
    def num_objects(self) -> int:
        return int(self.labels.shape[0])

    def select(self, keep: np.ndarray) -> "DetectionRecord":
        """A copy holding only the objects where ``keep`` is True."""
        keep = np.asarray(keep, bool)
        masks = None if self.masks is None else [m for m, k in zip(self.masks, keep) if k]
        return dataclasses.replace(self, boxes=self.boxes[keep], labels=self.labels[keep],
                                   difficult=self.difficult[keep], iscrowd=self.iscrowd[keep],
                                   masks=masks)


class DetectionDataset:
    """Records + class names + the image root, as returned by every reader.

    Attributes:
        records: list of DetectionRecord.
        class_names: list of names, index = contiguous label.
        root: directory the records' ``image_path`` is relative to.
        category_ids: optional list, label -> original category id (COCO); None when labels are the ids.
        report: the BadInputReport of the reader that built this set.
    """

    def __init__(self, records: Sequence[DetectionRecord], class_names: Sequence[str], root: str,
                 category_ids: Sequence[int] | None = None, report: BadInputReport | None = None):
        self.records = list(records)
        self.class_names = list(class_names)
        self.root = os.fspath(root)
        self.category_ids = None if category_ids is None else [int(c) for c in category_ids]
        if self.category_ids is not None and len(self.category_ids) != len(self.class_names):
            raise ValueError("category_ids and class_names must have the same length")
        self.report = report if report is not None else BadInputReport("DetectionDataset")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def label_to_category_id(self, label: int) -> int:
        """Original (e.g. COCO) category id of a contiguous label."""
        return int(label) if self.category_ids is None else self.category_ids[int(label)]

    def category_id_to_label(self, category_id: int) -> int:
        """Contiguous label of an original category id; KeyError naming the id if unknown."""
        if self.category_ids is None:
            return int(category_id)
        lookup = getattr(self, "_label_of", None)
        if lookup is None or len(lookup) != len(self.category_ids):
            lookup = self._label_of = {c: i for i, c in enumerate(self.category_ids)}
        if int(category_id) not in lookup:
            raise KeyError(f"unknown category id {category_id}")
        return lookup[int(category_id)]

    def image_file(self, record_or_index) -> str:
        """Absolute path of a record's image."""
        record = (self.records[record_or_index] if isinstance(record_or_index, (int, np.integer))
                  else record_or_index)
        return os.path.join(self.root, *record.image_path.split("/"))

    def subset(self, indices: Sequence[int]) -> "DetectionDataset":
        return DetectionDataset([self.records[i] for i in indices], self.class_names, self.root,
                                self.category_ids, self.report)

    @property
    def has_masks(self) -> bool:
        return any(r.masks is not None and r.num_objects > 0 for r in self.records)

    def max_objects(self) -> int:
        return max((r.num_objects for r in self.records), default=0)

    def validate(self) -> None:
        """Check every record the way the pipeline relies on (useful for hand-built data sets).

        Raises BadInputError naming the record for non-finite boxes, boxes with x2 <= x1 or y2 <= y1
        or outside the image, or labels outside 0..num_classes-1.
        """
        for index, r in enumerate(self.records):
            where = f"record {index} (image id {r.image_id!r}, {r.image_path})"
            b = r.boxes
            if not np.isfinite(b).all():
                raise BadInputError(f"{where}: non-finite box")
            if ((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])).any():
                raise BadInputError(f"{where}: box with x2 <= x1 or y2 <= y1")
            if (b < 0).any() or (b[:, 0::2] > r.width).any() or (b[:, 1::2] > r.height).any():
                raise BadInputError(f"{where}: box outside the {r.height}x{r.width} image")
            if ((r.labels < 0) | (r.labels >= self.num_classes)).any():
                raise BadInputError(f"{where}: label outside 0..{self.num_classes - 1}: "
                                    f"{r.labels.tolist()}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> DetectionRecord:
        return self.records[index]

    def __iter__(self):
        return iter(self.records)

    def __repr__(self) -> str:
        return (f"DetectionDataset({len(self.records)} images, {self.num_classes} classes, "
                f"root={self.root!r})")


def resolve_image_path(root: str, name: str, where: str) -> str:
    """Return ``name`` as a POSIX path relative to ``root``, refusing names that escape the root.

    Absolute names, ``..`` components and symlinks that resolve outside ``root`` raise BadInputError
    naming ``where`` (file and record): an annotation must not make the loader read arbitrary files.
    """
    if not isinstance(name, str) or not name:
        raise BadInputError(f"{where}: empty or non-string image file name {name!r}")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise FatalInputError(f"{where}: image file name {name!r} is absolute; it must be relative "
                            "to the image root")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise FatalInputError(f"{where}: image file name {name!r} escapes the image root")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, *parts))
    if os.path.commonpath([real_root, real]) != real_root:
        raise FatalInputError(f"{where}: image file name {name!r} resolves to {real!r}, outside the "
                            f"image root (symlink escape)")
    return "/".join(p for p in parts if p not in ("", "."))


def sanitize_boxes(boxes: np.ndarray, width: int, height: int, where: str,
                   report: BadInputReport, object_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to the image and find the ones to keep.

    NaN / infinite coordinates raise BadInputError naming ``where`` (a NaN means a broken annotation
    tool, and guessing a box would train on a wrong sample). Boxes that are degenerate (zero or
    negative width/height) or empty after clipping to the image are dropped and counted in ``report``;
    boxes partly outside are clipped (counted too).

    ``object_ids`` (default 0..N-1) name the objects in messages, e.g. their index in the source file.

    Returns:
        (clipped boxes float32 [N, 4], keep bool [N]).
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    object_ids = list(range(len(boxes))) if object_ids is None else list(object_ids)
    bad = ~np.isfinite(boxes).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise FatalInputError(f"{where}: object {object_ids[i]} has a non-finite box {boxes[i].tolist()}")
    degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    clipped = boxes.copy()
    clipped[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
    clipped[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
    empty = ~degenerate & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
    was_clipped = ~degenerate & ~empty & (clipped != boxes).any(axis=1)
    for reason, flags in (("degenerate box dropped", degenerate),
                          ("box outside the image dropped", empty),
                          ("box clipped to the image", was_clipped)):
        if flags.any():
            report.add(reason, f"{where} object {object_ids[int(np.flatnonzero(flags)[0])]}",
                       int(flags.sum()))
    return clipped.astype(np.float32), ~(degenerate | empty)
