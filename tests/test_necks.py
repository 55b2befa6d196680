"""Tests of kerasdet.necks (FPN) against plain-numpy references."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.backbones.tiny import TinyBackbone
from kerasdet.necks import FPN, TransferConnectionBlocks, upsample_nearest_to


def np_conv2d_same(x, kernel, bias):
    """Stride-1 cross-correlation with symmetric zero padding k // 2 (odd kernels)."""
    kh, kw = kernel.shape[:2]
    ph, pw = kh // 2, kw // 2
    xp = np.pad(x.astype(np.float64), ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    h, w = x.shape[1:3]
    out = np.zeros(x.shape[:3] + (kernel.shape[3],))
    for i in range(kh):
        for j in range(kw):
            out += xp[:, i:i + h, j:j + w, :] @ kernel[i, j].astype(np.float64)
    return out + bias


def np_upsample_nearest(x, height, width):
    """Coarse pixel j covers fine pixels 2j and 2j + 1 (source index floor(i * h / H))."""
    rows = (np.arange(height) * x.shape[1]) // height
    cols = (np.arange(width) * x.shape[2]) // width
    return x[:, rows][:, :, cols]


def random_features(rng, sizes, channels, batch=1):
    return {name: rng.normal(size=(batch, h, w, c)).astype(np.float32)
            for (name, (h, w)), c in zip(sizes.items(), channels)}


def test_upsample_nearest_matches_numpy_for_even_and_odd_sizes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
    for height, width in ((8, 10), (7, 9), (8, 9)):
        ref = np.zeros((1, height, width, 1), np.float32)
        got = upsample_nearest_to(tf.constant(x), tf.constant(ref)).numpy()
        np.testing.assert_array_equal(got, np_upsample_nearest(x, height, width))
    # The exact 2x case is a plain pixel repeat.
    doubled = upsample_nearest_to(tf.constant(x), tf.zeros((1, 8, 10, 1))).numpy()
    np.testing.assert_array_equal(doubled, x.repeat(2, axis=1).repeat(2, axis=2))


def test_upsample_nearest_gradient():
    x = tf.constant(np.random.default_rng(1).normal(size=(1, 2, 3, 2)), tf.float64)
    ref = tf.zeros((1, 3, 5, 1))
    theoretical, numerical = tf.test.compute_gradient(
        lambda t: upsample_nearest_to(tf.cast(t, tf.float32), ref), [x])
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-2)


@pytest.mark.parametrize("height,width", [(97, 131), (64, 64), (33, 47)])
def test_fpn_shapes_follow_backbone_on_odd_sizes(height, width):
    backbone = TinyBackbone()
    fpn = FPN(channels=32)
    features = backbone(np.zeros((2, height, width, 3), np.float32))
    pyramid = fpn(features)
    assert list(pyramid) == ["P2", "P3", "P4", "P5", "P6"] == fpn.output_levels
    for k in (2, 3, 4, 5):
        assert tuple(pyramid[f"P{k}"].shape) == tuple(features[f"C{k}"].shape[:3]) + (32,)
    p5 = pyramid["P5"].shape
    assert tuple(pyramid["P6"].shape) == (2, (p5[1] + 1) // 2, (p5[2] + 1) // 2, 32)
    assert fpn.output_strides(backbone.strides) == {"P2": 4, "P3": 8, "P4": 16, "P5": 32, "P6": 64}


def test_fpn_top_down_merge_matches_numpy():
    rng = np.random.default_rng(2)
    # Odd C4 (7x9) under a C5 of 4x5: the top-down path must resize to the lateral, not double.
    features = random_features(rng, {"C4": (7, 9), "C5": (4, 5)}, (6, 10), batch=2)
    fpn = FPN(channels=4, input_levels=("C4", "C5"))
    out = fpn(features)
    for layer in fpn.lateral_convs + fpn.output_convs:   # non-zero biases so they are checked too
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel, rng.normal(size=bias.shape)])
    out = {k: v.numpy() for k, v in fpn(features).items()}

    def weights(name):
        return [layer for layer in fpn.lateral_convs + fpn.output_convs if layer.name == name][0].get_weights()

    lateral5 = np_conv2d_same(features["C5"], *weights("fpn_lateral5"))
    lateral4 = np_conv2d_same(features["C4"], *weights("fpn_lateral4"))
    merged4 = lateral4 + np_upsample_nearest(lateral5, 7, 9)
    np.testing.assert_allclose(out["P4"], np_conv2d_same(merged4, *weights("fpn_output4")), rtol=1e-4, atol=1e-4)
    p5 = np_conv2d_same(lateral5, *weights("fpn_output5"))
    np.testing.assert_allclose(out["P5"], p5, rtol=1e-4, atol=1e-4)
    # P6: max pool with kernel 1 and stride 2 is subsampling of P5.
    np.testing.assert_allclose(out["P6"], p5[:, ::2, ::2], rtol=1e-4, atol=1e-4)


