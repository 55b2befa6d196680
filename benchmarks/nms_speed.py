"""Speed of the two NMS forms behind `kerasdet.ops.batched_nms_padded`; prints one JSON.

    python benchmarks/nms_speed.py [--repeats 5]

The RPN's proposal NMS at Faster R-CNN R50-FPN training scale: 2 images of 800 x 1216, about 8,700
boxes each (2,000 per FPN level, level-aware), IoU 0.7, 2,000 kept. Two box layouts:
  "spread":    jittered anchors all over the image (an untrained RPN),
  "clustered": boxes around 30 objects (a trained RPN: most boxes are suppressed).
Forms: "tiled", tf.image.non_max_suppression_padded (the batched tiled algorithm, the one XLA
compiles) and "greedy", TensorFlow's single-image NonMaxSuppressionV4 kernel mapped over the batch
(what batched_nms_padded runs outside XLA). Both are checked to keep the same boxes.
"""
import argparse
import json
import os
import statistics
import time
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerasdet.ops import batched_nms_padded  # noqa: E402
from kerasdet.ops import boxes as kd_boxes  # noqa: E402

HEIGHT, WIDTH, PER_LEVEL, KEEP, IOU = 800, 1216, 2000, 2000, 0.7
LEVELS = ((4, 32), (8, 64), (16, 128), (32, 256), (64, 512))  # (stride, anchor size) of P2..P6


def _clip(boxes):
    return np.clip(boxes, 0, [WIDTH, HEIGHT, WIDTH, HEIGHT]).astype(np.float32)


def spread_image(rng):
    boxes, levels = [], []
    for level, (stride, size) in enumerate(LEVELS):
        ys, xs = np.meshgrid(np.arange(0, HEIGHT, stride) + stride / 2, np.arange(0, WIDTH, stride) + stride / 2,
                             indexing="ij")
        centers = np.repeat(np.stack([xs.ravel(), ys.ravel()], 1), 3, 0)
        ratios = np.tile([0.5, 1.0, 2.0], len(centers) // 3)
        pick = rng.choice(len(centers), min(PER_LEVEL, len(centers)), replace=False)
        center = centers[pick] + rng.normal(0, size * 0.1, (len(pick), 2))
        width = size / np.sqrt(ratios[pick]) * np.exp(rng.normal(0, 0.1, len(pick)))
        height = size * np.sqrt(ratios[pick]) * np.exp(rng.normal(0, 0.1, len(pick)))
        boxes.append(_clip(np.stack([center[:, 0] - width / 2, center[:, 1] - height / 2,
                                     center[:, 0] + width / 2, center[:, 1] + height / 2], 1)))
        levels.append(np.full(len(pick), level))
    return np.concatenate(boxes), np.concatenate(levels)


def clustered_image(rng, count):
    objects = rng.uniform([0, 0, 32, 32], [WIDTH - 100, HEIGHT - 100, 400, 400], (30, 4))
    owner = objects[rng.integers(0, 30, count)]
    center = owner[:, :2] + owner[:, 2:] / 2 + rng.normal(0, 1, (count, 2)) * owner[:, 2:] * 0.08
    size = owner[:, 2:] * np.exp(rng.normal(0, 0.1, (count, 2)))
    return _clip(np.concatenate([center - size / 2, center + size / 2], 1))


def problem(layout, rng):
    images = [spread_image(rng) for _ in range(2)]
    count = min(len(boxes) for boxes, _ in images)
    levels = np.stack([lv[:count] for _, lv in images]).astype(np.int32)
    if layout == "spread":
        boxes = np.stack([b[:count] for b, _ in images])
    else:
        boxes = np.stack([clustered_image(rng, count) for _ in range(2)])
    scores = rng.uniform(size=boxes.shape[:2]).astype(np.float32)
    return tf.constant(boxes), tf.constant(scores), tf.constant(levels)


def median_seconds(function, args, repeats):
    function(*args)  # trace (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = function(*args)
        out["num_detections"].numpy()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    def nms(boxes, scores, levels):
        return batched_nms_padded(boxes, scores, levels, IOU, KEEP)

    # batched_nms_padded picks its form while tracing (the tiled one inside an XLA cluster). The tiled
    # form is traced here as XLA would see it but run by TensorFlow's own kernel, as before the
    # greedy form was added: the figure compares the algorithms, not XLA.
    tiled = tf.function(nms)
    with mock.patch.object(kd_boxes, "in_xla_context", lambda: True):
        tiled.get_concrete_function(*problem("spread", np.random.default_rng(1)))
    forms = {"greedy": tf.function(nms), "tiled": tiled}
    rng = np.random.default_rng(0)
    report = {"images": 2, "iou": IOU, "keep": KEEP, "load_average": list(os.getloadavg())}
    for layout in ("spread", "clustered"):
        args_ = problem(layout, rng)
        results = {name: form(*args_) for name, form in forms.items()}
        counts = results["greedy"]["num_detections"].numpy()
        same = all(np.array_equal(results["greedy"]["indices"][i, :c], results["tiled"]["indices"][i, :c])
                   and c == int(results["tiled"]["num_detections"][i]) for i, c in enumerate(counts))
        seconds = {name: median_seconds(form, args_, args.repeats) for name, form in forms.items()}
        report[layout] = {"boxes_per_image": int(args_[0].shape[1]), "kept": counts.tolist(),
                          "same_indices": bool(same), "seconds": {k: round(v, 4) for k, v in seconds.items()},
                          "tiled_over_greedy": round(seconds["tiled"] / seconds["greedy"], 2)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
