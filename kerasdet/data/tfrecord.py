"""TFRecord files of tf.train.Example, one per image, and the reader that turns them into samples.

Features (boxes in absolute, continuous pixel coordinates of the stored image, unlike the TF Object
Detection API's normalized ones):
    image/encoded     bytes    the image file (JPEG/PNG/BMP/GIF as stored; TIFF re-encoded as PNG,
                               because tf.io cannot decode TIFF)
    image/format      bytes    "jpeg", "png", ...
    image/height, image/width, image/index   int64 (index = position in the source data set)
    image/id, image/filename                  bytes
    object/bbox       float    [4 n] x1, y1, x2, y2, ...
    object/label, object/difficult, object/iscrowd   int64 [n]
    object/mask       bytes    [n] one PNG per instance (only when written with masks)

The reader decodes each instance's PNG and crops it at once to a grid over its box
(kerasdet.data.mask_grids), so no image-sized mask stack is ever built.
"""
from __future__ import annotations

import io
import os

import numpy as np
import tensorflow as tf
from PIL import Image

from kerasdet.data.decode import decode_image_bytes
from kerasdet.data.images import is_tiff, read_image
from kerasdet.data.mask_grids import DEFAULT_GRID_SIZE, GRID_DTYPE, crop_masks_to_boxes
from kerasdet.data.masks import masks_for_record
from kerasdet.data.records import BadInputError, DetectionDataset

_TF_DECODABLE = {b"\xff\xd8\xff": "jpeg", b"\x89PNG": "png", b"BM": "bmp", b"GIF8": "gif"}