def test_fpn_gradient():
    rng = np.random.default_rng(3)
    c4 = tf.constant(rng.normal(size=(1, 3, 3, 2)), tf.float64)
    c5 = tf.constant(rng.normal(size=(1, 2, 2, 2)), tf.float64)
    fpn = FPN(channels=2, input_levels=("C4", "C5"), extra_pool_level=False)

    def p4(a, b):
        return fpn({"C4": tf.cast(a, tf.float32), "C5": tf.cast(b, tf.float32)})["P4"]

    theoretical, numerical = tf.test.compute_gradient(p4, [c4, c5])
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, atol=2e-2)


def test_fpn_in_functional_model_tf_function_and_config_round_trip(tmp_path):
    backbone = TinyBackbone()
    inputs = keras.Input((None, None, 3))
    fpn = FPN(channels=16, name="fpn")
    model = keras.Model(inputs, fpn(backbone(inputs)))
    x = np.random.default_rng(4).uniform(0, 255, (1, 45, 61, 3)).astype(np.float32)
    eager = model(x)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def run(images):
        return model(images)

    traced = run(x)
    for name in eager:
        np.testing.assert_allclose(traced[name].numpy(), eager[name].numpy(), rtol=1e-5, atol=1e-5)

    clone = FPN.from_config(fpn.get_config())
    assert clone.get_config() == fpn.get_config()
    features = backbone(x)
    clone(features)
    clone.set_weights(fpn.get_weights())
    for name, value in clone(features).items():
        np.testing.assert_allclose(value.numpy(), eager[name].numpy(), rtol=1e-5, atol=1e-5)

    path = tmp_path / "fpn_model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for name, value in loaded(x).items():
        np.testing.assert_allclose(value.numpy(), eager[name].numpy(), rtol=1e-5, atol=1e-5)


def test_fpn_rejects_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="channels"):
        FPN(channels=0)
    with pytest.raises(ValueError, match="consecutive"):
        FPN(input_levels=("C2", "C4"))
    with pytest.raises(ValueError, match="input_levels"):
        FPN(input_levels=("res2", "res3"))
    fpn = FPN(channels=4)
    features = random_features(np.random.default_rng(5), {"C2": (8, 8), "C3": (4, 4), "C4": (2, 2)}, (3, 3, 3))
    with pytest.raises(ValueError, match="C5"):
        fpn(features)
    with pytest.raises(TypeError, match="dict"):
        fpn([features["C2"]])


def test_backbone_and_fpn_export_to_saved_model(tmp_path):
    backbone = TinyBackbone()
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, FPN(channels=8, name="fpn")(backbone(inputs)))
    x = np.random.default_rng(6).uniform(0, 255, (1, 53, 41, 3)).astype(np.float32)
    expected = model(x)
    export_dir = str(tmp_path / "saved_model")
    model.export(export_dir, format="tf_saved_model", verbose=False)
    restored = tf.saved_model.load(export_dir)
    got = restored.serve(tf.constant(x))
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_allclose(got[name].numpy(), expected[name].numpy(), rtol=1e-5, atol=1e-5)


