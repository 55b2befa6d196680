#!/usr/bin/env python
"""What the ImageNet MobileNetV2 backbone changes on the synthetic shapes, printed as JSON.

Trains `faster_rcnn_mobilenet_v2_fpn_synthetic` twice with the same recipe (the zoo entry's), the
same seed and the same wall-clock training budget: once from the ImageNet backbone
(mobilenet_v2_imagenet), once from a random one. A random backbone under the entry's
backbone_config (frozen BatchNorm, first two stages frozen: settings for pretrained weights) is a
handicapped start, so a fourth row, `random_trainable`, trains the same random start with
frozen_bn=False, freeze_at=0. `faster_rcnn_tiny_fpn_synthetic` trained from scratch under the same
budget is the reference row. Each run stops at the first batch that ends past the budget (the
recipe's warm-up and step decay apply by step; --recipe-epochs-only also stops at the recipe's
epochs) and is then evaluated on the 64 held-out images (VOC mAP@0.5, COCO AP).

The data are those of the tests and the demo: kerasdet.data.synthetic.make_dataset, 256 training
images (seed 1) and 64 held-out ones (seed 2), 128x128.

    python benchmarks/pretrained_backbone.py [--seconds 150] [--seed 0]
        [--runs pretrained,random,random_trainable,tiny] [--recipe-epochs-only]

A budget counts wall-clock time from the start of fit, so it includes the first step's graph
tracing (reported as first_step_seconds). On a machine shared with other jobs the number of steps a
budget buys varies from run to run; compare `steps` as well as the metrics.
"""
import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

MOBILENET_ENTRY = "faster_rcnn_mobilenet_v2_fpn_synthetic"
TINY_ENTRY = "faster_rcnn_tiny_fpn_synthetic"
# The losses of the first / last this many steps are averaged for loss_first / loss_last: one
# batch of 4 images is too noisy to compare runs by.
LOSS_WINDOW = 20


class TimeBudget(keras.callbacks.Callback):
    """Stops training at the first batch that ends after ``seconds`` of wall-clock time (counted from
    the start of fit) and records each step's loss.

    The detectors log the running mean of the loss over the epoch (their trackers are reset at each
    epoch's start), so a step's own loss is recovered as k * mean_k - (k - 1) * mean_(k-1).
    """

    def __init__(self, seconds):
        super().__init__()
        self.seconds = float(seconds)
        self.steps = 0
        self.step_losses = []
        self.first_step_seconds = None
        self.elapsed = 0.0
        self.stopped_by_budget = False
        self._start = None
        self._previous_mean = 0.0

    def on_train_begin(self, logs=None):
        self._start = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._previous_mean = 0.0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        self.elapsed = time.perf_counter() - self._start
        if self.first_step_seconds is None:
            self.first_step_seconds = self.elapsed
        mean = float((logs or {}).get("loss", float("nan")))
        self.step_losses.append((batch + 1) * mean - batch * self._previous_mean)
        self._previous_mean = mean
        if self.elapsed >= self.seconds:
            self.stopped_by_budget = True
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.elapsed = time.perf_counter() - self._start


def make_data(root):
    from kerasdet.data.synthetic import make_dataset

    train = make_dataset(os.path.join(root, "train"), 256, seed=1, image_size=(128, 128))
    val = make_dataset(os.path.join(root, "val"), 64, seed=2, image_size=(128, 128), split="val")
    return train, val


