"""kerasdet.data: readers (COCO, VOC), a synthetic data set, the tf.data pipeline, augmentation, TFRecord.

Heavy parts (TensorFlow) load on first use, so the readers work without importing TensorFlow.
"""
import importlib

from kerasdet.data.coco import load_coco
from kerasdet.data.images import read_image
from kerasdet.data.records import (BadInputError, BadInputReport, BadInputWarning, DetectionDataset,
                                   DetectionRecord, FatalInputError)
from kerasdet.data.voc import VOC_CLASSES, load_voc

_LAZY = {
    "build_dataset": ("kerasdet.data.pipeline", "build_dataset"),
    "make_dataset": ("kerasdet.data.synthetic", "make_dataset"),
    "write_tfrecord": ("kerasdet.data.tfrecord", "write_tfrecord"),
    "read_tfrecord": ("kerasdet.data.tfrecord", "read_tfrecord"),
}

__all__ = [
    "BadInputError", "BadInputReport", "BadInputWarning", "DetectionDataset", "DetectionRecord",
    "FatalInputError", "VOC_CLASSES", "load_coco", "load_voc", "read_image", *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'kerasdet.data' has no attribute {name!r}")
