#!/usr/bin/env python
"""Two detectors on a small set of real photographs, printed as JSON.

Data: kerasdet.data.sample_photos (made offline from scikit-image's sample images): coins ("coin")
and the Hubble deep field ("galaxy"), cut into 128x128 tiles, split by position into train and
held-out tiles (no shared pixel). Needs scikit-image.

Detectors, each trained with model.fit for the same number of steps (and optionally stopped by a
wall-clock budget), batch 4, flips, the zoo entry's recipe (learning rate, warm-up, step decay at
the recipe's fraction of the run) adapted to the run's length by kerasdet.engine.adapt_recipe:

- ``tiny``: faster_rcnn_tiny_fpn_synthetic's architecture (tiny backbone, FPN), from scratch;
- ``mobilenet``: faster_rcnn_mobilenet_v2_fpn_synthetic (MobileNetV2 FPN) from the ImageNet
  backbone mobilenet_v2_imagenet (skipped, with a message, when it is not installed).

Then each is evaluated on the held-out tiles: VOC mAP@0.5 (difficult objects -- partly visible or
faint -- ignored, as VOC does) with per-class AP, and COCO AP / AP50 (pycocotools; COCO has no
"difficult", so there they count as ground truth). Training uses every box, difficult ones too.

    python benchmarks/real_small.py [--steps 600] [--seconds S] [--seed 0] [--runs tiny,mobilenet]
        [--sources coins,hubble] [--data FOLDER]

``seconds`` counts wall-clock time from the start of fit (graph tracing included); on a machine
shared with other jobs compare ``steps`` as well as the metrics.

Measured with the defaults (600 steps; 166 train tiles: 36 coins + 198 galaxies, 562 difficult;
78 held-out tiles: 27 coins + 89 galaxies, 253 difficult), two CPU cores shared with other jobs:

    seed  run        seconds  VOC mAP@0.5 (coin / galaxy)  COCO AP
    0     tiny       124      0.898 (0.879 / 0.918)        0.515
    0     mobilenet  234      0.980 (1.000 / 0.960)        0.641
    1     tiny        98      0.907 (0.874 / 0.941)        0.537
    1     mobilenet  174      0.964 (0.993 / 0.934)        0.646
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402

from pretrained_backbone import TimeBudget  # noqa: E402  (records per-step losses, stops at a budget)

RUNS = {"tiny": ("faster_rcnn_tiny_fpn_synthetic", False),
        "mobilenet": ("faster_rcnn_mobilenet_v2_fpn_synthetic", True)}
LOSS_WINDOW = 20


def describe(dataset):
    difficult = sum(int(r.difficult.sum()) for r in dataset)
    return {"tiles": len(dataset), "objects": sum(r.num_objects for r in dataset) - difficult,
            "difficult": difficult}


def build_model(entry_name, pretrained, num_classes, class_names):
    from kerasdet import zoo

    if pretrained:
        model = zoo.load(entry_name, weights=None, pretrained_backbone=True, num_classes=num_classes)
    else:
        model = zoo.build(entry_name, num_classes=num_classes)
        model.kerasdet_backbone_weights = None
    model.class_names = list(class_names)
    return model


def run(label, data, steps, seconds, seed):
    from kerasdet import zoo
    from kerasdet.data.pipeline import build_dataset
    from kerasdet.evaluation import evaluate_model
    from kerasdet import engine

    entry_name, pretrained = RUNS[label]
    entry = zoo.registry.get_entry(entry_name)
    train, test = data
    keras.utils.set_random_seed(seed)
    model = build_model(entry_name, pretrained, train.num_classes, train.class_names)
    # The whole run is one fit "epoch" of ``steps`` steps over the repeated training set, so the
    # recipe's decay epochs become fractions of the run and its warm-up is capped at 10% of it.
    recipe = engine.adapt_recipe(entry.recipe, steps, epochs=1)
    train_ds = build_dataset(train, recipe["batch_size"], training=True, input_settings=entry.input,
                             seed=seed, repeat=True)
    test_ds = build_dataset(test, 8, input_settings=entry.input)
    model.compile(optimizer=engine.make_optimizer(recipe, steps))
    budget = TimeBudget(seconds if seconds else math.inf)
    model.fit(train_ds, epochs=1, steps_per_epoch=steps, callbacks=[budget], verbose=0)
    start = time.perf_counter()
    results = evaluate_model(model, test_ds, metrics=("voc", "coco"), class_names=train.class_names)
    bbox = results["coco"]["bbox"]
    losses = budget.step_losses
    window = min(LOSS_WINDOW, max(1, len(losses) // 2))
    result = {
        "run": label, "entry": entry_name, "backbone": model.kerasdet_backbone_weights or "random",
        "steps": budget.steps, "stopped_by_budget": budget.stopped_by_budget,
        "seconds": round(budget.elapsed, 1),
        "seconds_per_step_after_first": (round((budget.elapsed - budget.first_step_seconds)
                                               / (budget.steps - 1), 3) if budget.steps > 1 else None),
        "eval_seconds": round(time.perf_counter() - start, 1),
        "voc_map50": round(float(results["voc"]["mAP"]), 4),
        # keyed by class name, since evaluate_model was given the names
        "voc_ap50_per_class": {str(c): round(float(ap), 4) for c, ap in results["voc"]["AP"].items()},
        "coco_ap": round(float(bbox["AP"]), 4), "coco_ap50": round(float(bbox["AP50"]), 4),
        "loss_first": round(sum(losses[:window]) / window, 4) if losses else None,
        "loss_last": round(sum(losses[-window:]) / window, 4) if losses else None,
        "recipe": {k: recipe[k] for k in ("learning_rate", "batch_size", "warmup_steps")},
        "decay_steps": [int(e * steps) for e in recipe["decay_epochs"]],
    }
    print(f"{label}: {result['steps']} steps in {result['seconds']} s, VOC mAP@0.5 "
          f"{result['voc_map50']:.3f} {result['voc_ap50_per_class']}, COCO AP {result['coco_ap']:.3f}",
          file=sys.stderr)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps per detector")
    parser.add_argument("--seconds", type=float, default=None, help="also stop at this wall-clock budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="tiny,mobilenet", help=f"comma-separated subset of {sorted(RUNS)}")
    parser.add_argument("--sources", default="coins,hubble", help="kerasdet.data.sample_photos sources")
    parser.add_argument("--data", default=None, help="folder for the VOC tree (default: a temporary one)")
    args = parser.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown or not runs:
        parser.error(f"unknown or no runs {unknown}; choose from {sorted(RUNS)}")
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    import tensorflow as tf

    from kerasdet.data.sample_photos import make_sample_photos
    from kerasdet.zoo import pretrained

    available, reason = pretrained.availability("mobilenet_v2_imagenet")
    if "mobilenet" in runs and not available:
        print(f"skipping the mobilenet run: {reason}", file=sys.stderr)
        runs.remove("mobilenet")
    sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        data = make_sample_photos(args.data or scratch, sources)
        data_seconds = time.perf_counter() - start
        results = [run(label, data, args.steps, args.seconds, args.seed) for label in runs]
    report = {
        "benchmark": "real_small", "tensorflow": tf.__version__, "keras": keras.__version__,
        "cpu_cores": os.cpu_count(), "seed": args.seed, "steps": args.steps,
        "budget_seconds": args.seconds,
        "data": {"generator": "kerasdet.data.sample_photos", "sources": list(sources),
                 "class_names": data[0].class_names, "tile_size": 128,
                 "train": describe(data[0]), "test": describe(data[1]),
                 "seconds_to_make": round(data_seconds, 1)},
        "runs": results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
