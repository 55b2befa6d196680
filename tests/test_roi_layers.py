"""RoI pooling layers: they wrap the ops, serialize, and train inside a model."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.layers import (DeformPSRoIPool, DeformRoIPool, PSRoIAlign, PSRoIPool, RoIAlign,
                             RoIPool)
from kerasdet.ops import roi

LAYERS = {
    "RoIPool": (lambda: RoIPool((2, 3), 0.5), lambda f, b, i: roi.roi_pool(f, b, i, (2, 3), 0.5)),
    "RoIAlign": (lambda: RoIAlign(2, 0.5, sampling_ratio=2, aligned=False),
                 lambda f, b, i: roi.roi_align(f, b, i, 2, 0.5, 2, False)),
    "PSRoIPool": (lambda: PSRoIPool(2, 0.5), lambda f, b, i: roi.ps_roi_pool(f, b, i, 2, 0.5)),
    "PSRoIAlign": (lambda: PSRoIAlign(2, 0.5, 1),
                   lambda f, b, i: roi.ps_roi_align(f, b, i, 2, 0.5, 1)),
    # Zero-initialized offset fc: at initialization the deformable layers are their base pooling.
    "DeformRoIPool": (lambda: DeformRoIPool(2, 0.5, 2, gamma=0.2),
                      lambda f, b, i: roi.roi_align(f, b, i, 2, 0.5, 2, True)),
    "DeformPSRoIPool": (lambda: DeformPSRoIPool(2, 0.5),
                        lambda f, b, i: roi.ps_roi_align(f, b, i, 2, 0.5)),
}


def _inputs():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 8, 10, 8)).astype(np.float32)
    boxes = np.array([[[1, 2, 12, 9], [4, 0, 18, 15], [0, 0, 0, 0]],
                      [[3, 3, 9, 9], [-2, 5, 8, 20], [6, 6, 16, 14]]], np.float32)
    return features, boxes


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_matches_op_flat_and_batched(name):
    make, op = LAYERS[name]
    features, boxes = _inputs()
    layer = make()
    flat = boxes.reshape(-1, 4)
    indices = np.repeat(np.arange(2, dtype=np.int32), 3)
    want = op(features, flat, indices).numpy()
    got_flat = layer(features, flat, indices).numpy()
    got_batched = layer(features, boxes).numpy()
    np.testing.assert_allclose(got_flat, want, atol=1e-6)
    np.testing.assert_allclose(got_batched.reshape(want.shape), want, atol=1e-6)
    assert got_batched.shape[:2] == (2, 3)
    assert layer.compute_output_shape(features.shape, boxes.shape) == got_batched.shape


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_get_config_round_trip(name):
    make, _ = LAYERS[name]
    layer = make()
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer) and restored.get_config() == config


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="output_size"):
        RoIAlign(0)
    with pytest.raises(ValueError, match="spatial_scale"):
        RoIPool(2, spatial_scale=0)
    with pytest.raises(ValueError, match="divisible"):
        PSRoIPool(3)(tf.zeros([1, 4, 4, 8]), tf.zeros([1, 1, 4]))
    with pytest.raises(ValueError, match="offset_groups"):
        DeformRoIPool(2, offset_groups=3)(tf.zeros([1, 4, 4, 8]), tf.zeros([1, 1, 4]))
    with pytest.raises(ValueError, match="boxes"):
        RoIAlign(2)(tf.zeros([1, 4, 4, 8]), tf.zeros([2, 4]))


def _tiny_model(pool, channels):
    images = keras.Input((16, 20, 3), name="images")
    boxes = keras.Input((3, 4), name="boxes")
    features = keras.layers.Conv2D(channels, 3, strides=2, padding="same")(images)
    pooled = pool(features, boxes)  # [B, 3, ph, pw, C']
    flat = keras.layers.Reshape((3, -1))(pooled)
    scores = keras.layers.Dense(1)(flat)
    return keras.Model([images, boxes], scores)


@pytest.mark.parametrize("name,channels", [("RoIAlign", 8), ("RoIPool", 8), ("PSRoIAlign", 8),
                                           ("PSRoIPool", 8), ("DeformRoIPool", 8),
                                           ("DeformPSRoIPool", 8)])
def test_tiny_model_trains_with_fit(name, channels):
    make, _ = LAYERS[name]
    pool = make()
    model = _tiny_model(pool, channels)
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1, size=(8, 16, 20, 3)).astype(np.float32)
    boxes = np.tile(np.array([[1, 1, 10, 9], [5, 2, 19, 15], [0, 8, 12, 16]], np.float32),
                    (8, 1, 1))
    targets = images[:, :3, :3, :1].reshape(8, -1)[:, :3, None] * 3.0
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    before = model.evaluate([images, boxes], targets, verbose=0)
    model.fit([images, boxes], targets, epochs=6, batch_size=4, verbose=0)
    after = model.evaluate([images, boxes], targets, verbose=0)
    assert after < 0.8 * before
    if name.startswith("Deform"):
        # The offset fc starts at zero and must receive gradient through the offsets.
        assert np.abs(pool.offset_fc.kernel.numpy()).max() > 0
