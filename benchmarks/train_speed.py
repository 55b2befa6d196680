#!/usr/bin/env python
"""Training-step speed of Faster / Mask R-CNN R50-FPN against torchvision, printed as JSON.

One training step = forward, backward and SGD update on one batch of 2 random 800 x 1216 images
with a few random ground-truth boxes (and masks), random weights, 80 classes (81 torchvision
logits). Both frameworks freeze the same parts: BatchNorm frozen everywhere (torchvision's
FrozenBatchNorm2d, kerasdet's `frozen_bn`) and the stem + layer1 not trained (torchvision's
trainable_backbone_layers=3, kerasdet's `freeze_at=2`), with the RPN / RoI settings of
torchvision's training defaults (kerasdet.converters.torchvision.detector_config). torchvision
built with weights=None would use plain BatchNorm and train every layer, so its models are
assembled here from the same pieces its builders use, with the frozen norm.

torchvision is timed in a child process (this script with --torchvision-only: torch without
TensorFlow, so neither library's thread pools or import order disturb the other) just before and
just after kerasdet, and the ratio uses the mean of the two, so a change of machine load during the
run shows as a before/after gap instead of a wrong ratio. Each figure is the median of --repeats
steps after --warmup steps. Read the figures with the load averages the JSON carries: on a loaded
machine both slow down by different, changing amounts (torch's OpenMP barriers wait for preempted
threads), so only a quiet machine gives a ratio to hold a goal against (docs/SPEED.md).
With --rounds R, kerasdet's steps are timed R times between R + 1 torchvision runs: each round's
ratio uses its own neighbours, and the reported ratio is the median of the rounds' ratios, which
holds up better against this host's drift (the same step moves by +-30 % within minutes).
Every round times the same training steps on both sides: torchvision's child process starts from
its initial weights each time, and kerasdet's model (kept, with its traced step) is put back to
its initial weights and optimizer state and warmed up again before each round. The work of a step
changes as the random net trains: Mask R-CNN's mask head runs on the foreground RoIs, 7 and 6 of
them per image at the first step of this problem and 17 and 17 at the sixth.

    python benchmarks/train_speed.py [--models faster_rcnn_fpn,mask_rcnn_fpn] [--repeats 5]
        [--precision float32|mixed_bfloat16] [--rounds 3]

--precision mixed_bfloat16 times both sides in bfloat16 compute (Keras' mixed_bfloat16 policy,
torch.autocast on CPU), float32 weights and optimizer on both.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HEIGHT, WIDTH, BATCH, NUM_CLASSES, NUM_OBJECTS = 800, 1216, 2, 80, 6
MODELS = {
    "faster_rcnn_fpn": ("fasterrcnn_resnet50_fpn", "kerasdet.models.faster_rcnn", "FasterRCNN"),
    "mask_rcnn_fpn": ("maskrcnn_resnet50_fpn", "kerasdet.models.mask_rcnn", "MaskRCNN"),
}


def timed(step, warmup, repeats, label=""):
    """Median seconds of `step()` over `repeats` calls after `warmup` calls, and all the times."""
    for _ in range(warmup):
        start = time.perf_counter()
        step()
        print(f"{label} warm-up {time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        print(f"{label} step {times[-1]:.2f} s", file=sys.stderr, flush=True)
    return statistics.median(times), times


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def random_problem(seed=0):
    """Images [B, H, W, 3] 0..255, boxes [B, N, 4] (x1, y1, x2, y2), labels [B, N] in 0..79 and
    image-sized binary masks [B, N, H, W] (an ellipse inside each box)."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (BATCH, HEIGHT, WIDTH, 3)).astype(np.float32)
    size = rng.uniform(48, 400, (BATCH, NUM_OBJECTS, 2))
    x1 = rng.uniform(0, WIDTH - size[..., 0])
    y1 = rng.uniform(0, HEIGHT - size[..., 1])
    boxes = np.stack([x1, y1, x1 + size[..., 0], y1 + size[..., 1]], -1).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, (BATCH, NUM_OBJECTS)).astype(np.int32)
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH] + 0.5
    masks = np.zeros((BATCH, NUM_OBJECTS, HEIGHT, WIDTH), np.uint8)
    for b in range(BATCH):
        for n in range(NUM_OBJECTS):
            bx1, by1, bx2, by2 = boxes[b, n]
            cx, cy, rx, ry = (bx1 + bx2) / 2, (by1 + by2) / 2, (bx2 - bx1) / 2, (by2 - by1) / 2
            masks[b, n] = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
    return images, boxes, labels, masks


