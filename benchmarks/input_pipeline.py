"""Input-pipeline throughput (decode + augment + resize + batch) on a generated synthetic data set.

Prints one JSON object: per setting, the steady-state images/s of a repeating pipeline over
``--epochs`` x ``--num-images`` images, the iterator start-up time (first batch of a fresh
iterator) that a finite data set pays at every epoch, and the bytes per image of a batch. A
``memory`` entry gives the batch bytes per image with instance masks at ``--memory-image-size``
(800 x 1333 by default, padded to stride 32) with ``--memory-objects`` object slots, next to what
image-sized uint8 masks of the same slots would take.

    python benchmarks/input_pipeline.py --num-images 256 --batch-size 8 --epochs 2

The ``train_flip_800x1333_stride32`` setting is the R50-FPN training input (random flip, shorter
side 800, longer at most 1333, padded to stride 32, batch 2) on COCO-sized JPEGs
(``--train-image-size``, 480 x 640 by default, so every image is upsampled as COCO's are). Its
images/s is printed next to what the training step consumes, 2 / step seconds, with the step time
from ``--step-seconds`` or from ``benchmarks/train_speed.py --output`` JSON (``--train-speed-json``,
the slowest model's step is used):

    python benchmarks/train_speed.py --output train_speed.json
    python benchmarks/input_pipeline.py --settings train_flip_800x1333_stride32 \
        --train-speed-json train_speed.json
"""
import argparse
import json
import os
import platform
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SETTINGS = {
    # name: (source, build_dataset keyword arguments)
    "eval_letterbox_320": ("files", dict(training=False, image_size=(320, 320))),
    "eval_letterbox_320_python_decoder": ("files", dict(training=False, image_size=(320, 320),
                                                        decoder="python")),
    "train_flip_shorter_side_256_stride32": (
        "files", dict(training=True, min_size=256, max_size=400, stride=32, augment="flip")),
    "train_ssd_320": ("files", dict(training=True, image_size=(320, 320), keep_aspect_ratio=False,
                                    augment="ssd")),
    "train_ssd_320_tfrecord": ("tfrecord", dict(training=True, image_size=(320, 320),
                                                keep_aspect_ratio=False, augment="ssd")),
    "train_flip_masks_256": ("files", dict(training=True, image_size=(256, 256), augment="flip",
                                           with_masks=True)),
    # The R50-FPN training input (batch 2, COCO-sized JPEGs: --train-image-size). build_dataset's
    # defaults are the settings measured for it: both maps with num_parallel_calls=AUTOTUNE
    # (decode + augment + resize of several images at once), prefetch(AUTOTUNE) after batching.
    "train_flip_800x1333_stride32": (
        "files_large", dict(training=True, min_size=800, max_size=1333, stride=32,
                            augment="flip")),
}
# Settings whose batch size is fixed (the training step's), whatever --batch-size says.
FIXED_BATCH = {"train_flip_800x1333_stride32": 2}


def batch_bytes_per_image(batch):
    """Bytes of all tensors of one batch divided by its images, and of its `masks` alone."""
    import tensorflow as tf

    images = int(batch["images"].shape[0])
    total = sum(t.numpy().nbytes for t in tf.nest.flatten(batch))
    masks = batch["masks"].numpy().nbytes if "masks" in batch else 0
    return total // images, masks // images


