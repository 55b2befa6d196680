"""Checks every detector must pass, shared by the per-model test files."""
import keras
import numpy as np
import tensorflow as tf

# Two images padded to one 96 x 160 canvas; the second one's valid region is 64 x 100.
SIZES = [(96, 160), (64, 100)]


def check_predict_on_mixed_sizes(model):
    """predict on a padded batch of two sizes: fixed-size outputs, at least one detection (so the
    containment check below is not vacuous), and boxes inside each image's own valid region,
    never the padded canvas."""
    images = np.random.default_rng(7).uniform(0, 255, [2, 96, 160, 3]).astype(np.float32)
    images[1, 64:], images[1, :, 100:] = 0.0, 0.0
    info = np.array([[h, w, 1, 1, h, w] for h, w in SIZES], np.float32)
    out = model.predict_on_batch({"images": images, "image_info": info})
    assert out["boxes"].shape == (2, 100, 4) and out["classes"].dtype == np.int32
    n = out["num_detections"]
    assert n.sum() > 0
    for b, (h, w) in enumerate(SIZES):
        boxes = out["boxes"][b, : n[b]]
        assert np.all(boxes[:, [0, 2]] <= w + 1e-3) and np.all(boxes[:, [1, 3]] <= h + 1e-3)
    return out


def check_train_step_without_objects(model, box_losses=("rpn_box", "roi_box")):
    """A training step on a batch without any object: finite losses, zero box losses."""
    model.compile(optimizer="sgd")
    batch = {"images": tf.random.uniform([2, 64, 64, 3], 0, 255),
             "bounding_boxes": {"boxes": tf.zeros([2, 0, 4]),
                                "labels": tf.zeros([2, 0], tf.int32)}}
    logs = model.train_on_batch(batch, return_dict=True)
    assert all(np.isfinite(v) for v in logs.values())
    for name in box_losses:
        assert logs[name] == 0.0, name
    return logs


def check_training_reaches_every_layer(model, batch):
    """One eager `train_on_batch`: every sublayer whose `call` takes `training` and runs in the step
    receives ``training=True``. Layers choose their training-time computation from it (the 1x1 and
    3x3 convolutions' gradient kernels, frozen BN folding); a part that forgets to pass it on
    silently trains on the inference path. Returns the names of the layers checked."""
    import inspect

    if not model.built:  # building runs the model once with training=False
        model.build()
    received = {}
    for layer in model._flatten_layers(include_self=False):
        # keras.layers.Dense takes `training` and ignores it; RoI pooling layers call theirs without.
        if type(layer) is keras.layers.Dense or "training" not in inspect.signature(layer.call).parameters:
            continue

        def recording(*args, _layer=layer, _call=layer.call, **kwargs):
            received.setdefault(_layer.name, set()).add(kwargs.get("training"))
            return _call(*args, **kwargs)

        layer.call = recording
    model.compile(optimizer="sgd", run_eagerly=True)
    model.train_on_batch(batch)
    wrong = {name: seen for name, seen in received.items() if seen != {True}}
    assert not wrong, f"layers run in a training step without training=True: {wrong}"
    assert received, "no layer taking `training` ran: the check would be vacuous"
    return sorted(received)