# -- torchvision -----------------------------------------------------------------------------------
def torchvision_model(name):
    import torch

    """torchvision's `name` with FrozenBatchNorm2d and trainable_backbone_layers=3 (what its
    builder does with pretrained weights), random weights, 81 classes, 800 x 1216 input."""
    from torchvision.models import resnet50
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc

    torch.manual_seed(0)
    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=misc.FrozenBatchNorm2d), 3)
    cls = MaskRCNN if name.startswith("mask") else FasterRCNN
    return cls(backbone, num_classes=NUM_CLASSES + 1, min_size=HEIGHT, max_size=WIDTH)


def torchvision_step_fn(name, problem, lr, precision="float32"):
    import contextlib

    import torch

    images, boxes, labels, masks = problem
    model = torchvision_model(name).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    tv_images = [torch.from_numpy(img).permute(2, 0, 1) / 255.0 for img in images]
    targets = []
    for b in range(BATCH):
        target = {"boxes": torch.from_numpy(boxes[b]), "labels": torch.from_numpy(labels[b]).long() + 1}
        if name.startswith("mask"):
            target["masks"] = torch.from_numpy(masks[b])
        targets.append(target)

    def autocast():
        if precision == "mixed_bfloat16":  # torch's counterpart of Keras' mixed_bfloat16 policy
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step():
        with autocast():
            loss = sum(model(tv_images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    trainable = sum(p.numel() for p in params)
    return step, trainable


# -- kerasdet --------------------------------------------------------------------------------------
def kerasdet_step_fn(name, problem, lr, jit_compile, precision="float32"):
    import importlib

    import keras
    import tensorflow as tf

    keras.mixed_precision.set_global_policy(precision)

    from kerasdet.converters.torchvision import detector_config
    from kerasdet.data.mask_grids import crop_masks_to_boxes

    tv_name, module, cls_name = MODELS[name]
    images, boxes, labels, masks = problem
    config = detector_config(tv_name, NUM_CLASSES)
    model = getattr(importlib.import_module(module), cls_name)(**config)
    model.build((1, HEIGHT, WIDTH, 3))
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9), jit_compile=jit_compile)
    batch = {"images": images,
             "bounding_boxes": {"boxes": boxes, "labels": labels},
             "image_info": np.array([[HEIGHT, WIDTH, 1, 1, HEIGHT, WIDTH]] * BATCH, np.float32)}
    if name.startswith("mask"):
        batch["masks"] = np.stack([crop_masks_to_boxes(masks[b], boxes[b], 112).numpy()
                                   for b in range(BATCH)])
    batch = tf.nest.map_structure(tf.convert_to_tensor, batch)

    def step():
        logs = model.train_on_batch(batch, return_dict=True)
        return float(logs["loss"])

    # The optimizer built before any step, so that its initial slots can be put back (`restart`).
    model.optimizer.build(model.trainable_variables)
    initial = [(v, v.numpy()) for v in list(model.variables) + list(model.optimizer.variables)]

    def restart():
        """Back to the initial weights and optimizer state; the traced step is kept."""
        for variable, value in initial:
            variable.assign(value)

    step.restart = restart
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    return step, trainable, model


def torchvision_only(args):
    """The child process: torchvision's step of one model, timed, as one JSON line."""
    import torch
    import torchvision

    torch.set_num_threads(args.threads)
    # TensorFlow's CPU threads flush denormal floats to zero; torch's do not unless asked. Without
    # this, torch's third step (after two updates of the random net) took 120-140 s instead of 13-15 s
    # here: the figure would time denormal arithmetic, not the detector.
    torch.set_flush_denormal(True)
    tv_name = MODELS[args.torchvision_only][0]
    step, params = torchvision_step_fn(tv_name, random_problem(), args.lr, args.precision)
    seconds, times = timed(step, args.warmup, args.repeats, f"{args.torchvision_only} torchvision")
    print(json.dumps({"seconds": seconds, "times": times, "trainable_parameters": params,
                      "torch": torch.__version__, "torchvision": torchvision.__version__,
                      "torch_threads": torch.get_num_threads(),
                      "load_average": list(os.getloadavg())}))


