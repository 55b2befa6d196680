"""The tf.data input pipeline: decode, augment, resize, pad and batch into the batch dict of DESIGN.md.

Batch layout (B images, N = ``max_boxes`` objects, H x W the padded input size):
    images            float32 [B, H, W, 3]   RGB 0..255, image at the top-left, zero padding bottom/right
    bounding_boxes    dict:
        boxes         float32 [B, N, 4]      (x1, y1, x2, y2) in input-image pixels after resize
        labels        int32   [B, N]         0-based class ids, -1 = padding
        difficult     bool    [B, N]         VOC difficult flags (False for padding)
        iscrowd       bool    [B, N]         COCO crowd flags (False for padding)
    masks             float16 [B, N, M, M]   only with ``with_masks=True``: object n's mask cropped to
                                              its box ``boxes[b, n]`` and resampled to M x M
                                              (``mask_size``, default 112): cell (i, j) holds the
                                              mask's bilinear coverage in [0, 1] at x = x1 + (j + 0.5)
                                              * (x2 - x1) / M, y likewise (kerasdet.ops.masks); the
                                              image-sized mask is kerasdet.evaluation.paste_masks of
                                              the grid into its box, thresholded at 0.5. Padding rows
                                              are 0. M does not depend on the image size.
    image_info        float32 [B, 6]         (original height, original width, scale y, scale x,
                                              resized height, resized width): a box in input pixels maps
                                              back to the original image as x / scale_x, y / scale_y; the
                                              valid (non-padding) region is [0, resized h) x [0, resized w).
                                              With geometric augmentation (expand / crop) "original" is
                                              the augmented image, so this mapping is for evaluation.
    image_index       int32   [B]            position of the record in ``dataset.records`` (TFRecord:
                                              the index stored at writing time)
    proposals         float32 [B, P, 4]      only with ``proposals=``: the image's cached region proposals
                                              (kerasdet.data.proposals; P = ``max_proposals``, the first
                                              of the method's ranking) in input-image pixels, moved by the
                                              same resize / flip / expand / crop-to-canvas as the boxes,
                                              clipped to the image; zero rows are padding

Resize modes (one of them):
    min_size=S, max_size=M   shorter side to S unless the longer side would pass M (Faster R-CNN);
                             ``min_size`` may be a tuple: in training a random choice per image
                             (multi-scale training / scale jitter), in evaluation its largest value.
    image_size=(H, W)        letterbox: fit inside H x W keeping aspect ratio, pad bottom/right.
    image_size + keep_aspect_ratio=False   stretch to exactly H x W (SSD / RefineDet).
Every padded size is then rounded up to a multiple of ``stride`` (e.g. 32 for FPN); images of one batch
are padded to the largest of them. Padding never crops.
"""
from __future__ import annotations

import warnings

import numpy as np
import tensorflow as tf

from kerasdet.data import augment as aug
from kerasdet.data.decode import decode_image_bytes, decode_image_file_python
from kerasdet.data.images import check_image_pixels, is_tiff, read_image
from kerasdet.data.mask_grids import DEFAULT_GRID_SIZE, GRID_DTYPE, crop_masks_to_boxes
from kerasdet.data.masks import masks_for_record
from kerasdet.data.records import BadInputError, BadInputWarning, DetectionDataset, check_on_bad
from kerasdet.data.resize import ResizeRule, image_info, round_up

# Proposals ride through augmentation as extra objects with this label, so every geometric step
# moves them exactly as it moves the ground truth; they are split off again before padding.
_PROPOSAL_LABEL = -2
# Steps that use the boxes as objects (the SSD crop samples windows by their IoU with the objects and
# keeps objects by centre): proposals must not take part, so they are refused with proposals.
_PROPOSAL_UNSAFE_STEPS = ("crop",)

