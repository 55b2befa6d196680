"""Shared procedure of the "does it learn" tests: train a tiny detector with model.fit on the
synthetic training split and measure VOC mAP@0.5 on the held-out split."""
import time

import keras

from kerasdet.data.pipeline import build_dataset
from kerasdet.evaluation import evaluate_model


def fit_and_evaluate(model, data, epochs, learning_rate=0.02, batch_size=4, with_masks=False,
                     metrics=("voc",), map_batches=None):
    """Returns (history dict, metrics dict, seconds of training).

    `map_batches` (a function batch -> batch) adds model-specific inputs, e.g. proposals."""
    train, val = data
    train_ds = build_dataset(train, batch_size, training=True, image_size=(128, 128), seed=0,
                             with_masks=with_masks)
    val_ds = build_dataset(val, batch_size, image_size=(128, 128), with_masks=with_masks)
    if map_batches is not None:
        train_ds, val_ds = train_ds.map(map_batches), val_ds.map(map_batches)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9, weight_decay=1e-4,
                                                 clipnorm=10.0))
    start = time.perf_counter()
    history = model.fit(train_ds, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - start
    results = evaluate_model(model, val_ds, metrics=metrics)
    return history.history, results, seconds


def tiny_fpn_settings():
    """Settings that make an FPN two-stage detector small enough to learn in about a minute."""
    return dict(backbone="tiny", fpn_channels=64, fc_dim=256,
                anchor_sizes=((16,), (32,), (64,), (128,), (256,)), rpn_batch_size=128,
                roi_batch_size=128, rpn_pre_nms_top_k_train=500, rpn_post_nms_top_k_train=300,
                rpn_pre_nms_top_k_test=300, rpn_post_nms_top_k_test=100, seed=0)
