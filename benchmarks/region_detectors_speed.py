#!/usr/bin/env python
"""The speed story of R-CNN -> SPP-net -> Fast R-CNN on this CPU (issue 16), one JSON report.

The papers (GPU, large nets; Fast R-CNN's table 4, VGG-16): R-CNN 47 s, SPPnet 2.3 s, Fast R-CNN
0.32 s per test image. Here the three detectors are trained briefly (seeded) on the synthetic set
with the same cached selective-search proposals, evaluated (VOC mAP@0.5 on held-out images), and
timed at test time, one image per call (as the papers time them):
  rcnn       kerasdet.models.rcnn.RCNN, every window warped to 64 x 64 and run through the whole
             AlexNet-style tiny net (conv 16/32/48/48/32, fc 128 / 128); SVMs + box regression.
  sppnet     kerasdet.models.sppnet.SPPNet (zoo entry sppnet_tiny_synthetic): the tiny backbone's
             C3 computed once per image at shorter sides 96 / 128 / 192 / 256, each window pooled
             at one scale by a {4, 2, 1} pyramid, fc 128 / 128; SVMs + box regression.
  sppnet_1sc the same model with one scale (128): the paper's single-scale mode.
  fast_rcnn  kerasdet.models.fast_rcnn.FastRCNN on the same tiny backbone's C3 at the input size
             (one scale), 7 x 7 RoI max pooling, fc 128 / 128, softmax scores and learned deltas.
R-CNN cannot take the tiny backbone (its per-window net must end in fc layers at a fixed crop), so
"same backbone" holds for SPP-net and Fast R-CNN only; the report gives every model's parameters
and the multiply-accumulates per image (conv and fc separately) at each window load.

Window loads: the cached selective-search proposals (fast mode, at most 300; a 128 px synthetic
image gives fewer, the mean is reported), and 2000 per image as in the papers: each image's
proposals repeated and jittered (gaussian, 5 % of the box size; the originals kept) up to 2000,
which only measures time (no mAP at that load).

    python benchmarks/region_detectors_speed.py [--quick] [--epochs 8] [--train 96] [--val 32]
        [--large]

--large adds the papers' network sizes, untrained (time only), on one 375 x 500 image with 2000
random windows: R-CNN / AlexNet, SPP-net / ZF-5 at 1 and 5 scales, Fast R-CNN / ZF-5 at 600 px.

Times are medians of `--repeats` passes (wall clock; the machine's 2 cores are shared, so the
ratios are more telling than the absolute figures).
"""
import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerasdet.data.pipeline import build_dataset  # noqa: E402
from kerasdet.data.proposals import write_proposal_cache  # noqa: E402
from kerasdet.data.synthetic import make_dataset  # noqa: E402
from kerasdet.evaluation import evaluate_model  # noqa: E402
from kerasdet.models.fast_rcnn import FastRCNN  # noqa: E402
from kerasdet.models.rcnn import RCNN  # noqa: E402
from kerasdet.models.sppnet import SPPNet  # noqa: E402

SIZE = 128
SPP_TINY = dict(backbone="tiny", feature="C3", scales=(96, 128, 192, 256), target=64.0,
                levels=(4, 2, 1), fc_dims=(128, 128), roi_batch_size=32, train_conv=True, seed=0)


def make_model(name):
    if name == "rcnn":
        return RCNN(3, backbone="alexnet_tiny", roi_batch_size=32, crop_batch=128, seed=0)
    if name == "sppnet":
        return SPPNet(3, **SPP_TINY)
    if name == "sppnet_1sc":
        return SPPNet(3, **dict(SPP_TINY, scales=(128,)))
    if name == "fast_rcnn":
        return FastRCNN(3, backbone="tiny", feature="C3", fc_dim=128, roi_batch_size=32, seed=0)
    raise ValueError(f"unknown model {name!r}")


# -- cost accounting -------------------------------------------------------------------------------
def _conv_macs(backbone, height, width, upto=None):
    """Multiply-accumulates of the Conv2D layers of a functional backbone on one H x W image (up to
    and including layer `upto`), read from a probe run's output shapes."""
    convs = [layer for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D)]
    if upto is not None:
        names = [layer.name for layer in convs]
        convs = convs[:names.index(upto) + 1]
    probe = keras.Model(backbone.input, [layer.output for layer in convs])
    outs = probe(tf.zeros([1, height, width, 3]))
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    total = 0
    for layer, out in zip(convs, outs):
        kh, kw = layer.kernel_size
        cin = layer.kernel.shape[2] * layer.groups
        total += int(np.prod(out.shape[1:])) * kh * kw * cin // layer.groups
    return total


