#!/usr/bin/env python
"""Detector speed on this machine, printed as JSON.

For each detector: inference latency at ResNet-50 scale (800 x 1216 input, batch 1, 80 classes;
median of --repeats after a warm-up call that traces the graph), and the training-step time of the
tiny configuration the learning tests use (128 x 128, batch 4). With --torchvision (needs torch and
torchvision installed), the same-architecture torchvision models (random weights, 81 classes,
min_size 800 / max_size 1216 so the input is not resized) are timed just before and just after
kerasdet in the same run, in a child process (torch without TensorFlow), and the ratio
kerasdet / torchvision uses the mean of the two, so the two frameworks are compared on the same
cores at the same moment; the load averages go into the JSON.

    python benchmarks/models.py --models faster_rcnn_fpn,mask_rcnn_fpn --torchvision --repeats 5
        [--precision float32|mixed_bfloat16]
"""
import argparse
import importlib
import json
import os
import statistics
import sys
import time

import subprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import numpy as np  # noqa: E402

if "--torchvision-child" not in sys.argv:  # the torchvision child never loads TensorFlow
    import tensorflow as tf  # noqa: E402

# name -> (module, class, ResNet-50-scale kwargs, tiny kwargs, torchvision builder name)
FPN_TINY = dict(backbone="tiny", fpn_channels=64, fc_dim=256,
                anchor_sizes=((16,), (32,), (64,), (128,), (256,)), rpn_batch_size=128,
                roi_batch_size=128, rpn_pre_nms_top_k_train=500, rpn_post_nms_top_k_train=300,
                rpn_pre_nms_top_k_test=300, rpn_post_nms_top_k_test=100, seed=0)
REFINEDET_TINY = dict(backbone="tiny", source_layers=("C3", "C4", "C5"), l2_norm_scales=(0, 0, 0),
                      backbone_config={"channels": [16, 32, 64, 96, 128],
                                       "input_normalization": "torchvision"},
                      anchor_sizes=((16,), (32,), (64,)), tcb_channels=64, seed=0)
MODELS = {
    "faster_rcnn_fpn": ("kerasdet.models.faster_rcnn", "FasterRCNN",
                        dict(backbone="resnet50"), FPN_TINY, "fasterrcnn_resnet50_fpn"),
    "faster_rcnn_c4": ("kerasdet.models.faster_rcnn", "FasterRCNN",
                       dict(backbone="resnet50_c4", fpn=False, box_head="res5"),
                       dict(FPN_TINY, fpn=False, anchor_sizes=((32, 64, 128),)), None),
    "mask_rcnn_fpn": ("kerasdet.models.mask_rcnn", "MaskRCNN", dict(backbone="resnet50"),
                      FPN_TINY, "maskrcnn_resnet50_fpn"),
    "cascade_rcnn_fpn": ("kerasdet.models.cascade_rcnn", "CascadeRCNN",
                         dict(backbone="resnet50"), FPN_TINY, None),
    "rfcn": ("kerasdet.models.rfcn", "RFCN", dict(backbone="resnet101_dilated"),
             {**{k: v for k, v in FPN_TINY.items() if k != "fc_dim"}, "fpn": True,
              "feature_level": "P2", "ps_pooling": "ps_roi_align"}, None),
    "deformable_faster_rcnn_fpn": ("kerasdet.models.deformable", "DeformableFasterRCNN",
                                   dict(backbone="resnet50_dcn"),
                                   dict(FPN_TINY, backbone="tiny_dcn"), None),
    # RefineDet (issue #13): VGG-16 at its own square input, VOC's 20 classes (the paper's models);
    # the tiny kwargs are its learning test's configuration.
    "refinedet320_vgg16": ("kerasdet.models.refinedet", "RefineDet",
                           dict(input_size=(320, 320), num_classes=20), REFINEDET_TINY, None),
    "refinedet512_vgg16": ("kerasdet.models.refinedet", "RefineDet",
                           dict(input_size=(512, 512), num_classes=20), REFINEDET_TINY, None),
}


def median_seconds(fn, repeats):
    fn()  # trace / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def keras_inference(cls, kwargs, repeats, precision="float32"):
    import keras

    keras.mixed_precision.set_global_policy(precision)
    kwargs = dict(kwargs)
    height, width = kwargs.pop("input_size", (800, 1216))  # single-shot models: their own size
    model = cls(kwargs.pop("num_classes", 80), **kwargs)
    model.build((1, height, width, 3))
    images = tf.random.uniform([1, height, width, 3], 0, 255, seed=0)
    predict = tf.function(lambda x: model(x, training=False))
    seconds = median_seconds(lambda: tf.nest.map_structure(lambda t: t.numpy(), predict(images)), repeats)
    keras.mixed_precision.set_global_policy("float32")
    return seconds, model.count_params()


