#!/usr/bin/env python
"""RefineDet ablation on the synthetic shapes (issue #13), next to the direction of the paper's
table 3 (RefineDet320, VOC 2007 test: 80.0 all on, 79.5 without negative anchor filtering, 77.3
without the filter and without two-step cascaded regression).

Variants (one model each, the learning test's tiny configuration, tests/test_refinedet_learning.py;
same data, seed and procedure: 256 training / 64 held-out 128 x 128 images, batch 4, Adam 1e-3,
clipnorm 10):
  full         negative anchor filtering (0.99) and two-step regression (ODM on refined anchors);
  no_filter    negative_filter_theta=None;
  single_step  no filter, and the ODM regresses from the tiled anchors (two_step=False): the
               paper's "directly using the regularly tiled default anchors"; the ARM still trains.

    python benchmarks/refinedet_ablation.py [--epochs 8] [--seeds 0]

One JSON line per (variant, seed) goes to stderr as it finishes; the report (JSON) to stdout.
Measured when written (`--seeds 0` then `--seeds 1,2`, 6 epochs, 2 shared CPU cores), held-out VOC
mAP@0.5 per seed 0 / 1 / 2: full 0.901 / 0.997 / 0.960 (mean 0.953), no_filter 0.973 / 0.995 /
0.983 (0.984), single_step 0.916 / 0.918 / 0.916 (0.917). Two-step regression helps, as in the
paper (0.984 vs 0.917); the filter did not help on this set in this short run (the paper: +0.5 on
VOC), and its effect is inside the full model's seed spread (0.90 to 1.00).
The synthetic set is far from VOC (3 shapes, small images, a tiny backbone), so only the
direction of the differences can be compared, and at this size a seed's noise is of the order of
the paper's 0.5-point gap.
"""
import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import keras  # noqa: E402

from kerasdet.data.synthetic import make_dataset  # noqa: E402
from kerasdet.models.refinedet import RefineDet  # noqa: E402
from test_refinedet_learning import (EPOCHS, LEARNING_RATE, fit_and_evaluate_adam,  # noqa: E402
                                     tiny_refinedet_settings)

VARIANTS = {"full": {},
            "no_filter": {"negative_filter_theta": None},
            "single_step": {"negative_filter_theta": None, "two_step": False}}
PAPER_TABLE3 = {"full": 80.0, "no_filter": 79.5, "single_step": 77.3}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seeds", default="0", help="comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as root:
        data = (make_dataset(os.path.join(root, "train"), 256, seed=1, image_size=(128, 128)),
                make_dataset(os.path.join(root, "val"), 64, seed=2, image_size=(128, 128), split="val"))
        results = {}
        for name in args.variants.split(","):
            for seed in seeds:
                keras.utils.set_random_seed(1234 + seed)
                model = RefineDet(3, **tiny_refinedet_settings(seed=seed, **VARIANTS[name]))
                history, voc_map, seconds, _ = fit_and_evaluate_adam(model, data, args.epochs)
                row = {"variant": name, "seed": seed, "voc_map50": round(float(voc_map), 4),
                       "final_loss": round(float(history["loss"][-1]), 4), "train_seconds": round(seconds)}
                print(json.dumps(row), file=sys.stderr, flush=True)
                results.setdefault(name, []).append(row["voc_map50"])
    report = {"epochs": args.epochs, "seeds": seeds, "learning_rate": LEARNING_RATE,
              "variants": {name: {"settings": VARIANTS[name], "voc_map50": maps,
                                  "mean": round(sum(maps) / len(maps), 4),
                                  "paper_table3_voc07_map": PAPER_TABLE3[name]}
                           for name, maps in results.items()}}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