def _format_of(data: bytes):
    for magic, name in _TF_DECODABLE.items():
        if data.startswith(magic):
            return name
    return None


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _bytes(values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _floats(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def record_to_example(dataset: DetectionDataset, index: int, with_masks: bool) -> tf.train.Example:
    """The tf.train.Example of ``dataset.records[index]`` (reads its image file)."""
    record = dataset.records[index]
    path = dataset.image_file(record)
    where = f"record {record.image_id!r} ({path})"
    if not os.path.isfile(path):
        raise BadInputError(f"{where}: image file not found")
    with open(path, "rb") as f:
        data = f.read()
    fmt = None if is_tiff(path) else _format_of(data)
    if fmt is None:  # TIFF or a format tf.io cannot decode: store it as PNG of its RGB pixels
        data, fmt = _png_bytes(read_image(path, where)), "png"
    feature = {
        "image/encoded": _bytes([data]),
        "image/format": _bytes([fmt.encode()]),
        "image/height": _ints([record.height]),
        "image/width": _ints([record.width]),
        "image/index": _ints([index]),
        "image/id": _bytes([str(record.image_id).encode()]),
        "image/filename": _bytes([record.image_path.encode()]),
        "object/bbox": _floats(record.boxes.reshape(-1)),
        "object/label": _ints(record.labels),
        "object/difficult": _ints(record.difficult),
        "object/iscrowd": _ints(record.iscrowd),
    }
    if with_masks:
        feature["object/mask"] = _bytes([_png_bytes(m) for m in masks_for_record(record, where)])
    return tf.train.Example(features=tf.train.Features(feature=feature))


def write_tfrecord(dataset: DetectionDataset, path: str, *, with_masks=None,
                   num_shards: int = 1) -> list[str]:
    """Write ``dataset`` as TFRecord file(s); returns the file names.

    Args:
        path: output file; with ``num_shards`` > 1 the files are ``path-00000-of-0000N``.
        with_masks: store instance masks as PNGs (default: when the data set has masks).
        num_shards: number of files; record i goes to shard i % num_shards.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    with_masks = dataset.has_masks if with_masks is None else with_masks
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    names = ([path] if num_shards == 1 else
             [f"{path}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)])
    writers = [tf.io.TFRecordWriter(name) for name in names]
    try:
        for index in range(len(dataset)):
            example = record_to_example(dataset, index, with_masks)
            writers[index % num_shards].write(example.SerializeToString())
    finally:
        for writer in writers:
            writer.close()
    return names


_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "image/index": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    "image/filename": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "object/bbox": tf.io.VarLenFeature(tf.float32),
    "object/label": tf.io.VarLenFeature(tf.int64),
    "object/difficult": tf.io.VarLenFeature(tf.int64),
    "object/iscrowd": tf.io.VarLenFeature(tf.int64),
}


@tf.autograph.experimental.do_not_convert
def parse_example(serialized, with_masks: bool = False, mask_size: int = DEFAULT_GRID_SIZE) -> dict:
    """Parse one serialized Example into a sample dict (image uint8 [h, w, 3], boxes, labels, ...;
    with masks, ``masks`` [n, mask_size, mask_size] grids over the boxes)."""
    features = dict(_FEATURES)
    if with_masks:
        features["object/mask"] = tf.io.VarLenFeature(tf.string)
    ex = tf.io.parse_single_example(serialized, features)
    dense = {k: tf.sparse.to_dense(v) for k, v in ex.items() if isinstance(v, tf.SparseTensor)}
    image = decode_image_bytes(ex["image/encoded"])
    height = tf.cast(ex["image/height"], tf.int32)
    width = tf.cast(ex["image/width"], tf.int32)
    tf.debugging.Assert(tf.reduce_all(tf.equal(tf.shape(image)[:2], tf.stack([height, width]))),
                        ["TFRecord image size differs from its height/width:", ex["image/filename"]])
    n = tf.size(dense["object/label"])
    tf.debugging.Assert(tf.equal(tf.size(dense["object/bbox"]), 4 * n),
                        ["TFRecord object/bbox is not 4 x labels:", ex["image/filename"]])
    sample = {
        "image": image,
        "boxes": tf.reshape(dense["object/bbox"], [n, 4]),
        "labels": tf.cast(dense["object/label"], tf.int32),
        "difficult": tf.cast(dense["object/difficult"], tf.bool),
        "iscrowd": tf.cast(dense["object/iscrowd"], tf.bool),
        "image_index": tf.cast(ex["image/index"], tf.int32),
    }
    if with_masks:
        def decode_and_crop(png_and_box):
            png, box = png_and_box
            mask = tf.io.decode_png(png, channels=1)[..., 0]
            return crop_masks_to_boxes(mask[tf.newaxis], box[tf.newaxis], mask_size)[0]

        pngs = dense["object/mask"]
        check = tf.debugging.Assert(tf.equal(tf.size(pngs), n),
                                    ["TFRecord has no object/mask per object (written without masks?):",
                                     ex["image/filename"]])
        with tf.control_dependencies([check]):
            # One instance at a time: a single image-sized mask exists at once, not n of them.
            masks = tf.map_fn(decode_and_crop, (pngs, sample["boxes"]),
                              fn_output_signature=tf.TensorSpec([mask_size, mask_size], GRID_DTYPE))
            sample["masks"] = tf.ensure_shape(masks, [None, mask_size, mask_size])
    return sample


# Files handed to read_tfrecord in this process: a DataLossError met while iterating names neither
# the file nor the record, so `named_tfrecord_error` re-reads them one by one to find it.
_opened_files: list = []


def check_tfrecord(path) -> int:
    """Read every record of one TFRecord file (framing and CRCs, no decoding); returns the count.

    Raises BadInputError naming the file and the position of the first corrupt or truncated record.
    """
    path = os.fspath(path)
    count = 0
    try:
        for _ in tf.data.TFRecordDataset(path):
            count += 1
    except tf.errors.OpError as exc:
        raise BadInputError(f"{path}: TFRecord record {count} (0-based; {count} good records before "
                            f"it) is corrupt or truncated: {exc.message}") from exc
    return count


def _check_tfrecord_images(path):
    """BadInputError naming the file, record position and image file name of the first record of
    ``path`` whose Example does not parse or whose image does not decode; None when all do."""
    for position, serialized in enumerate(tf.data.TFRecordDataset(path)):
        try:
            parse_example(serialized)
        except tf.errors.OpError as exc:
            try:
                name = tf.train.Example.FromString(serialized.numpy()).features.feature[
                    "image/filename"].bytes_list.value[0].decode()
            except Exception:  # the Example itself is broken
                name = "?"
            return BadInputError(f"{path}: TFRecord record {position} (image/filename {name!r}) does not "
                                 f"parse or decode: {exc.message.splitlines()[0]}")
    return None


def named_tfrecord_error(error):
    """The BadInputError naming file and record position behind a TensorFlow error met while reading
    TFRecord files of this process (a DataLossError of a corrupt or truncated file; a decoding error
    of a record's image, found by parsing the records again in order), or None."""
    paths = list(dict.fromkeys(_opened_files))
    if isinstance(error, tf.errors.DataLossError):
        for path in paths:
            try:
                check_tfrecord(path)
            except BadInputError as named:
                return named
        return None
    if isinstance(error, tf.errors.InvalidArgumentError):
        for path in paths:
            try:
                named = _check_tfrecord_images(path)
            except tf.errors.OpError:
                continue  # a corrupt file: the DataLossError's business
            if named is not None:
                return named
    return None


def read_tfrecord(paths, *, with_masks: bool = False, shuffle: bool = False, seed=None,
                  shuffle_buffer: int = 1024, repeat: bool = False,
                  mask_size: int = DEFAULT_GRID_SIZE, verify: bool = False) -> tf.data.Dataset:
    """Samples (see kerasdet.data.augment) from TFRecord file(s) written by ``write_tfrecord``.

    Args:
        paths: a file name or a list of them (missing files raise FileNotFoundError naming them).
        with_masks: decode ``object/mask`` (error if the files were written without masks) into
            ``mask_size`` x ``mask_size`` grids over the boxes.
        shuffle: shuffle the serialized records with a buffer of ``shuffle_buffer`` (seeded by ``seed``).
        repeat: repeat forever.
        verify: read every file once first (``check_tfrecord``: framing and CRCs, no decoding), so
            that a corrupt or truncated file stops here, named with its record position. Without
            it such a file fails while iterating with TensorFlow's DataLossError;
            ``kerasdet.data.pipeline.named_input_error`` (used by the training loop) maps that to
            the same named error.
    """
    paths = [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("no TFRecord files given")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"TFRecord file(s) not found: {missing}")
    if verify:
        for path in paths:
            check_tfrecord(path)
    _opened_files[:] = list(dict.fromkeys(_opened_files + [os.path.abspath(p) for p in paths]))[-1000:]
    ds = tf.data.TFRecordDataset(paths, num_parallel_reads=min(len(paths), 4) if len(paths) > 1
                                 else None)
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    return ds.map(lambda s: parse_example(s, with_masks, mask_size), num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)