def keras_train_step(cls, kwargs, repeats):
    import keras

    model = cls(3, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    rng = np.random.default_rng(0)
    boxes = np.array([[[10, 10, 60, 60], [50, 40, 120, 100]]] * 4, np.float32)
    batch = {"images": rng.uniform(0, 255, (4, 128, 128, 3)).astype(np.float32),
             "bounding_boxes": {"boxes": boxes, "labels": np.array([[0, 1]] * 4, np.int32)},
             "image_info": np.array([[128, 128, 1, 1, 128, 128]] * 4, np.float32)}
    # The boxes filled, for the mask models: all-ones grids over the boxes (the pipeline's layout).
    batch["masks"] = np.ones([4, 2, 112, 112], np.float16)
    return median_seconds(lambda: model.train_on_batch(batch), repeats)


def torchvision_inference(name, repeats, precision="float32"):
    import contextlib

    import torch
    import torchvision

    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_flush_denormal(True)  # as TensorFlow's CPU threads do (see benchmarks/train_speed.py)
    model = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None,
                                                        num_classes=81, min_size=800,
                                                        max_size=1216).eval()
    image = torch.rand(3, 800, 1216)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "mixed_bfloat16"
                else contextlib.nullcontext())
    with torch.no_grad(), autocast:
        return median_seconds(lambda: model([image]), repeats)


def torchvision_child(name, repeats, precision="float32"):
    """Run in a child process: torchvision's inference seconds for `name`, as one JSON line."""
    seconds = torchvision_inference(name, repeats, precision)
    print(json.dumps({"seconds": seconds, "load_average": list(os.getloadavg())}))


def torchvision_in_child(name, repeats, precision="float32"):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--torchvision-child", name,
                          "--repeats", str(repeats), "--precision", precision], check=True, stdout=subprocess.PIPE,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torchvision", action="store_true")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--skip-train", action="store_true", help="no tiny training step")
    parser.add_argument("--precision", default="float32", choices=["float32", "mixed_bfloat16"],
                        help="inference in bfloat16 compute: Keras' mixed_bfloat16 policy for kerasdet, "
                             "torch.autocast(cpu, bfloat16) for torchvision")
    parser.add_argument("--torchvision-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torchvision_child:
        return torchvision_child(args.torchvision_child, args.repeats, args.precision)
    report = {"tensorflow": tf.__version__, "cpus": os.cpu_count(), "precision": args.precision, "models": {}}
    for name in args.models.split(","):
        module, cls_name, big, tiny, tv_name = MODELS[name]
        entry = report["models"].setdefault(name, {})
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError) as err:
            entry["skipped"] = f"not available: {err}"
            continue
        compare = args.torchvision and tv_name and not args.skip_inference
        if compare:
            before = torchvision_in_child(tv_name, args.repeats, args.precision)
        if not args.skip_inference:
            load = os.getloadavg()
            if tv_name:  # torchvision's settings (NMS sizes, thresholds, frozen BN, ...)
                from kerasdet.converters.torchvision import detector_config

                big = {k: v for k, v in detector_config(tv_name, 80).items() if k != "num_classes"}
            seconds, params = keras_inference(cls, big, args.repeats, args.precision)
            entry.update(inference_800x1216_s=round(seconds, 3), parameters=params,
                         load_average=list(load))
        if compare:
            after = torchvision_in_child(tv_name, args.repeats, args.precision)
            tv = (before["seconds"] + after["seconds"]) / 2
            entry.update(torchvision_inference_before_s=round(before["seconds"], 3),
                         torchvision_inference_after_s=round(after["seconds"], 3),
                         torchvision_load_average=[before["load_average"],
                                                   after["load_average"]],
                         ratio_kerasdet_over_torchvision=round(seconds / tv, 3),
                         speedup_vs_torchvision=round(tv / seconds, 2))
        if not args.skip_train:
            entry["train_step_tiny_s"] = round(keras_train_step(cls, tiny, args.repeats), 4)
        if "input_size" in big and "inference_800x1216_s" in entry:
            entry["inference_{}x{}_s".format(*big["input_size"])] = entry.pop("inference_800x1216_s")
        print(json.dumps({name: entry}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
