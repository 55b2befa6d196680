"""Trains a tiny detector for a few steps on one device and under MirroredStrategy over two
logical CPU devices, and writes each run's final weights, so that tests/test_distribute.py can
compare them. Runs in its own interpreter: logical devices must be set before TensorFlow starts.

    python mirrored_steps.py {faster,mask} OUT_DIR RUN [RUN ...]

RUN is one of
    single      one device, global batch 2
    mirrored    two replicas, 1 image each
    unscaled    two replicas with the per-replica loss scaling removed (the control: each replica's
                gradient counts fully, so the update is about twice the one-device update)
    local_norm  two replicas whose loss normalizers stay per replica (the other control)
Give `local_norm` a process of its own: a MirroredStrategy made after another one in the same
process, with fewer collectives in its step, aborts with a collective shape mismatch (seen with
TensorFlow 2.21; one strategy per process, as in real training, is unaffected).
Writes OUT_DIR/RUN.npz (weights by variable path) and OUT_DIR/RUN.json (the losses of each step).
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

from kerasdet import losses as kd_losses  # noqa: E402
from kerasdet.data.pipeline import build_dataset  # noqa: E402
from kerasdet.data.synthetic import make_dataset  # noqa: E402
from kerasdet.models import base  # noqa: E402
from kerasdet.models.faster_rcnn import FasterRCNN  # noqa: E402
from kerasdet.models.mask_rcnn import MaskRCNN  # noqa: E402

STEPS, GLOBAL_BATCH = 3, 2
# Every labelled anchor and RoI is sampled (budgets above the candidates: at most 1023 anchors on a
# 64 x 64 image, 16 proposals + 2 boxes), so the samples do not depend on the random draw, which
# differs between one [2, N] draw and two [1, N] draws; only their order does, and sums ignore it.
SETTINGS = dict(backbone="tiny", fpn_channels=32, fc_dim=64,
                anchor_sizes=((16,), (32,), (64,), (128,), (256,)),
                rpn_batch_size=2048, rpn_pre_nms_top_k_train=200, rpn_post_nms_top_k_train=16,
                roi_batch_size=64, roi_positive_fraction=0.5, seed=0)
MASK_SETTINGS = dict(SETTINGS, mask_channels=16, mask_rois_per_image=32)
ORIGINALS = (base.replicas_in_sync, kd_losses.replica_mean_normalizer)


def make_model(kind):
    if kind == "faster":
        return FasterRCNN(3, **SETTINGS)
    return MaskRCNN(3, **MASK_SETTINGS)


def run(kind, out_dir, mode):
    keras.utils.set_random_seed(0)
    data = make_dataset(os.path.join(out_dir, "data"), STEPS * GLOBAL_BATCH, seed=3,
                        image_size=(64, 64), num_classes=3)
    dataset = build_dataset(data, GLOBAL_BATCH, training=False, image_size=(64, 64),
                            with_masks=kind == "mask")
    strategy = (tf.distribute.get_strategy() if mode == "single"
                else tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    if mode == "unscaled":
        base.replicas_in_sync = lambda: 1
    if mode == "local_norm":
        kd_losses.replica_mean_normalizer = lambda normalizer: normalizer
    try:
        train(kind, out_dir, mode, strategy, dataset)
    finally:
        base.replicas_in_sync, kd_losses.replica_mean_normalizer = ORIGINALS


def train(kind, out_dir, mode, strategy, dataset):
    with strategy.scope():
        model = make_model(kind)
        model.build()
        # clipnorm low enough that clipping acts: the across-replica clipping path is under test.
        model.compile(optimizer=keras.optimizers.SGD(0.02, momentum=0.9, clipnorm=1.0))
    history = model.fit(dataset, epochs=1, steps_per_epoch=STEPS, verbose=0)
    # Paths without the model name, which Keras makes unique per process (faster_rcnn_1, ...).
    weights = {v.path.split("/", 1)[-1]: np.asarray(v.numpy()) for v in model.weights}
    np.savez(os.path.join(out_dir, f"{mode}.npz"), **weights)
    with open(os.path.join(out_dir, f"{mode}.json"), "w") as f:
        json.dump({k: [float(x) for x in v] for k, v in history.history.items()}, f)


if __name__ == "__main__":
    kind, out_dir, *modes = sys.argv[1:]
    if kind not in ("faster", "mask") or not modes:
        sys.exit(__doc__)
    for mode in modes:
        run(kind, out_dir, mode)