def test_fpn_respects_mixed_precision_policy():
    x = np.random.default_rng(7).uniform(0, 255, (1, 40, 40, 3)).astype(np.float32)
    reference_backbone, reference_fpn = TinyBackbone(), FPN(channels=8)
    reference = reference_fpn(reference_backbone(x))
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        backbone, fpn = TinyBackbone(), FPN(channels=8)
        backbone.set_weights(reference_backbone.get_weights())
        fpn(backbone(x))
        fpn.set_weights(reference_fpn.get_weights())
        out = fpn(backbone(x))
    finally:
        keras.config.set_dtype_policy(previous)
    for name, value in out.items():
        assert value.dtype == tf.float16, name
        np.testing.assert_allclose(value.numpy().astype(np.float32), reference[name].numpy(), rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- RefineDet TCBs

def np_deconv_2x2_stride2(x, kernel, bias):
    """Transposed conv, kernel 2, stride 2, no padding: out[2i+a, 2j+b, o] = sum_c x[i, j, c] K[a, b, o, c]."""
    b, h, w, _ = x.shape
    out = np.zeros((b, 2 * h, 2 * w, kernel.shape[2]))
    for a in range(2):
        for c in range(2):
            out[:, a::2, c::2, :] = x.astype(np.float64) @ kernel[a, c].T.astype(np.float64)
    return out + bias


def test_transfer_connection_blocks_match_numpy_on_odd_sizes():
    rng = np.random.default_rng(8)
    # Three ARM levels; 5x7 under 3x4 under 2x2 are the rounded-up sizes of stride-2 layers.
    features = random_features(rng, {"a": (5, 7), "b": (3, 4), "c": (2, 2)}, (3, 5, 4), batch=2)
    tcb = TransferConnectionBlocks(("a", "b", "c"), channels=6)
    tcb(features)
    for layer in tcb.first_convs + tcb.second_convs + tcb.output_convs + tcb.upsamplers:
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel, rng.normal(0, 0.3, bias.shape)])
    out = {k: v.numpy() for k, v in tcb(features).items()}
    assert list(out) == ["P3", "P4", "P5"]

    def w(name):
        layers = tcb.first_convs + tcb.second_convs + tcb.output_convs + tcb.upsamplers
        return [layer for layer in layers if layer.name == name][0].get_weights()

    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    t5 = relu(np_conv2d_same(relu(np_conv2d_same(features["c"], *w("tl5_1"))), *w("tl5_2")))
    p5 = relu(np_conv2d_same(t5, *w("p5")))
    t4 = np_conv2d_same(relu(np_conv2d_same(features["b"], *w("tl4_1"))), *w("tl4_2"))
    up5 = np_deconv_2x2_stride2(p5, *w("p5_up"))[:, :3, :4]
    p4 = relu(np_conv2d_same(relu(t4 + up5), *w("p4")))
    t3 = np_conv2d_same(relu(np_conv2d_same(features["a"], *w("tl3_1"))), *w("tl3_2"))
    up4 = np_deconv_2x2_stride2(p4, *w("p4_up"))[:, :5, :7]
    p3 = relu(np_conv2d_same(relu(t3 + up4), *w("p3")))
    for name, expected in (("P5", p5), ("P4", p4), ("P3", p3)):
        np.testing.assert_allclose(out[name], expected, rtol=1e-4, atol=1e-4, err_msg=name)