def _dense_macs(layers):
    return sum(int(np.prod(layer.kernel.shape)) for layer in layers)


def costs(name, model, windows):
    """{conv, fc, total} multiply-accumulates per image with `windows` windows."""
    if name == "rcnn":
        bb = model.backbone
        dense = [l for l in bb.layers if isinstance(l, keras.layers.Dense)]
        conv = windows * _conv_macs(bb, model.crop_size, model.crop_size)
        fc = windows * _dense_macs(dense)
    elif name.startswith("sppnet"):
        # the whole tiny backbone runs at every scale (C4 / C5 included, unused by the pyramid)
        conv = sum(_conv_macs(model.backbone, s, s) for s in model.scales)
        fc = windows * _dense_macs([d for d, _ in model.hidden] + [model.classifier])
    else:
        conv = _conv_macs(model.backbone, SIZE, SIZE)
        dense = [l for l in model._flatten_layers() if isinstance(l, keras.layers.Dense)]
        fc = windows * _dense_macs(dense)
    return {"conv": int(conv), "fc": int(fc), "total": int(conv + fc)}


# -- timing ----------------------------------------------------------------------------------------
def jitter_to(proposals, image_hw, count, rng):
    """[count, 4]: the valid proposals, then jittered copies of them up to `count`."""
    boxes = proposals[(proposals[:, 2] > proposals[:, 0]) & (proposals[:, 3] > proposals[:, 1])]
    if len(boxes) >= count:
        return boxes[:count]
    copies = boxes[rng.integers(0, len(boxes), count - len(boxes))]
    wh = np.tile(copies[:, 2:] - copies[:, :2], 2)
    moved = copies + rng.normal(0.0, 0.05, copies.shape) * wh
    h, w = image_hw
    moved = np.clip(moved, 0.0, [w, h, w, h])
    moved[:, 2:] = np.maximum(moved[:, 2:], moved[:, :2] + 2.0)
    return np.concatenate([boxes, np.clip(moved, 0.0, [w, h, w, h])]).astype(np.float32)


def time_per_image(model, inputs, repeats):
    """Median seconds of predict_on_batch over the single-image inputs (each pass over all)."""
    model.predict_on_batch(inputs[0])  # trace
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for x in inputs:
            model.predict_on_batch(x)
        passes.append((time.perf_counter() - start) / len(inputs))
    return float(np.median(passes))


