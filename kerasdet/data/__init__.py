"""kerasdet.data: readers (COCO, VOC), a synthetic data set, the tf.data pipeline, augmentation,
TFRecord.

    from kerasdet import data
    train = data.load_coco("annotations/instances_train2017.json", "train2017")   # or data.load_voc
    train = data.make_dataset("synthetic/train", 256, seed=1)                     # synthetic shapes
    ds = data.build_dataset(train, 8, training=True, min_size=800, max_size=1333, stride=32)
    files = data.write_tfrecord(train, "train.tfrecord")                          # and back:
    ds = data.build_dataset(files, 8, training=True, image_size=320, augment="ssd")

Module map: records (DetectionRecord, DetectionDataset, bad-input policy), images (decoding any
supported file to uint8 RGB), masks (COCO polygons / RLE), coco, voc, synthetic, augment (box-aware,
seeded, pure TF), pipeline (build_dataset and its batch layout), tfrecord.
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