AUTOTUNE = tf.data.AUTOTUNE
# The default cap on the padded object axis: every batch holds B x N boxes (and with masks
# B x N x M x M grids, 25 MB per image at N = 1000, M = 112), so one image with thousands of
# annotated objects must not set N for all. COCO's largest image has 93 instances.
MAX_INSTANCES_PER_IMAGE = 1000
# The map functions hold no tensor-dependent Python control flow (tf.cond is explicit), so AutoGraph
# is skipped: measured, it tripled the tracing time of the SSD augmentation chain (4.4 s vs 1.4 s).
_graph_fn = tf.autograph.experimental.do_not_convert


# ----------------------------------------------------------------------------- sources
def _decode_image(contents, tiff_path, is_tiff_file):
    """uint8 [h, w, 3] from encoded bytes; TIFF (which tf.io cannot decode) goes through read_image."""
    image = tf.cond(is_tiff_file, lambda: decode_image_file_python(tiff_path),
                    # The readers read every header and dataset_samples checks the records' sizes
                    # against the pixel limit: no second header check per decode.
                    lambda: decode_image_bytes(contents, check_header=False))
    image.set_shape([None, None, 3])
    return image


def dataset_samples(dataset: DetectionDataset, with_masks: bool = False,
                    shuffle: bool = False, seed=None, decoder: str = "tf",
                    repeat: bool = False, mask_size: int = DEFAULT_GRID_SIZE,
                    shard=None, on_bad: str = "error") -> tf.data.Dataset:
    """Per-image samples (see kerasdet.data.augment) read from the image files of ``dataset``.

    decoder: "tf" decodes in parallel with tf.io (JPEG, PNG incl. 16-bit, BMP, GIF; TIFF through
        read_image); "python" decodes every image with read_image (Pillow / tifffile), slower.
        Either way a record whose image fails to decode (corrupt pixels behind a valid header) or
        differs from its annotated size is named, file and record: on_bad="error" stops with a
        BadInputError naming it (callers map the TensorFlow error back with
        ``named_input_error``), on_bad="skip" drops it and counts it in ``dataset.report``.
    A decoded size that differs from the record's raises an error naming the file.
    Shuffling happens on the (cheap) record indices before decoding. With ``with_masks`` each
    record's masks are decoded at the image's own size and cropped at once to ``mask_size`` grids
    over their boxes (kerasdet.data.mask_grids); nothing image-sized leaves this step.
    ``shard=(count, index)`` keeps every count-th sample of the (shuffled) stream, before decoding.
    """
    if decoder not in ("tf", "python"):
        raise ValueError(f"decoder must be 'tf' or 'python', got {decoder!r}")
    records = dataset.records
    n = len(records)
    if n == 0:
        raise ValueError("the data set has no records")
    dataset.validate()
    for index, r in enumerate(records):  # decoding allocates what a record declares: bombs stop here
        check_image_pixels(r.height, r.width, f"record {index} (image id {r.image_id!r}, "
                                              f"{r.image_path})")
    counts = np.array([r.num_objects for r in records], np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    total = int(counts.sum())
    all_boxes = tf.constant(np.concatenate([r.boxes for r in records]).reshape(total, 4), tf.float32)
    all_labels = tf.constant(np.concatenate([r.labels for r in records]).astype(np.int32).reshape(total))
    all_difficult = tf.constant(np.concatenate([r.difficult for r in records]).reshape(total))
    all_crowd = tf.constant(np.concatenate([r.iscrowd for r in records]).reshape(total))
    paths = [dataset.image_file(r) for r in records]
    table = {
        "index": np.arange(n, dtype=np.int32),
        "path": np.array(paths),
        "tiff": np.array([is_tiff(p) for p in paths]),
        "start": starts, "count": counts,
        "height": np.array([r.height for r in records], np.int32),
        "width": np.array([r.width for r in records], np.int32),
    }
    source = unshuffled = tf.data.Dataset.from_tensor_slices(table)
    if shuffle:
        source = source.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    if repeat:  # after shuffle: every pass is reshuffled
        source = source.repeat()
    if shard is not None:  # after the shuffle, which every worker draws alike from the same seed
        source = source.shard(*shard)

    def load_masks(index):
        return masks_for_record(records[int(index)])

    @_graph_fn
    def load(row):
        if decoder == "python":
            image = decode_image_file_python(row["path"])
        else:
            image = _decode_image(tf.io.read_file(row["path"]), row["path"], row["tiff"])
        shape = tf.shape(image)
        tf.debugging.Assert(
            tf.reduce_all(tf.equal(shape[:2], tf.stack([row["height"], row["width"]]))),
            ["image size differs from its annotation:", row["path"], "decoded", shape,
             "annotated height/width", row["height"], row["width"]])
        sl = tf.range(row["start"], row["start"] + row["count"])
        sample = {
            "image": image,
            "boxes": tf.gather(all_boxes, sl),
            "labels": tf.gather(all_labels, sl),
            "difficult": tf.gather(all_difficult, sl),
            "iscrowd": tf.gather(all_crowd, sl),
            "image_index": row["index"],
        }
        if with_masks:
            masks = tf.numpy_function(load_masks, [row["index"]], tf.uint8, stateful=False)
            count = tf.cast(row["count"], tf.int32)
            masks = tf.reshape(masks, tf.stack([count, shape[0], shape[1]]))
            sample["masks"] = crop_masks_to_boxes(masks, sample["boxes"], mask_size)
        return sample

    if on_bad == "skip":
        return _guarded(source, load, records, dataset, on_bad)
    # on_bad="error": the plain map, at full speed; a failure is named afterwards (named_input_error
    # decodes the records again, in order, until it meets the one that fails).
    _plain_pipelines[:] = _plain_pipelines[-19:] + [(unshuffled, load, records, dataset)]
    return source.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)


