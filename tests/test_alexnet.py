"""AlexNet backbones (torchvision / caffe / tiny variants) and the torchvision AlexNet converter.

The parity reference runs torchvision in its own process (tests/torch_refs/alexnet.py; torchvision
cannot be imported after TensorFlow). LRN and grouped convolutions are checked against numpy written
from the formulas.
"""
import os

import keras
import numpy as np
import pytest

import kerasdet.backbones as backbones
from kerasdet.backbones.alexnet import AlexNet, pool5_size
from kerasdet.converters import core
from kerasdet.converters.alexnet import convert_alexnet


def _assert_close_to_scale(got, want, tol=1e-4):
    """Max abs error below tol times the reference's magnitude (random-init outputs are ~1e-2)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    scale = float(np.abs(want).max())
    assert scale > 0
    err = float(np.abs(got - want).max())
    assert err <= tol * scale, f"max error {err:.3g} vs reference scale {scale:.3g}"


@pytest.fixture(scope="module")
def reference(torch_reference):
    out = torch_reference("alexnet", 227)
    state = core.read_torch_checkpoint(os.path.join(out, "model.pth"))
    return state, dict(np.load(os.path.join(out, "outputs.npz")))


# -- shapes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,size,widths", [
    ("torchvision", 227, (64, 192, 384, 256, 256)),
    ("torchvision", 224, (64, 192, 384, 256, 256)),
    ("caffe", 227, (96, 256, 384, 384, 256)),
])
def test_full_size_variants_give_6x6x256_pool5_and_4096_fc(variant, size, widths):
    net = AlexNet(variant=variant, input_shape=(size, size, 3), num_classes=21)
    assert [net.get_layer(f"conv{i}").filters for i in range(1, 6)] == list(widths)
    shapes = {k: tuple(v.shape) for k, v in net.output.items()}
    assert shapes == {"pool5": (None, 6, 6, 256), "fc6": (None, 4096), "fc7": (None, 4096), "logits": (None, 21)}
    assert net.strides == {"pool5": 32}
    assert pool5_size(variant, size) == 6


def test_caffe_variant_has_lrn_and_two_groups_where_the_2012_net_has_them():
    net = AlexNet(variant="caffe", include_top=False)
    assert [net.get_layer(f"conv{i}").groups for i in range(1, 6)] == [1, 2, 1, 2, 2]
    names = [layer.name for layer in net.layers]
    assert names.index("norm1") < names.index("pool1") and names.index("norm2") < names.index("pool2")
    caffenet = AlexNet(variant="caffe", include_top=False, pool_before_lrn=True)
    names = [layer.name for layer in caffenet.layers]
    assert names.index("pool1") < names.index("norm1")
    norm = net.get_layer("norm1")
    assert (norm.size, norm.alpha, norm.beta, norm.k) == (5, 1e-4, 0.75, 1.0)
    # The kernel holds in/groups input channels per output: [5, 5, 48, 256] for conv2.
    assert tuple(net.get_layer("conv2").kernel.shape) == (5, 5, 48, 256)


def test_tiny_builds_at_64_runs_a_dynamic_batch_and_is_registered():
    net = backbones.get("alexnet_tiny", num_classes=4)
    assert tuple(net.input.shape) == (None, 64, 64, 3)
    for batch in (1, 3):
        out = net(np.random.rand(batch, 64, 64, 3).astype("float32") * 255)
        assert tuple(out["pool5"].shape) == (batch, 3, 3, 32)
        assert tuple(out["fc7"].shape) == (batch, 128)
        assert tuple(out["logits"].shape) == (batch, 4)
    assert net.strides == {"pool5": 16}
    assert {"alexnet", "alexnet_caffe", "alexnet_tiny"} <= set(backbones.list_names())
    rebuilt = AlexNet.from_config(net.get_config())
    assert rebuilt.count_params() == net.count_params()


def test_tiny_saves_and_loads_as_a_keras_file(tmp_path):
    net = AlexNet(variant="tiny", num_classes=3)
    path = tmp_path / "alexnet_tiny.keras"
    net.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, AlexNet) and loaded.variant == "tiny" and loaded.strides == net.strides
    x = np.random.rand(2, 64, 64, 3).astype("float32")
    np.testing.assert_array_equal(np.asarray(loaded(x)["logits"]), np.asarray(net(x)["logits"]))


def test_include_top_rejects_sizes_whose_pool5_is_not_6x6():
    with pytest.raises(ValueError, match="6x6 pool5.*adaptive"):
        AlexNet(variant="torchvision", input_shape=(256, 256, 3))
    with pytest.raises(ValueError, match="fixed input size"):
        AlexNet(variant="caffe", input_shape=(None, None, 3))
    headless = AlexNet(variant="torchvision", include_top=False, input_shape=(None, None, 3))
    assert tuple(headless(np.zeros((1, 256, 256, 3), "float32"))["pool5"].shape) == (1, 7, 7, 256)


def test_layers_follow_the_dtype_policy():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        net = AlexNet(variant="caffe", input_shape=(227, 227, 3), num_classes=5)
        out = net(np.random.rand(1, 227, 227, 3).astype("float32") * 255)
        assert out["pool5"].dtype == "float16" and out["logits"].dtype == "float16"
        assert net.get_layer("conv1").kernel.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


# -- LRN and groups against numpy ----------------------------------------------------------------

def _numpy_lrn(a, size, alpha, beta, k):
    """Krizhevsky et al. sec. 3.3 in Caffe's convention: alpha is divided by the window size."""
    channels = a.shape[-1]
    out = np.empty_like(a, dtype=np.float64)
    half = size // 2
    for c in range(channels):
        lo, hi = max(0, c - half), min(channels, c + half + 1)
        scale = k + alpha / size * np.sum(a[..., lo:hi].astype(np.float64) ** 2, axis=-1)
        out[..., c] = a[..., c] / scale ** beta
    return out


