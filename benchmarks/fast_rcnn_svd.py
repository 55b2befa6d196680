#!/usr/bin/env python
"""Fast R-CNN's truncated-SVD trade (section 3.1), measured: detection mAP and fc-head time of a
Fast R-CNN trained on the synthetic shapes, before and after compressing fc6/fc7 to given ranks.

Trains the tiny Fast R-CNN of the tests (jittered-ground-truth proposals) for --epochs, then for each
rank pair prints VOC mAP@0.5 on held-out images, the head's parameter count and the median time of
the fc head on --rois RoIs, all in one run, as JSON.

    python benchmarks/fast_rcnn_svd.py [--epochs 4] [--ranks 64,32 32,16 16,8] [--fc-dim 1024]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerasdet.data.synthetic import make_dataset  # noqa: E402
from kerasdet.evaluation import evaluate_model  # noqa: E402
from kerasdet.models.base import batch_image_shapes, ground_truth  # noqa: E402
from kerasdet.models.fast_rcnn import FastRCNN, jittered_proposals  # noqa: E402
from learning import fit_and_evaluate  # noqa: E402


def add_proposals(batch):
    gt_boxes, gt_labels = ground_truth(batch)
    shapes = batch_image_shapes(batch, batch["images"])
    return dict(batch, proposals=jittered_proposals(gt_boxes, gt_labels, shapes, 128, seed=5))


def head_ms(model, rois, repeats=20):
    channels = model.backbone.output[model.feature].shape[-1]
    pooled = tf.random.uniform([1, rois, model.roi_output_size, model.roi_output_size, channels])
    run = tf.function(lambda x: model.box_predictor(model.box_head(x)))
    run(pooled)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), run(pooled))
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--fc-dim", type=int, default=1024)
    parser.add_argument("--rois", type=int, default=300)
    parser.add_argument("--ranks", nargs="+", default=["256,128", "64,32", "16,8"])
    args = parser.parse_args()
    keras.utils.set_random_seed(1234)
    root = tempfile.mkdtemp(prefix="kerasdet_svd_")
    data = (make_dataset(os.path.join(root, "train"), 256, seed=1, image_size=(128, 128)),
            make_dataset(os.path.join(root, "val"), 64, seed=2, image_size=(128, 128), split="val"))
    model = FastRCNN(3, backbone="tiny", feature="C4", fc_dim=args.fc_dim, seed=0)
    _, results, seconds = fit_and_evaluate(model, data, args.epochs, map_batches=add_proposals)
    from kerasdet.data.pipeline import build_dataset

    val_ds = build_dataset(data[1], 4, image_size=(128, 128)).map(add_proposals)
    rows = [{"ranks": None, "voc_map50": round(results["voc"]["mAP"], 4),
             "head_params": model.box_head.count_params(),
             "head_ms": head_ms(model, args.rois)}]
    for spec in args.ranks:
        ranks = [int(r) for r in spec.split(",")]
        small, report = model.compress(ranks)
        metrics = evaluate_model(small, val_ds, metrics=("voc",))
        rows.append({"ranks": ranks, "voc_map50": round(metrics["voc"]["mAP"], 4),
                     "head_params": small.box_head.count_params(),
                     "head_ms": head_ms(small, args.rois),
                     "relative_errors": [round(r["relative_error"], 4) for r in report]})
    print(json.dumps({"training_seconds": round(seconds, 1), "fc_dim": args.fc_dim,
                      "rois": args.rois, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