# ----------------------------------------------------------------------------- decode failures
# The record sources of the pipelines built with on_bad="error" (the last 20), for named_input_error.
_plain_pipelines: list = []
# What TensorFlow's decoders and the size check say: only such errors start the search (a model's
# own InvalidArgumentError must not cost a decoding pass over the data).
_DECODE_WORDS = ("decode", "jpeg", "png", "gif", "bmp", "image", "iteratorgetnext", "read_file",
                 "readfile", "numpy_function", "pyfunc")


def named_input_error(error):
    """The BadInputError (naming file and record) behind a TensorFlow error raised while iterating
    a pipeline of this module (an image that fails to decode, a corrupt TFRecord file), or None when
    ``error`` is something else.

    TensorFlow's decoders do not name their input, so for a decoding error the records of the
    pipelines built in this process are decoded again, in order, until one fails: at most one pass
    over the data, paid only after a failure (the pipeline itself carries no per-record guard).
    """
    import tensorflow as tf

    from kerasdet.data.tfrecord import named_tfrecord_error

    text = str(error).lower()
    if not isinstance(error, tf.errors.DataLossError) and not any(word in text for word in _DECODE_WORDS):
        return None
    named = named_tfrecord_error(error)
    if named is not None:
        return named
    if not isinstance(error, (tf.errors.InvalidArgumentError, tf.errors.UnknownError)):
        return None
    for unshuffled, load, records, dataset in reversed(_plain_pipelines):
        found = []
        for _ in _guarded(unshuffled, load, records, dataset, found):
            if found:
                break
        if found:
            return found[0]
    return None


