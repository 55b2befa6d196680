#!/usr/bin/env python
"""CC-Net ablation on the synthetic set at equal training time, and the speed-up of test-time early
rejection (issue #14). Prints one JSON report on stdout (a line per variant on stderr as it ends).

Variants (tiny FPN settings of tests/learning.py with the reference's 64 RoIs per image, as
tests/test_ccnet.py's learning test; the learning tests' data and optimizer: 256
training / 64 held-out 128 x 128 images, batch 4, SGD lr 0.02, momentum 0.9, weight decay 1e-4,
clipnorm 10):
  one_stage         one stage (context 1.0), plain softmax loss
  stages            4 stages (context 1.0 / 1.5 / 1.8 / 2.7), no chaining, no rejection
  score_chaining    + score chaining (beta)
  feature_chaining  + feature chaining (alpha)
  rejection         + the cascade loss with rejection (the full CC-Net)
Every variant trains for the same budget of process CPU seconds (`--cpu-seconds`; CPU time, not
wall time, since the machine is shared) and is evaluated on the held-out images (VOC mAP@0.5 and
COCO AP). The full model is then evaluated with and without test-time early rejection: mAP of
each, and the median of `--repeats` timed passes of predict over the held-out set.

    python benchmarks/ccnet_ablation.py [--cpu-seconds 300] [--variants one_stage,rejection]
    python benchmarks/ccnet_ablation.py --variants "" --zoo-entry ccnet_tiny_fpn_synthetic

--zoo-entry measures early rejection on a zoo entry's shipped weights instead of the last
variant (a model trained for a short budget may reject nothing yet).
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
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerasdet.data.pipeline import build_dataset  # noqa: E402
from kerasdet.data.synthetic import make_dataset  # noqa: E402
from kerasdet.evaluation import evaluate_model  # noqa: E402
from kerasdet.models.ccnet import CCNet  # noqa: E402
from learning import tiny_fpn_settings  # noqa: E402

VARIANTS = {
    "one_stage": dict(stage_context=(1.0,), stage_thresholds=(0.9,), stage_rejects=(False,),
                      stage_loss_weights=(1.0,), rejection=False),
    "stages": dict(feature_chaining=False, score_chaining=False, rejection=False),
    "score_chaining": dict(feature_chaining=False, score_chaining=True, rejection=False),
    "feature_chaining": dict(feature_chaining=True, score_chaining=True, rejection=False),
    "rejection": dict(feature_chaining=True, score_chaining=True, rejection=True),
}


class CPUBudget(keras.callbacks.Callback):
    """Stops training once the process has used `seconds` of CPU time since training began."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def on_train_begin(self, logs=None):
        self.start, self.steps = None, 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.start is None:  # the clock starts after the first step (tracing excluded)
            self.start = time.process_time()
        elif time.process_time() - self.start >= self.seconds:
            self.model.stop_training = True


def scores(results):
    return {"voc_map50": round(float(results["voc"]["mAP"]), 4),
            "coco_ap": round(float(results["coco"]["bbox"]["AP"]), 4)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-seconds", type=float, default=300.0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zoo-entry", default=None, help="early rejection on this entry's weights")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="ccnet_ablation_")
    train = make_dataset(os.path.join(root, "train"), 256, seed=1, image_size=(128, 128))
    val = make_dataset(os.path.join(root, "val"), 64, seed=2, image_size=(128, 128), split="val")
    train_ds = build_dataset(train, 4, training=True, image_size=(128, 128), seed=0)
    val_ds = build_dataset(val, 4, image_size=(128, 128))
    report = {"cpu_seconds_per_variant": args.cpu_seconds, "variants": {}}
    model = None
    names = [name for name in args.variants.split(",") if name]
    for name in names:
        keras.utils.set_random_seed(1234 + args.seed)
        settings = dict(tiny_fpn_settings(), roi_batch_size=64, seed=args.seed,
                        **VARIANTS[name])
        model = CCNet(3, **settings)
        model.compile(optimizer=keras.optimizers.SGD(0.02, momentum=0.9, weight_decay=1e-4,
                                                     clipnorm=10.0))
        budget = CPUBudget(args.cpu_seconds)
        model.fit(train_ds, epochs=1000, verbose=0, callbacks=[budget])
        row = dict(scores(evaluate_model(model, val_ds, metrics=("voc", "coco"))),
                   steps=budget.steps, epochs=round(budget.steps / 64, 2))
        report["variants"][name] = row
        print(json.dumps({name: row}), file=sys.stderr, flush=True)
    if args.zoo_entry:
        from kerasdet import zoo

        model = zoo.load(args.zoo_entry)
    if model is not None and model.num_stages > 1:
        # The same weights with early rejection off: the two predict functions are timed in
        # alternation, so the load of a shared machine falls on both alike.
        masked = CCNet.from_config(dict(model.get_config(), test_rejection=False))
        masked.build()
        masked.set_weights(model.get_weights())
        models = {"on": model, "off": masked}
        rows = {key: scores(evaluate_model(m, val_ds, metrics=("voc", "coco")))
                for key, m in models.items()}
        times = {key: [] for key in models}
        for _ in range(args.repeats):
            for key, m in models.items():
                start = time.perf_counter()
                for batch in val_ds:
                    m.predict_on_batch(batch)
                times[key].append(time.perf_counter() - start)
        for key in models:
            rows[key]["predict_seconds_median"] = round(float(np.median(times[key])), 3)
        # how many proposals survive to the last stage with early rejection
        alive, total = 0, 0
        for batch in val_ds.take(4):
            images = model.input_images(batch)
            shapes = tf.cast(batch["image_info"][:, 4:6], tf.float32)
            roi_features, proposals, valid = model.first_stage_inference(images, shapes)
            _, _, survivors = model.chain.infer(roi_features, proposals, valid)
            alive += int(tf.reduce_sum(tf.cast(survivors, tf.int32)))
            total += int(tf.reduce_sum(tf.cast(valid, tf.int32)))
        rows["fraction_reaching_last_stage"] = round(alive / max(total, 1), 4)
        rows["speedup"] = round(rows["off"]["predict_seconds_median"] /
                                rows["on"]["predict_seconds_median"], 3)
        rows["model"] = args.zoo_entry or names[-1]
        report["early_rejection"] = rows
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