def large_nets(repeats, load, rng):
    """Test time of the papers' network sizes (random weights: time only) on one 375 x 500 image
    (a VOC-sized photo) with `load` random windows: R-CNN on torchvision's AlexNet (227 px warps),
    SPP-net on ZF-5 at 1 scale (688) and at the 5 scales, Fast R-CNN on ZF-5 conv5 with the
    image at 600 px (its single scale) and 6 x 6 RoI pooling (ZF-5's pool5 grid)."""
    image = tf.constant(rng.uniform(0, 255, (1, 375, 500, 3)), tf.float32)
    xy = rng.uniform(0, [450, 325], (load, 2))
    boxes = np.concatenate([xy, np.minimum(xy + rng.uniform(20, 300, (load, 2)), [500, 375])], 1)
    boxes = tf.constant(boxes[None], tf.float32)
    big = tf.image.resize(image, (600, 800))
    cases = {
        "rcnn_alexnet": (lambda: RCNN(20, backbone="alexnet", crop_batch=128),
                         {"images": image, "proposals": boxes}),
        "sppnet_zf5_1_scale": (lambda: SPPNet(20, scales=(688,)), {"images": image, "proposals": boxes}),
        "sppnet_zf5_5_scales": (lambda: SPPNet(20), {"images": image, "proposals": boxes}),
        "fast_rcnn_zf5": (lambda: FastRCNN(20, backbone="zf", feature="conv5", fc_dim=4096,
                                           roi_output_size=6, seed=0),
                          {"images": big, "proposals": boxes * 1.6}),
    }
    out = {}
    for name, (make, inputs) in cases.items():
        model = make()
        model.build()
        # R-CNN runs its 2000 warped windows through the whole net: one timed pass is enough
        seconds = time_per_image(model, [inputs], 1 if name.startswith("rcnn") else repeats)
        out[name] = {"seconds_per_image": round(seconds, 2), "params": int(model.count_params())}
        print(json.dumps({name: out[name]}), file=sys.stderr, flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data, 3 epochs, 1 repeat")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train", type=int, default=96, help="training images")
    parser.add_argument("--val", type=int, default=32, help="held-out images (mAP, timing)")
    parser.add_argument("--time-images", type=int, default=8, help="images timed per pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load", type=int, default=2000, help="windows per image of the heavy load")
    parser.add_argument("--models", default="rcnn,sppnet,sppnet_1sc,fast_rcnn")
    parser.add_argument("--large", action="store_true",
                        help="also time the papers' network sizes (untrained) on a 375 x 500 image")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.train, args.val, args.time_images, args.repeats = 3, 32, 8, 4, 1
    names = [n for n in args.models.split(",") if n]
    for n in names:
        make_model(n)  # unknown names fail before any work
    root = tempfile.mkdtemp(prefix="region_speed_")
    kw = dict(image_size=(SIZE, SIZE), object_size=(16, 64))
    train = make_dataset(os.path.join(root, "train"), args.train, seed=1, **kw)
    val = make_dataset(os.path.join(root, "val"), args.val, seed=2, split="val", **kw)
    caches = {}
    start = time.perf_counter()
    for split, data in (("train", train), ("val", val)):
        caches[split] = os.path.join(root, f"proposals_{split}.npz")
        write_proposal_cache(data, caches[split], progress=False, mode="fast", max_proposals=300)
    proposal_seconds = (time.perf_counter() - start) / (args.train + args.val)

    def pipeline(data, cache, training, batch=4):
        return build_dataset(data, batch, training=training, image_size=(SIZE, SIZE), seed=0,
                             proposals=cache, max_proposals=300)

    singles = list(pipeline(val, caches["val"], False, batch=1).take(args.time_images))
    counts = [int(((b["proposals"][0, :, 2:] - b["proposals"][0, :, :2]) > 0).numpy().all(-1).sum())
              for b in pipeline(val, caches["val"], False, batch=1)]
    rng = np.random.default_rng(0)
    heavy = []
    for b in singles:
        boxes = jitter_to(b["proposals"][0].numpy(), (SIZE, SIZE), args.load, rng)
        heavy.append(dict(b, proposals=tf.constant(boxes[None])))
    report = {"setting": {"image_size": SIZE, "train_images": args.train, "val_images": args.val,
                          "epochs": args.epochs, "timed_images": len(singles),
                          "repeats": args.repeats, "optimizer": "Adam 1e-3, clipnorm 10, batch 4",
                          "selective_search_seconds_per_image": round(proposal_seconds, 3),
                          "proposals_per_image_mean": round(float(np.mean(counts)), 1),
                          "heavy_load": f"{args.load} per image (proposals repeated and jittered)"},
              "paper_gpu_seconds_per_image": {"rcnn": 47.0, "sppnet": 2.3, "fast_rcnn": 0.32},
              "models": {}}
    for name in names:
        keras.utils.set_random_seed(0)
        model = make_model(name)
        model.compile(optimizer=keras.optimizers.Adam(1e-3, clipnorm=10.0))
        start = time.perf_counter()
        model.fit(pipeline(train, caches["train"], True), epochs=args.epochs, verbose=0)
        if hasattr(model, "fit_region_stages"):
            model.fit_region_stages(pipeline(train, caches["train"], False), say=lambda *_: None)
        train_seconds = time.perf_counter() - start
        val_map = evaluate_model(model, pipeline(val, caches["val"], False), metrics=("voc",))["voc"]["mAP"]
        keys = model.predict_input_keys
        light = [{k: b[k] for k in keys} for b in singles]
        loaded = [{k: b[k] for k in keys} for b in heavy]
        row = {"voc_map50": round(float(val_map), 3), "train_seconds": round(train_seconds, 1),
               "params": int(model.count_params()),
               "seconds_per_image": round(time_per_image(model, light, args.repeats), 4),
               f"seconds_per_image_{args.load}": round(time_per_image(model, loaded, args.repeats), 4),
               "macs_per_image": costs(name, model, int(np.mean(counts))),
               f"macs_per_image_{args.load}": costs(name, model, args.load)}
        report["models"][name] = row
        print(json.dumps({name: row}), file=sys.stderr, flush=True)
    rows = report["models"]
    if "rcnn" in rows:
        for key in ("seconds_per_image", f"seconds_per_image_{args.load}"):
            report.setdefault("speedup_over_rcnn", {})[key] = {
                n: round(rows["rcnn"][key] / r[key], 1) for n, r in rows.items()}
    if args.large:
        report["large_nets_untrained"] = large_nets(args.repeats, args.load, rng)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