def _guarded(source, load, records, dataset, on_bad):
    """``source.map(load)``, where a record whose decoding (or size check) fails is named, file and
    record, and dropped: on_bad="skip" counts it in ``dataset.report`` (once per record, whatever
    the number of epochs); a list ``on_bad`` receives its BadInputError (named_input_error's search).

    tf.io's decoders raise without naming their input and a graph has no try/except, so each record
    is decoded in a one-element data set under ``ignore_errors``; a placeholder with ok=False follows
    it and ``take(1)`` keeps the first, so a failure leaves an element saying which record failed.
    Good records never leave the graph; only failures call Python (to name them and ask Pillow why).
    Measured on 640 x 480 JPEGs (2 busy cores): 5.6 ms of CPU per image against 4.3 ms for the plain
    map, which is why only on_bad="skip" (which must go on past a bad record) pays it.
    """
    spec = source.map(load).element_spec
    placeholder = tf.nest.map_structure(
        lambda s: tf.zeros([0 if d is None else d for d in s.shape.as_list()], s.dtype), spec)

    @_graph_fn
    def attempt(row):
        decoded = (tf.data.Dataset.from_tensors(row).map(load)
                   .ignore_errors()
                   .map(lambda sample: (sample, True, row["index"])))
        failed = tf.data.Dataset.from_tensors((placeholder, False, row["index"]))
        return decoded.concatenate(failed).take(1)

    def on_failure(index):
        index = int(index)
        record = records[index]
        path = dataset.image_file(record)
        where = f"record {index} (image id {record.image_id!r}, {path})"
        error = BadInputError(f"{where}: cannot decode the image during the run: {_why(path, record, where)}")
        if isinstance(on_bad, list):
            on_bad.append(error)
            return False
        if dataset.report.add_once("undecodable image skipped in the pipeline", where, index):
            warnings.warn(f"{error} (skipped, on_bad='skip')", BadInputWarning, stacklevel=1)
        return False

    @_graph_fn
    def keep(sample, ok, index):
        return tf.cond(ok, lambda: tf.constant(True),
                       lambda: tf.py_function(on_failure, [index], tf.bool))

    # One element per inner data set and block_length 1: the interleave keeps the source order while
    # its parallel calls decode several records at once.
    guarded = source.interleave(attempt, cycle_length=AUTOTUNE, block_length=1,
                                num_parallel_calls=AUTOTUNE, deterministic=True)
    return guarded.filter(keep).map(lambda sample, ok, index: sample)


def _why(path, record, where):
    """Why a record failed in the graph, in Pillow's words where it has any."""
    try:
        image = read_image(path, where)
    except BadInputError as exc:
        return str(exc).removeprefix(f"{where}: ")
    if image.shape[:2] != (record.height, record.width):
        return (f"the image is {image.shape[0]}x{image.shape[1]} (HxW), its annotation says "
                f"{record.height}x{record.width}")
    return "TensorFlow's decoder refused it (Pillow reads it: re-encode the file)"


# ----------------------------------------------------------------------------- resize
def resize_scale(height, width, min_size=None, max_size=None, image_size=None,
                 keep_aspect_ratio=True):
    """Target (resized height, resized width) for an image of ``height`` x ``width`` (float tensors).

    Kept for callers of the older API: the rule itself is `kerasdet.data.resize.ResizeRule`.
    """
    rule = ResizeRule(min_size=min_size, max_size=max_size, image_size=image_size,
                      keep_aspect_ratio=keep_aspect_ratio)
    return rule.target_size(height, width)


def resize_sample(sample: dict, new_h, new_w) -> dict:
    """Resize image (bilinear) and boxes (scaled) to new_h x new_w; adds image_info. Mask grids cover
    their boxes, so they scale with them unchanged."""
    h, w = aug._image_hw(sample)
    # Casting each side before stacking: tf.image.resize fails on Cast(Pack(dynamic, constant)).
    size = tf.stack([tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)])
    scale_y, scale_x = new_h / h, new_w / w
    out = dict(sample)
    out["image"] = tf.image.resize(sample["image"], size, method="bilinear")
    out["boxes"] = sample["boxes"] * tf.stack([scale_x, scale_y, scale_x, scale_y])
    out["image_info"] = image_info(h, w, new_h, new_w)
    return out


def _crop_to_canvas(sample: dict, canvas, seed) -> dict:
    """Random crop of an image larger than ``canvas`` (H, W) down to it (no-op when it fits)."""
    h, w = aug._image_hw(sample)
    ch, cw = tf.minimum(h, float(canvas[0])), tf.minimum(w, float(canvas[1]))
    offset = tf.floor(tf.random.stateless_uniform([2], seed) * tf.stack([h - ch + 1.0, w - cw + 1.0]))
    window = tf.stack([offset[1], offset[0], offset[1] + cw, offset[0] + ch])
    out = aug.crop(sample, window, center_rule=False)
    out["image_info"] = tf.concat([sample["image_info"][:4], tf.stack([ch, cw])], axis=0)
    return out