def test_caffe_lrn_matches_the_formula_with_alpha_divided_by_size():
    net = AlexNet(variant="caffe", include_top=False)
    lrn = net.get_layer("norm1")
    rng = np.random.default_rng(0)
    # Magnitudes like conv1 activations (tens to hundreds), where the normalization is far from 1.
    a = (rng.random((2, 5, 5, 96)) * 300).astype("float32")
    want = _numpy_lrn(a, 5, 1e-4, 0.75, 1.0)
    np.testing.assert_allclose(np.asarray(lrn(a)), want, rtol=1e-5)
    # Not dividing alpha would be visibly different on these inputs.
    wrong = _numpy_lrn(a, 5, 5e-4, 0.75, 1.0)
    assert np.abs(wrong - want).max() > 1e-2 * np.abs(want).max()


def test_grouped_conv_is_two_half_convolutions_concatenated():
    net = AlexNet(variant="caffe", include_top=False)
    conv4 = net.get_layer("conv4")  # 384 -> 384, 3x3, 2 groups
    rng = np.random.default_rng(1)
    conv4.kernel.assign(rng.normal(size=conv4.kernel.shape).astype("float32") * 0.05)
    conv4.bias.assign(rng.normal(size=conv4.bias.shape).astype("float32"))
    x = rng.normal(size=(1, 4, 5, 384)).astype("float32")
    got = np.asarray(conv4(x))
    kernel, bias = np.asarray(conv4.kernel), np.asarray(conv4.bias)  # [3, 3, 192, 384]
    # The padding is the separate conv4_pad layer, so conv4 itself is a "valid" 3x3: 4x5 -> 2x3.
    want_parts = []
    for g in range(2):
        xs = x[..., 192 * g:192 * (g + 1)]
        ks = kernel[..., 192 * g:192 * (g + 1)]  # this group's outputs see only its input half
        y = np.zeros((1, 2, 3, 192))
        for i in range(3):
            for j in range(3):
                y += np.einsum("bhwc,co->bhwo", xs[:, i:i + 2, j:j + 3], ks[i, j])
        want_parts.append(y + bias[192 * g:192 * (g + 1)])
    want = np.maximum(np.concatenate(want_parts, axis=-1), 0)  # conv4 carries its ReLU
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Keras runs grouped convs through XLA on CPU; R-CNN fine-tuning needs their gradients too.
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(conv4(x))
    grads = tape.gradient(loss, [conv4.kernel, conv4.bias])
    assert all(g is not None and float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads)


# -- torchvision parity --------------------------------------------------------------------------

def test_converted_torchvision_alexnet_gives_torchvision_pool5_fc7_and_logits(reference):
    state, ref = reference
    net = convert_alexnet(state, input_normalization=None, dropout=0.0)
    out = net(ref["input"], training=False)
    _assert_close_to_scale(out["pool5"], ref["pool5"])
    _assert_close_to_scale(out["fc7"], ref["fc7"])
    _assert_close_to_scale(out["logits"], ref["logits"])


def test_fc6_input_axis_is_permuted_from_torch_chw_to_keras_hwc(reference):
    state, _ = reference
    net = convert_alexnet(state, input_normalization=None)
    kernel = np.asarray(net.get_layer("fc6").kernel)  # [6 * 6 * 256 (h, w, c), 4096]
    weight = state["classifier.1.weight"]  # [4096, 256 * 6 * 6 (c, h, w)]
    for h, w, c in ((0, 0, 0), (0, 1, 0), (5, 2, 17), (3, 4, 255)):
        np.testing.assert_array_equal(kernel[(h * 6 + w) * 256 + c], weight[:, c * 36 + h * 6 + w])


def test_headless_conversion_ignores_the_classifier(reference):
    state, ref = reference
    net = convert_alexnet(state, include_top=False, input_normalization=None)
    assert set(net.output) == {"pool5"}
    _assert_close_to_scale(net(ref["input"])["pool5"], ref["pool5"])


def test_a_checkpoint_that_does_not_fit_names_the_keys():
    rng = np.random.default_rng(0)
    shapes = {"features.0": (64, 3, 11, 11), "features.3": (192, 64, 5, 5), "features.6": (384, 192, 3, 3),
              "features.8": (256, 384, 3, 3), "features.10": (256, 256, 3, 3), "classifier.1": (4096, 9216),
              "classifier.4": (4096, 4096), "classifier.6": (1000, 4096)}
    state = {}
    for module, shape in shapes.items():
        state[f"{module}.weight"] = rng.normal(size=shape).astype("float32") * 0.01
        state[f"{module}.bias"] = np.zeros(shape[0], "float32")
    broken = dict(state)
    broken.pop("features.8.bias")
    broken["features.3.weight"] = broken["features.3.weight"][:, :32]
    with pytest.raises(core.ConversionError, match="features.8.bias") as error:
        convert_alexnet(broken)
    assert "features.3.weight" in str(error.value)
    # A 2012-width fc6 (e.g. from a differently sized pool5) is reported, not silently reshaped.
    broken = dict(state, **{"classifier.1.weight": state["classifier.1.weight"][:, :4096]})
    with pytest.raises(core.ConversionError, match="classifier.1.weight"):
        convert_alexnet(broken)
    with pytest.raises(ValueError, match="caffe variant has no converter"):
        convert_alexnet(state, variant="caffe")