def run(label, entry_name, pretrained, overrides, data, seconds, seed, recipe_epochs_only=False):
    from kerasdet import zoo
    from kerasdet import engine as training

    entry = zoo.registry.get_entry(entry_name)
    recipe = training.TrainingRecipe(entry.recipe)
    # The same seed before building: the detection layers (RPN, FPN, box head) start from the same
    # numbers whichever backbone weights are loaded afterwards.
    keras.utils.set_random_seed(seed)
    if entry_name == TINY_ENTRY:
        # zoo.load would bring the shipped trained weights; the reference row trains from scratch.
        model = zoo.build(entry_name)
        model.kerasdet_backbone_weights = None
    else:
        model = zoo.load(entry_name, weights=None, pretrained_backbone=pretrained, **overrides)
    if pretrained and model.kerasdet_backbone_weights is None:
        raise RuntimeError(f"{entry_name}: the pretrained backbone was not loaded")
    train, val = data
    train_ds = training.make_pipeline(train, entry.input, recipe["batch_size"], True, seed=seed)
    val_ds = training.make_pipeline(val, entry.input, 8, False)
    steps_per_epoch = int(train_ds.cardinality().numpy())
    model.compile(optimizer=training.make_optimizer(recipe, steps_per_epoch))
    budget = TimeBudget(seconds)
    # By default the budget alone ends training (the recipe's warm-up and step decay still apply,
    # in steps): every run gets the same wall-clock time, whatever its speed.
    epochs = int(recipe["epochs"]) if recipe_epochs_only else 1000
    model.fit(train_ds, epochs=epochs, callbacks=[budget], verbose=0)
    evaluation_start = time.perf_counter()
    summary = training.evaluate_detector(model, val_ds, list(val.class_names), quiet=True)
    losses = budget.step_losses
    window = min(LOSS_WINDOW, max(1, len(losses) // 2))
    result = {
        "run": label, "entry": entry_name,
        "backbone": model.kerasdet_backbone_weights or "random",
        "backbone_config": overrides.get("backbone_config", entry.arguments.get("backbone_config")),
        "trainable_params": int(sum(int(v.numpy().size) for v in model.trainable_variables)),
        "steps": budget.steps, "epochs_done": round(budget.steps / steps_per_epoch, 2),
        "epochs_of_recipe": int(recipe["epochs"]),
        "steps_of_recipe": int(recipe["epochs"]) * steps_per_epoch,
        "stopped_by_budget": budget.stopped_by_budget,
        "seconds": round(budget.elapsed, 1),
        "first_step_seconds": round(budget.first_step_seconds or 0.0, 1),
        "seconds_per_step_after_first": round((budget.elapsed - budget.first_step_seconds)
                                              / (budget.steps - 1), 3) if budget.steps > 1 else None,
        "eval_seconds": round(time.perf_counter() - evaluation_start, 1),
        "voc_map50": round(summary["voc_map50"], 4), "coco_ap": round(summary["coco_ap"], 4),
        "coco_ap50": round(summary["coco_ap50"], 4),
        "loss_first": round(sum(losses[:window]) / window, 4) if losses else None,
        "loss_last": round(sum(losses[-window:]) / window, 4) if losses else None,
        "loss_window_steps": window,
        "recipe": {k: recipe[k] for k in ("learning_rate", "batch_size", "epochs", "decay_epochs",
                                          "warmup_steps")},
    }
    print(f"{label}: {result['steps']} steps in {result['seconds']} s, VOC mAP@0.5 "
          f"{result['voc_map50']:.3f}, COCO AP {result['coco_ap']:.3f}, loss "
          f"{result['loss_first']} -> {result['loss_last']}", file=sys.stderr)
    return result


def _compare(a, b, ratios=True):
    """Differences (and ratios) of two runs' metrics, and their step ratio."""
    out = {}
    for metric in ("voc_map50", "coco_ap"):
        out[f"{metric}_difference"] = round(a[metric] - b[metric], 4)
        if ratios:
            out[f"{metric}_ratio"] = _ratio(a[metric], b[metric])
    out["steps_ratio"] = _ratio(a["steps"], b["steps"])
    return out


def _ratio(a, b):
    return round(a / b, 3) if b else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=150.0, help="wall-clock training budget per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="pretrained,random,random_trainable,tiny",
                        help="comma-separated subset of pretrained,random,random_trainable,tiny")
    parser.add_argument("--recipe-epochs-only", action="store_true",
                        help="also stop when the recipe's epochs are done (default: train for the whole budget)")
    parser.add_argument("--data", default=None, help="folder for the synthetic data (default: a temporary one)")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from kerasdet.zoo import pretrained

    available, reason = pretrained.availability("mobilenet_v2_imagenet")
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    plan = {"pretrained": (MOBILENET_ENTRY, True, {}), "random": (MOBILENET_ENTRY, False, {}),
            # The entry's backbone_config (frozen BatchNorm, first two stages frozen) is the one for
            # ImageNet weights; a random backbone under it keeps random frozen layers and identity
            # BatchNorm statistics. This row is the same random start with everything trainable,
            # the fair from-scratch setting.
            "random_trainable": (MOBILENET_ENTRY, False, {"backbone_config": {"frozen_bn": False,
                                                                              "freeze_at": 0}}),
            "tiny": (TINY_ENTRY, False, {})}
    unknown = [r for r in runs if r not in plan]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {sorted(plan)}")
    if "pretrained" in runs and not available:
        print(f"skipping the pretrained run: {reason}", file=sys.stderr)
        runs.remove("pretrained")

    with tempfile.TemporaryDirectory() as scratch:
        data = make_data(args.data or scratch)
        results = {label: run(label, *plan[label], data, args.seconds, args.seed, args.recipe_epochs_only)
                   for label in runs}

    report = {
        "benchmark": "pretrained_backbone", "tensorflow": tf.__version__, "keras": keras.__version__,
        "cpu_cores": os.cpu_count(), "budget_seconds": args.seconds, "seed": args.seed,
        "data": "synthetic shapes, 3 classes, 128x128: 256 train (seed 1), 64 held-out (seed 2)",
        "pretrained_available": available, "runs": list(results.values()),
    }
    for other in ("random", "random_trainable", "tiny"):
        if "pretrained" in results and other in results:
            report[f"pretrained_vs_{other}"] = _compare(results["pretrained"], results[other],
                                                        ratios=other != "tiny")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