def measure(make, num_images, batch_size, epochs):
    """Steady-state images/s of a repeating pipeline, and the start-up cost of a finite one.

    Start-up (first batch of a fresh iterator: graph instantiation, buffer filling) is paid once per
    epoch by a finite data set, once per run by ``repeat=True``; both numbers are reported.
    """
    finite = make(repeat=False)
    start = time.perf_counter()
    first = next(iter(finite))
    startup = time.perf_counter() - start
    per_image, _ = batch_bytes_per_image(first)
    batches = max(1, epochs * num_images // batch_size)
    iterator = iter(make(repeat=True))
    next(iterator)  # warm-up: tracing already done, buffers filling
    start = time.perf_counter()
    images = sum(int(next(iterator)["images"].shape[0]) for _ in range(batches))
    elapsed = time.perf_counter() - start
    return {"images_per_second": round(images / elapsed, 1),
            "iterator_startup_seconds": round(startup, 2), "timed_images": images,
            "batch_bytes_per_image": per_image}


def measure_memory(workdir, image_size, objects, seed):
    """Batch bytes per image with instance masks on large images with many object slots."""
    from kerasdet.data.pipeline import build_dataset
    from kerasdet.data.synthetic import make_dataset

    dataset = make_dataset(os.path.join(workdir, "large"), 2, seed=seed, image_size=image_size,
                           object_size=(16, 96), max_objects=objects)
    ds = build_dataset(dataset, 2, training=True, min_size=min(image_size),
                       max_size=max(image_size), stride=32, with_masks=True, max_boxes=objects,
                       seed=seed)
    batch = next(iter(ds))
    per_image, masks = batch_bytes_per_image(batch)
    _, height, width, _ = batch["images"].shape
    return {"canvas": [int(height), int(width)], "object_slots": objects,
            "objects_in_images": [r.num_objects for r in dataset.records],
            "mask_grid": list(batch["masks"].shape[2:]), "mask_dtype": batch["masks"].dtype.name,
            "batch_bytes_per_image": per_image, "mask_bytes_per_image": masks,
            "image_sized_uint8_mask_bytes_per_image": objects * int(height) * int(width)}


def training_step_seconds(args):
    """The training step the 800 x 1333 pipeline feeds: --step-seconds, or the slowest kerasdet
    step of a train_speed.py JSON file, or None."""
    if args.step_seconds:
        return args.step_seconds
    if args.train_speed_json:
        with open(args.train_speed_json) as f:
            models = json.load(f)["models"]
        return max(entry["kerasdet_step_s"] for entry in models.values())
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--image-size", type=int, nargs=2, default=(256, 320), metavar=("H", "W"),
                        help="size of the generated images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="how many epochs' worth of images to time")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where to write the data (default: a temp dir)")
    parser.add_argument("--memory-image-size", type=int, nargs=2, default=(800, 1333),
                        metavar=("H", "W"), help="image size of the mask memory figure")
    parser.add_argument("--memory-objects", type=int, default=100,
                        help="object slots (max_boxes) of the mask memory figure")
    parser.add_argument("--train-image-size", type=int, nargs=2, default=(480, 640),
                        metavar=("H", "W"), help="generated image size of the 800 x 1333 setting")
    parser.add_argument("--step-seconds", type=float, default=None,
                        help="training-step seconds at batch 2 (what the pipeline must feed)")
    parser.add_argument("--train-speed-json", default=None,
                        help="benchmarks/train_speed.py --output file to read the step time from")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from kerasdet.data.pipeline import build_dataset
    from kerasdet.data.synthetic import make_dataset
    from kerasdet.data.tfrecord import write_tfrecord

    workdir = args.workdir or tempfile.mkdtemp(prefix="kerasdet-bench-")
    start = time.perf_counter()
    dataset = make_dataset(os.path.join(workdir, "synthetic"), args.num_images, seed=args.seed,
                           image_size=tuple(args.image_size), object_size=(16, 128), max_objects=6)
    generate_seconds = time.perf_counter() - start
    tfrecord = large = None
    results = {}
    for name in args.settings:
        source, kwargs = SETTINGS[name]
        if source == "tfrecord" and tfrecord is None:
            tfrecord = write_tfrecord(dataset, os.path.join(workdir, "train.tfrecord"))
        if source == "files_large" and large is None:
            large = make_dataset(os.path.join(workdir, "synthetic_large"), args.num_images,
                                 seed=args.seed, image_size=tuple(args.train_image_size),
                                 object_size=(16, 256), max_objects=6)
        data = {"files": dataset, "tfrecord": tfrecord, "files_large": large}[source]
        batch_size = FIXED_BATCH.get(name, args.batch_size)

        def make(repeat, data=data, kwargs=kwargs, batch_size=batch_size):
            return build_dataset(data, batch_size, seed=args.seed, max_boxes=8, repeat=repeat,
                                 **kwargs)

        results[name] = measure(make, args.num_images, batch_size, args.epochs)
        results[name]["batch_size"] = batch_size
        if source == "files_large":
            results[name]["source_image_size"] = list(args.train_image_size)
        if name in FIXED_BATCH:
            step = training_step_seconds(args)
            if step is not None:
                consumed = batch_size / step
                results[name].update(
                    training_step_seconds=round(step, 3),
                    training_consumes_images_per_second=round(consumed, 3),
                    pipeline_over_training=round(results[name]["images_per_second"] / consumed, 1))
    memory = measure_memory(workdir, tuple(args.memory_image_size), args.memory_objects, args.seed)
    print(json.dumps({
        "benchmark": "input_pipeline",
        "num_images": args.num_images, "image_size": list(args.image_size),
        "batch_size": args.batch_size, "epochs": args.epochs,
        "generate_seconds": round(generate_seconds, 2),
        "cpu_count": os.cpu_count(), "tensorflow": tf.__version__, "python": platform.python_version(),
        "results": results, "memory": memory,
    }, indent=2))


if __name__ == "__main__":
    main()