def pad_sample(sample: dict, height, width, max_boxes: int) -> dict:
    """Pad the image bottom-right to ``height`` x ``width`` and objects (mask grids included) to
    ``max_boxes`` (label -1).

    Objects beyond ``max_boxes`` are cut (the pipeline warns at build time when that can happen).
    """
    shape = tf.shape(sample["image"])
    pad_h, pad_w = height - shape[0], width - shape[1]
    out = {"image": tf.pad(sample["image"], [[0, pad_h], [0, pad_w], [0, 0]])}
    n = tf.minimum(tf.shape(sample["labels"])[0], max_boxes)
    extra = max_boxes - n
    out["boxes"] = tf.pad(sample["boxes"][:n], [[0, extra], [0, 0]])
    out["labels"] = tf.pad(sample["labels"][:n], [[0, extra]], constant_values=-1)
    out["difficult"] = tf.pad(sample["difficult"][:n], [[0, extra]])
    out["iscrowd"] = tf.pad(sample["iscrowd"][:n], [[0, extra]])
    if "masks" in sample:
        out["masks"] = tf.pad(sample["masks"][:n], [[0, extra], [0, 0], [0, 0]])
    for key in ("image_info", "image_index"):
        out[key] = sample[key]
    return out


# ----------------------------------------------------------------------------- builder
def build_dataset(dataset, batch_size: int, training: bool = False, *, image_size=None,
                  min_size=None, max_size=None, keep_aspect_ratio: bool = True, stride: int = 1,
                  augment="default", scale_jitter=None, shuffle=None, seed=None, max_boxes=None,
                  with_masks: bool = False, mask_size: int = DEFAULT_GRID_SIZE,
                  drop_remainder: bool = False, fixed_size=None,
                  mean_rgb=aug.MEAN_RGB, decoder: str = "tf",
                  repeat: bool = False, prefetch: bool = True, min_size_test=None,
                  size_rounding: str = "round", input_settings=None, shard=None, proposals=None,
                  max_proposals: int = 2000, on_bad: str = "error") -> tf.data.Dataset:
    """Build the batched tf.data.Dataset of DESIGN.md's batch dict (layout in the module docstring).

    Args:
        dataset: a DetectionDataset, or a TFRecord file name / list of names written by
            ``kerasdet.data.tfrecord.write_tfrecord``.
        batch_size: images per batch.
        training: enables shuffling and augmentation defaults.
        image_size: (H, W) or int: fixed-size mode (letterbox, or stretch with keep_aspect_ratio=False).
        min_size, max_size: shorter-side mode; ``min_size`` may be a tuple for multi-scale training.
        min_size_test: the shorter side outside training (default: the largest ``min_size``).
        size_rounding: "round" (default) or "floor" (torchvision) for the resized size.
        stride: pad each image's height and width up to a multiple of it (32 for FPN).
        input_settings: instead of the resize arguments above, a model's ``input_settings`` dict or
            a `kerasdet.data.resize.ResizeRule` (the rule predict and export use too).
        augment: "default" (= "flip" when training, nothing otherwise), None, "none", "flip", "ssd", a
            list of steps from kerasdet.data.augment.AUGMENTATIONS, or callables f(sample, seed).
            Augmentation runs only when ``training``.
        scale_jitter: (low, high): in training, multiply the resize scale by U[low, high]. In
            shorter-side mode the image just grows or shrinks; in fixed-size mode an image larger than
            the canvas is randomly cropped to it (boxes clipped, empty ones dropped; "large scale
            jitter"), a smaller one padded.
        shuffle: shuffle the records each epoch (default: ``training``).
        seed: makes shuffling and augmentation repeat exactly; None = fresh randomness.
        max_boxes: N of the padded object axis; default: the data set's largest object count, at
            most MAX_INSTANCES_PER_IMAGE (1000) (TFRecord input: 100). Images with more objects
            keep their first N, with a BadInputWarning counting and naming them.
        with_masks: also produce instance masks (COCO segmentations, or PNGs stored in the TFRecord)
            as ``mask_size`` x ``mask_size`` grids over the boxes (layout in the module docstring).
        mask_size: M of the mask grids (default 112, TF Model Garden's; measured against targets
            cut from full masks, 28 x 28 RoI targets differ on about 0.5 % of their boundary pixels
            at 112 and 1.4 % at 56). 100 instances take 2 * 100 * M * M bytes per image.
        drop_remainder: drop a last incomplete batch (static batch dimension).
        fixed_size: (H, W) to pad every batch to (instead of the batch's largest image), e.g. to avoid
            retracing in shorter-side mode; must be at least the largest resized image.
        mean_rgb: fill colour of the expand augmentation.
        decoder: "tf" (fast, default) or "python" (every decode error names the file); see
            ``dataset_samples``. TFRecord input always decodes with tf.io.
        repeat: repeat forever (reshuffling each pass); use with ``fit(steps_per_epoch=...)``. One
            iterator then serves all epochs, which saves the iterator start-up (tracing the
            augmentation functions' graphs, filling buffers; about a second per epoch measured with
            the SSD chain on 2 busy cores) that a new epoch of a finite data set pays.
        prefetch: add ``prefetch(AUTOTUNE)``.
        shard: (count, index): this input pipeline's share of a multi-worker run. Worker ``index``
            gets samples index, index + count, ... of the stream a single process would read
            (same shuffle, same augmentation draws), so the workers' batches together are the
            single process's global batch (give batch_size per worker). DetectionDataset input is
            sharded on the record indices, before decoding; TFRecord input after parsing.
        proposals: a proposal cache (kerasdet.data.proposals.ProposalCache or its .npz path) with an
            entry for every record: adds ``batch["proposals"]`` (layout in the module docstring).
            DetectionDataset input only; not with masks nor with the "crop" step or custom callables
            (augment "flip", "photometric", "expand" and scale_jitter are supported).
        max_proposals: P, the padded proposal axis: each image keeps its first P proposals.
        on_bad: a DetectionDataset record whose image fails to decode in the pipeline (corrupt
            pixels behind a valid header) is named, file and record; "error" (default) stops with
            that name, "skip" drops it and counts it in ``dataset.report`` (see ``dataset_samples``).
    """
    check_on_bad(on_bad)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shard is not None:
        shard = (int(shard[0]), int(shard[1]))
        if not 0 <= shard[1] < shard[0]:
            raise ValueError(f"shard must be (count, index) with 0 <= index < count, got {shard}")
    if input_settings is not None:
        if image_size is not None or min_size is not None:
            raise ValueError("give input_settings or the resize arguments (image_size / min_size), not both")
        rule = ResizeRule.from_settings(input_settings)
    else:
        if (image_size is None) == (min_size is None):
            raise ValueError("give exactly one resize mode: image_size=(H, W), or min_size (+ max_size)")
        rule = ResizeRule(min_size=min_size, max_size=max_size, min_size_test=min_size_test,
                          image_size=image_size, keep_aspect_ratio=keep_aspect_ratio, stride=stride,
                          size_rounding=size_rounding)
    image_size, stride = rule.image_size, rule.stride
    shuffle = training if shuffle is None else shuffle
    steps = aug.resolve_augment(("flip" if training else None) if augment == "default" else augment)
    if not training:
        steps = ()
    jitter = None
    if scale_jitter is not None and training:
        jitter = (float(scale_jitter[0]), float(scale_jitter[1]))
        if not 0 < jitter[0] <= jitter[1]:
            raise ValueError(f"scale_jitter must be (low, high) with 0 < low <= high, got {scale_jitter}")

    cache = None
    if proposals is not None:
        cache = _proposal_source(proposals, dataset, steps, with_masks, max_proposals)

    if isinstance(dataset, DetectionDataset):
        if with_masks and not dataset.has_masks:
            warnings.warn("with_masks=True but the data set has no masks: masks will be all zero",
                          stacklevel=2)
        samples = dataset_samples(dataset, with_masks=with_masks, shuffle=shuffle, seed=seed,
                                  decoder=decoder, repeat=repeat, mask_size=mask_size, shard=shard,
                                  on_bad=on_bad)
        most = dataset.max_objects()
        if max_boxes is None:
            max_boxes = min(max(most, 1), MAX_INSTANCES_PER_IMAGE)
        if most > max_boxes:
            over = [i for i, r in enumerate(dataset.records) if r.num_objects > max_boxes]
            names = ", ".join(f"record {i} ({dataset.records[i].image_path}: "
                              f"{dataset.records[i].num_objects})" for i in over[:5])
            warnings.warn(f"{len(over)} image(s) have more than max_boxes={max_boxes} objects (up to "
                          f"{most}; e.g. {names}): each keeps its first {max_boxes} "
                          f"(raise max_boxes to keep more)", BadInputWarning, stacklevel=2)
    else:
        from kerasdet.data.tfrecord import read_tfrecord

        samples = read_tfrecord(dataset, with_masks=with_masks, shuffle=shuffle, seed=seed,
                                repeat=repeat, mask_size=mask_size)
        if shard is not None:
            samples = samples.shard(*shard)
        max_boxes = 100 if max_boxes is None else max_boxes
    if cache is not None:
        samples = samples.map(_proposal_reader(cache, dataset, max_proposals),
                              num_parallel_calls=AUTOTUNE, deterministic=True)

    def to_float(sample):
        return dict(sample, image=tf.cast(sample["image"], tf.float32))

    @_graph_fn
    def transform(sample, element_seed):
        sample = to_float(sample)
        if cache is not None:
            sample = _merge_proposals(sample)
        if steps:
            sample = aug.apply_augmentations(sample, steps, element_seed, mean_rgb)
        h, w = aug._image_hw(sample)
        new_h, new_w = rule.target_size(h, w, training=training, seed=aug._sub_seed(element_seed, 1))
        if jitter is not None:
            factor = tf.random.stateless_uniform([], aug._sub_seed(element_seed, 2), jitter[0],
                                                 jitter[1])
            new_h = tf.maximum(tf.round(new_h * factor), 1.0)
            new_w = tf.maximum(tf.round(new_w * factor), 1.0)
        sample = resize_sample(sample, new_h, new_w)
        if jitter is not None and image_size is not None and jitter[1] > 1.0:
            sample = _crop_to_canvas(sample, image_size, aug._sub_seed(element_seed, 3))
        sample = aug.clip_and_drop_empty(sample)
        if cache is not None:
            sample, boxes = _split_proposals(sample)
        shape = tf.shape(sample["image"])
        canvas_h, canvas_w = rule.canvas_size(shape[0], shape[1])
        padded = pad_sample(sample, canvas_h, canvas_w, max_boxes)
        if cache is not None:
            boxes = boxes[:max_proposals]
            padded["proposals"] = tf.pad(boxes, [[0, max_proposals - tf.shape(boxes)[0]], [0, 0]])
        return padded

    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    if shard is not None:  # each sample keeps the augmentation draw it has in a single process
        seeds = seeds.shard(*shard)
    ds = tf.data.Dataset.zip(samples, seeds)
    ds = ds.map(transform, num_parallel_calls=AUTOTUNE, deterministic=True)

    @_graph_fn
    def finish(sample):
        batch = {
            "images": sample["image"],
            "bounding_boxes": {k: sample[k] for k in ("boxes", "labels", "difficult", "iscrowd")},
            "image_info": sample["image_info"],
            "image_index": sample["image_index"],
        }
        if with_masks:
            batch["masks"] = sample["masks"]
        if cache is not None:
            batch["proposals"] = sample["proposals"]
        return batch

    padded_shapes = {
        "image": [None, None, 3], "boxes": [max_boxes, 4], "labels": [max_boxes],
        "difficult": [max_boxes], "iscrowd": [max_boxes], "image_info": [6], "image_index": [],
    }
    padding_values = {
        "image": 0.0, "boxes": 0.0, "labels": -1, "difficult": False, "iscrowd": False,
        "image_info": 0.0, "image_index": -1,
    }
    if cache is not None:
        padded_shapes["proposals"] = [max_proposals, 4]
        padding_values["proposals"] = 0.0
    if fixed_size is not None:
        fh, fw = (round_up(int(v), stride) for v in fixed_size)
        padded_shapes["image"] = [fh, fw, 3]
    if with_masks:
        padded_shapes["masks"] = [max_boxes, mask_size, mask_size]
        padding_values["masks"] = tf.constant(0, GRID_DTYPE)
    if fixed_size is not None:
        @_graph_fn
        def check_fits(sample):
            shape = tf.shape(sample["image"])
            tf.debugging.assert_less_equal(shape[:2], tf.constant([fh, fw]),
                                           message="fixed_size is smaller than a resized image")
            return sample
        ds = ds.map(check_fits)
    ds = ds.padded_batch(batch_size, padded_shapes=padded_shapes, padding_values=padding_values,
                         drop_remainder=drop_remainder)
    ds = ds.map(finish, num_parallel_calls=AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    return ds.prefetch(AUTOTUNE) if prefetch else ds


# ----------------------------------------------------------------------------- proposals
def _proposal_source(proposals, dataset, steps, with_masks, max_proposals):
    """The checked ProposalCache of ``build_dataset(proposals=...)``."""
    from kerasdet.data.proposals import load_proposal_cache

    if not isinstance(dataset, DetectionDataset):
        raise ValueError("proposals= needs a DetectionDataset (the cache is keyed by the records' image "
                         "ids); TFRecord input does not carry them")
    if with_masks:
        raise ValueError("proposals= does not combine with with_masks=True")
    if int(max_proposals) < 1:
        raise ValueError(f"max_proposals must be >= 1, got {max_proposals}")
    unsafe = [s if isinstance(s, str) else getattr(s, "__name__", repr(s)) for s in steps
              if callable(s) or s in _PROPOSAL_UNSAFE_STEPS]
    if unsafe:
        raise ValueError(f"augmentation step(s) {unsafe} cannot move proposals with the boxes; with "
                         "proposals= use 'flip', 'photometric', 'expand' and scale_jitter")
    cache = load_proposal_cache(proposals)
    cache.check_dataset(dataset, "build_dataset(proposals=...): ")
    return cache


def _proposal_reader(cache, dataset, max_proposals):
    """Map function adding each sample's cached proposals (original pixels, first max_proposals)."""
    ids = [r.image_id for r in dataset.records]

    def lookup(index):
        return cache.get(ids[int(index)])[:max_proposals].astype(np.float32)

    @_graph_fn
    def add(sample):
        boxes = tf.numpy_function(lookup, [sample["image_index"]], tf.float32, stateful=False)
        return dict(sample, proposals=tf.reshape(boxes, [-1, 4]))

    return add


def _merge_proposals(sample):
    sample = dict(sample)
    proposals = sample.pop("proposals")
    count = tf.shape(proposals)[0]
    sample["boxes"] = tf.concat([sample["boxes"], proposals], axis=0)
    sample["labels"] = tf.concat([sample["labels"], tf.fill([count], _PROPOSAL_LABEL)], axis=0)
    for key in ("difficult", "iscrowd"):
        sample[key] = tf.concat([sample[key], tf.zeros([count], tf.bool)], axis=0)
    return sample


def _split_proposals(sample):
    """(the sample without the proposal rows, the proposals that survived augmentation and clipping)."""
    is_proposal = tf.equal(sample["labels"], _PROPOSAL_LABEL)
    return aug.filter_objects(sample, ~is_proposal), tf.boolean_mask(sample["boxes"], is_proposal)