def run_torchvision(name, args):
    command = [sys.executable, os.path.abspath(__file__), "--torchvision-only", name,
               "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--lr", str(args.lr),
               "--threads", str(args.threads), "--precision", args.precision]
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4,
                        help="SGD learning rate (small: random weights must not diverge to NaN)")
    parser.add_argument("--jit-compile", default="false", choices=["false", "true", "auto"],
                        help="kerasdet's compile(jit_compile=...); the RoI kernels are not XLA ops")
    parser.add_argument("--precision", default="float32", choices=["float32", "mixed_bfloat16"],
                        help="mixed_bfloat16: Keras' policy for kerasdet, torch.autocast(cpu, bfloat16) "
                             "for torchvision")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate torchvision and kerasdet this many times (torchvision runs "
                             "rounds + 1 times, first and last); the ratio is the median of the "
                             "rounds' ratios")
    parser.add_argument("--output", default=None, help="also write the JSON to this file")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch.set_num_threads of the torchvision child (TensorFlow uses its "
                             "defaults: one intra-op thread per core)")
    parser.add_argument("--torchvision-only", default=None, choices=list(MODELS),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torchvision_only:
        return torchvision_only(args)
    import tensorflow as tf

    jit = {"false": False, "true": True, "auto": "auto"}[args.jit_compile]
    problem = random_problem()
    report = {
        "benchmark": "train_speed", "input": [BATCH, HEIGHT, WIDTH, 3],
        "num_classes": NUM_CLASSES, "objects_per_image": NUM_OBJECTS,
        "repeats": args.repeats, "warmup": args.warmup, "lr": args.lr, "precision": args.precision,
        "machine": {"cpu": _cpu_name(), "cpus": os.cpu_count(),
                    "load_average_start": list(os.getloadavg()),
                    "torch_threads": args.threads,
                    "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads()
                    or "default (one per core)",
                    "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads()
                    or "default",
                    "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
                    "tensorflow": tf.__version__},
        "models": {}}
    for name in args.models.split(","):
        torchvision_runs = [run_torchvision(name, args)]
        kd_step, kd_params, _ = kerasdet_step_fn(name, problem, args.lr, jit, args.precision)
        kd_rounds, kd_loads = [], []
        for round_index in range(args.rounds):
            # The same steps as torchvision's fresh child times (see the module docstring).
            kd_step.restart()
            kd_rounds.append(timed(kd_step, args.warmup, args.repeats,
                                   f"{name} kerasdet round {round_index + 1}/{args.rounds}"))
            kd_loads.append(list(os.getloadavg()))
            torchvision_runs.append(run_torchvision(name, args))
        del kd_step
        rounds = []
        for index, (kd_round, kd_load) in enumerate(zip(kd_rounds, kd_loads)):
            before, after = torchvision_runs[index], torchvision_runs[index + 1]
            tv = (before["seconds"] + after["seconds"]) / 2
            rounds.append({"kerasdet_step_s": round(kd_round[0], 3),
                           "torchvision_step_before_s": round(before["seconds"], 3),
                           "torchvision_step_after_s": round(after["seconds"], 3),
                           "ratio": round(kd_round[0] / tv, 3),
                           "load_average": {"torchvision_before": before["load_average"],
                                            "kerasdet": kd_load,
                                            "torchvision_after": after["load_average"]}})
        kd_all = [t for _, times in kd_rounds for t in times]
        kd = statistics.median(kd_all)
        tv_all = [t for run in torchvision_runs for t in run["times"]]
        tv = statistics.median(tv_all)
        before, after = torchvision_runs[0], torchvision_runs[-1]
        report["machine"].update(torch=before["torch"], torchvision=before["torchvision"])
        entry = {
            # With one round: kerasdet's median over the mean of torchvision's before / after
            # medians; with more, the median of the rounds' ratios, so a drift of the machine's
            # speed between rounds moves both sides of each ratio together.
            "ratio_kerasdet_over_torchvision": round(statistics.median([r["ratio"] for r in rounds]), 3),
            "rounds": rounds,
            "kerasdet_step_s": round(kd, 3),
            "torchvision_step_s": round(tv, 3),
            "torchvision_step_before_s": round(before["seconds"], 3),
            "torchvision_step_after_s": round(after["seconds"], 3),
            "kerasdet_steps_per_s": round(1 / kd, 3), "torchvision_steps_per_s": round(1 / tv, 3),
            "kerasdet_images_per_s": round(BATCH / kd, 3),
            "kerasdet_trainable_parameters": kd_params,
            "torchvision_trainable_parameters": before["trainable_parameters"],
            "kerasdet_jit_compile": jit,
            "times_s": {"kerasdet": [round(t, 3) for t in kd_all],
                        "torchvision": [[round(t, 3) for t in run["times"]]
                                        for run in torchvision_runs]},
        }
        report["models"][name] = entry
        print(json.dumps({name: entry}), file=sys.stderr, flush=True)
    text = json.dumps(report, indent=2)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