def test_transfer_connection_blocks_gradient_and_config():
    rng = np.random.default_rng(9)
    tcb = TransferConnectionBlocks(("x", "y"), output_names=("odm1", "odm2"), channels=2)
    low = tf.constant(rng.normal(size=(1, 3, 3, 2)), tf.float64)
    high = tf.constant(rng.normal(size=(1, 2, 2, 2)), tf.float64)

    def shallow(a, b):
        return tcb({"x": tf.cast(a, tf.float32), "y": tf.cast(b, tf.float32)})["odm1"]

    theoretical, numerical = tf.test.compute_gradient(shallow, [low, high])
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, atol=2e-2)
    clone = TransferConnectionBlocks.from_config(tcb.get_config())
    assert clone.get_config() == tcb.get_config()
    inputs = {"x": tf.cast(low, tf.float32), "y": tf.cast(high, tf.float32)}
    clone(inputs)
    clone.set_weights(tcb.get_weights())
    np.testing.assert_allclose(clone(inputs)["odm2"].numpy(), tcb(inputs)["odm2"].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="output_names"):
        TransferConnectionBlocks(("x", "y"), output_names=("only_one",))
    with pytest.raises(ValueError, match="lacks"):
        tcb({"x": inputs["x"]})


def test_refinedet_vgg_backbone_with_l2_norm_and_tcbs():
    from kerasdet.backbones import get
    from kerasdet.layers.normalization import L2Normalization

    backbone = get("vgg16_refinedet")
    inputs = keras.Input((None, None, 3))
    arm = dict(backbone(inputs))
    arm["conv4_3"] = L2Normalization(10.0, name="conv4_3_norm")(arm["conv4_3"])
    arm["conv5_3"] = L2Normalization(8.0, name="conv5_3_norm")(arm["conv5_3"])
    odm = TransferConnectionBlocks(("conv4_3", "conv5_3", "fc7", "conv6_2"), channels=32)(arm)
    model = keras.Model(inputs, odm)
    specs = model.compute_output_spec(keras.KerasTensor((1, 320, 320, 3)))
    assert {k: tuple(v.shape) for k, v in specs.items()} == {
        "P3": (1, 40, 40, 32), "P4": (1, 20, 20, 32), "P5": (1, 10, 10, 32), "P6": (1, 5, 5, 32)}
    out = model(np.zeros((1, 72, 88, 3), np.float32))   # not a multiple of 64: cropping kicks in
    for name, stride in zip(("P3", "P4", "P5", "P6"), (8, 16, 32, 64)):
        assert tuple(out[name].shape[1:3]) == (-(-72 // stride), -(-88 // stride)), name


def test_refinedet_resnet101_res6_feeds_the_tcbs():
    from kerasdet.backbones import ResNet

    # RefineDet with ResNet-101: C3, C4, C5 and the extra res6 (512 channels) at strides 8..64.
    backbone = ResNet(101, extra_res6=True)
    assert backbone.strides == {"C2": 4, "C3": 8, "C4": 16, "C5": 32, "C6": 64}
    res6 = [w for w in backbone.weights if w.path.startswith("res6_")]
    # res6 bottleneck: 1x1 2048->128, 3x3 128->128, 1x1 128->512, projection 2048->512, BN gamma/beta.
    expected = 2048 * 128 + 9 * 128 * 128 + 128 * 512 + 2048 * 512 + 2 * (128 + 128 + 512 + 512)
    assert sum(int(np.prod(w.shape)) for w in res6 if "moving" not in w.path) == expected
    inputs = keras.Input((None, None, 3))
    arm = backbone(inputs)
    odm = TransferConnectionBlocks(("C3", "C4", "C5", "C6"), channels=16)(arm)
    specs = keras.Model(inputs, odm).compute_output_spec(keras.KerasTensor((1, 320, 320, 3)))
    assert {k: tuple(v.shape) for k, v in specs.items()} == {
        "P3": (1, 40, 40, 16), "P4": (1, 20, 20, 16), "P5": (1, 10, 10, 16), "P6": (1, 5, 5, 16)}
    assert tuple(arm["C6"].shape) == (None, None, None, 512)
