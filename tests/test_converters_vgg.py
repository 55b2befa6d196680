"""torchvision VGG-16 -> kerasdet VGG-16 (plain and RefineDet's reduced variant with the fc6 / fc7
decimation), checked against a random-weight torchvision VGG-16 run in its own process
(tests/torch_refs/vgg16.py; torchvision cannot be imported after TensorFlow)."""
import os

import numpy as np
import pytest

from kerasdet.converters import core
from kerasdet.converters.vgg import convert_vgg16, decimate_fc6, decimate_fc7


@pytest.fixture(scope="module")
def reference(torch_reference):
    out = torch_reference("vgg16")
    state = core.read_torch_checkpoint(os.path.join(out, "model.pth"))
    return state, dict(np.load(os.path.join(out, "outputs.npz")))


def test_refinedet_backbone_convs_equal_torchvision_and_fc_layers_are_the_decimated_slices(reference):
    state, ref = reference
    backbone = convert_vgg16(state, reduced_style="refinedet", input_normalization=None)
    out = backbone(ref["input"])
    for name in ("conv4_3", "conv5_3"):
        np.testing.assert_allclose(np.asarray(out[name]), ref[name], rtol=1e-4, atol=1e-4)
    # Slices written out index by index: outputs 0, 4, ..., 4092; taps 0, 3, 6 of the 7x7 window.
    fc6 = state["classifier.0.weight"].reshape(4096, 512, 7, 7)
    units, taps = np.arange(0, 4096, 4), np.array([0, 3, 6])
    want6 = fc6[units][:, :, taps][:, :, :, taps]  # [1024, 512, 3, 3]
    np.testing.assert_array_equal(decimate_fc6(state["classifier.0.weight"]), want6)
    kernel6 = np.asarray(backbone.get_layer("conv_fc6").kernel)  # [kh, kw, in, out]
    assert kernel6.shape == (3, 3, 512, 1024)
    for (i, j) in ((0, 0), (1, 2), (2, 1)):
        np.testing.assert_array_equal(kernel6[i, j], want6[:, :, i, j].T)
    np.testing.assert_array_equal(np.asarray(backbone.get_layer("conv_fc6").bias),
                                  state["classifier.0.bias"][units])
    want7 = state["classifier.3.weight"][units][:, units]
    np.testing.assert_array_equal(decimate_fc7(state["classifier.3.weight"])[:, :, 0, 0], want7)
    np.testing.assert_array_equal(np.asarray(backbone.get_layer("conv_fc7").kernel)[0, 0], want7.T)
    np.testing.assert_array_equal(np.asarray(backbone.get_layer("conv_fc7").bias),
                                  state["classifier.3.bias"][units])
    assert backbone.strides == {"conv4_3": 8, "conv5_3": 16, "fc7": 32, "conv6_2": 64}


def test_plain_vgg16_with_top_gives_torchvision_logits(reference):
    state, ref = reference
    backbone = convert_vgg16(state, reduced_style=None, include_top=True, dropout=0.0,
                             input_shape=(224, 224, 3), input_normalization=None)
    logits = np.asarray(backbone(ref["input"], training=False)["logits"])
    np.testing.assert_allclose(logits, ref["logits"], rtol=1e-3, atol=1e-4)


def test_a_checkpoint_that_does_not_fit_is_rejected_before_writing(reference):
    state, _ = reference
    broken = dict(state)
    broken.pop("features.28.bias")
    broken["classifier.3.weight"] = broken["classifier.3.weight"][:100]
    with pytest.raises(core.ConversionError, match="features.28.bias.*classifier.3.weight"):
        convert_vgg16(broken, reduced_style="refinedet")
