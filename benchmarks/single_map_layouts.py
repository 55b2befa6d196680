#!/usr/bin/env python
"""The single-map paper layouts trained longer than a test can: held-out VOC mAP@0.5 by epoch, as JSON.

Layouts (settings from tests/test_single_map_layouts.py, the same synthetic data and training
procedure as the learning tests: 256 training / 64 held-out 128 x 128 images, batch 4, SGD with
momentum 0.9, weight decay 1e-4, clipnorm 10):
  c4_res5    Faster R-CNN C4: RPN and RoI pooling on the stride-16 C4 map, the ResNet conv5 stage
             (torchvision layer4, 3 bottlenecks, 2048 channels) applied to every RoI, then average
             pooling. At full width this head costs far more per RoI than the tiny trunk, so its
             learning test stops after 2 epochs; this script shows where it goes with more.
  rfcn_mean  R-FCN on one dilated stride-16 map with mean (average) voting.

    python benchmarks/single_map_layouts.py [--layouts c4_res5] [--epochs 12] [--eval-at 2,6,12]
                                            [--seeds 0]

A seed s sets Keras' global seed to 1234 + s (the tests' conftest uses 1234) and the model's
sampling seed to s. One JSON line per (layout, seed) goes to stderr as it finishes; the whole
report goes to stdout at the end.
"""
import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerasdet.data.pipeline import build_dataset  # noqa: E402
from kerasdet.data.synthetic import make_dataset  # noqa: E402
from kerasdet.evaluation import evaluate_model  # noqa: E402
from kerasdet.models.faster_rcnn import FasterRCNN  # noqa: E402
from kerasdet.models.rfcn import RFCN  # noqa: E402
from test_single_map_layouts import (C4_RES5_LEARNING_RATE, RFCN_LEARNING_RATE,  # noqa: E402
                                     c4_res5_settings, single_map_rfcn_settings)

LAYOUTS = {"c4_res5": (FasterRCNN, c4_res5_settings, C4_RES5_LEARNING_RATE),
           "rfcn_mean": (RFCN, single_map_rfcn_settings, RFCN_LEARNING_RATE)}


class EvaluateAt(keras.callbacks.Callback):
    """Held-out VOC mAP@0.5 after the listed epochs (1-based); evaluation time is not training."""

    def __init__(self, dataset, epochs):
        super().__init__()
        self.dataset, self.epochs = dataset, set(epochs)
        self.results, self.eval_seconds = {}, 0.0

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 in self.epochs:
            start = time.perf_counter()
            voc = evaluate_model(self.model, self.dataset, metrics=("voc",))["voc"]["mAP"]
            self.eval_seconds += time.perf_counter() - start
            self.results[epoch + 1] = round(float(voc), 3)


def run(layout, seed, epochs, eval_at, data):
    cls, settings_fn, learning_rate = LAYOUTS[layout]
    keras.utils.set_random_seed(1234 + seed)
    settings = settings_fn(seed=seed)
    model = cls(3, **settings)
    train, val = data
    train_ds = build_dataset(train, 4, training=True, image_size=(128, 128), seed=0)
    val_ds = build_dataset(val, 4, image_size=(128, 128))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9, weight_decay=1e-4,
                                                 clipnorm=10.0))
    evaluate = EvaluateAt(val_ds, [e for e in eval_at if e <= epochs] + [epochs])
    start = time.perf_counter()
    history = model.fit(train_ds, epochs=epochs, verbose=0, callbacks=[evaluate])
    seconds = time.perf_counter() - start - evaluate.eval_seconds
    return {"layout": layout, "seed": seed, "epochs": epochs, "learning_rate": learning_rate,
            "voc_map50_by_epoch": evaluate.results, "train_seconds": round(seconds, 1),
            "loss_by_epoch": [round(float(x), 3) for x in history.history["loss"]],
            "parameters": model.count_params(), "settings": settings}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="c4_res5")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--eval-at", default="2,6")
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args()
    eval_at = [int(e) for e in args.eval_at.split(",") if e]
    report = {"tensorflow": tf.__version__, "cpus": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory() as root:
        # The conftest's `synthetic_data`: the same seeds and sizes.
        data = (make_dataset(os.path.join(root, "train"), 256, seed=1, image_size=(128, 128)),
                make_dataset(os.path.join(root, "val"), 64, seed=2, image_size=(128, 128),
                             split="val"))
        for layout in args.layouts.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                result = run(layout, seed, args.epochs, eval_at, data)
                print(json.dumps(result), file=sys.stderr, flush=True)
                report["runs"].append(result)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
