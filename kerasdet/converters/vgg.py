"""torchvision VGG-16 checkpoints (``torchvision.models.vgg16`` state-dict layout) -> `kerasdet.backbones.VGG16`.

torchvision keys: ``features.{i}.weight / bias`` for the 13 convs (i = 0, 2, 5, 7, 10, 12, 14, 17,
19, 21, 24, 26, 28 -> conv1_1 .. conv5_3), ``classifier.0`` (fc6, 4096 x 25088, reading pool5
flattened channel-major as [512, 7, 7]), ``classifier.3`` (fc7, 4096 x 4096) and ``classifier.6``
(fc8).

The reduced variants (SSD / RefineDet, `vgg16_reduced` / `vgg16_refinedet`) turn fc6 / fc7 into
convolutions subsampled from the fully connected weights (DeepLab-LargeFOV, SSD sec. 3, RefineDet
sec. 4 "Backbone Network"): fc6's 4096 x 512 x 7 x 7 becomes conv_fc6's 1024 x 512 x 3 x 3 by taking
every 4th output and every 3rd spatial tap (rows / columns 0, 3, 6; the dilated 3x3 conv then
spans the 7x7 window), fc7 becomes the 1x1 conv_fc7 by every 4th row and column. conv6_1 / conv6_2
are new layers and keep their initialization; fc8 is not used.

torchvision's VGG-16 takes RGB images normalized by the ImageNet mean / std, so the converted
backbone is built with ``input_normalization="torchvision"`` (the default here).
"""

import numpy as np

from kerasdet.converters import core

__all__ = ["convert_vgg16", "vgg16_key_map", "decimate_fc6", "decimate_fc7", "TORCHVISION_CONV_INDEX"]

TORCHVISION_CONV_INDEX = {
    "conv1_1": 0, "conv1_2": 2, "conv2_1": 5, "conv2_2": 7, "conv3_1": 10, "conv3_2": 12,
    "conv3_3": 14, "conv4_1": 17, "conv4_2": 19, "conv4_3": 21, "conv5_1": 24, "conv5_2": 26,
    "conv5_3": 28,
}
# Decimation steps: every 4th of the 4096 units (-> 1024), every 3rd of the 7 spatial taps (-> 3).
UNIT_STEP, TAP_STEP = 4, 3


def decimate_fc6(weight):
    """fc6 weight [4096, 25088] (or [4096, 512, 7, 7]) -> conv weight [1024, 512, 3, 3]."""
    weight = np.asarray(weight).reshape(-1, 512, 7, 7)
    return weight[::UNIT_STEP, :, ::TAP_STEP, ::TAP_STEP]


def decimate_fc7(weight):
    """fc7 weight [4096, 4096] -> 1x1 conv weight [1024, 1024, 1, 1]."""
    weight = np.asarray(weight)[::UNIT_STEP, ::UNIT_STEP]
    return weight[:, :, np.newaxis, np.newaxis]


def _decimate_bias(bias):
    return np.asarray(bias)[::UNIT_STEP]


def _fc6_kernel(weight):
    """fc6 [4096, 512 * 7 * 7] (input channel-major) -> Keras Dense kernel [7 * 7 * 512, 4096]."""
    return weight.reshape(-1, 512, 7, 7).transpose(0, 2, 3, 1).reshape(weight.shape[0], -1).T


def vgg16_key_map(backbone, prefix=""):
    """{torch key: core.Target} for every VGG-16 weight of ``backbone`` (a `VGG16`).

    Plain VGG-16: the 13 convs, plus fc6 / fc7 / fc8 with ``include_top``. Reduced: the 13 convs and
    conv_fc6 / conv_fc7 from the decimated fc6 / fc7 (conv6_1 / conv6_2 have no source).
    """
    key_map = {}
    for name, index in TORCHVISION_CONV_INDEX.items():
        layer = backbone.get_layer(name)
        key_map[f"{prefix}features.{index}.weight"] = core.Target(layer.kernel, core.conv_kernel)
        key_map[f"{prefix}features.{index}.bias"] = core.Target(layer.bias)
    if backbone.reduced:
        fc6, fc7 = backbone.get_layer("conv_fc6"), backbone.get_layer("conv_fc7")
        key_map[f"{prefix}classifier.0.weight"] = core.Target(
            fc6.kernel, lambda w: core.conv_kernel(decimate_fc6(w)))
        key_map[f"{prefix}classifier.0.bias"] = core.Target(fc6.bias, _decimate_bias)
        key_map[f"{prefix}classifier.3.weight"] = core.Target(
            fc7.kernel, lambda w: core.conv_kernel(decimate_fc7(w)))
        key_map[f"{prefix}classifier.3.bias"] = core.Target(fc7.bias, _decimate_bias)
    elif backbone.include_top:
        for name, index in (("fc6", 0), ("fc7", 3), ("fc8", 6)):
            layer = backbone.get_layer(name)
            # torchvision flattens pool5 channel-major ([512, 7, 7]); Keras' Flatten of the
            # channels-last map is [7, 7, 512]: fc6's input axis is reordered.
            transform = _fc6_kernel if name == "fc6" else core.dense_kernel
            key_map[f"{prefix}classifier.{index}.weight"] = core.Target(layer.kernel, transform)
            key_map[f"{prefix}classifier.{index}.bias"] = core.Target(layer.bias)
    return key_map


def convert_vgg16(state_dict_or_path, reduced_style="refinedet", input_normalization="torchvision",
                  **backbone_kwargs):
    """Builds a VGG-16 backbone and fills it from a torchvision VGG-16 checkpoint.

    Args:
        state_dict_or_path: {key: numpy array} or a `.pth` file (read with
            `core.read_torch_checkpoint`, which needs torch).
        reduced_style: "refinedet" (`vgg16_refinedet`), "ssd" (`vgg16_reduced`) or None for the
            plain network (convs only; pass include_top=True for fc6..fc8).
        input_normalization: "torchvision" (what the checkpoint was trained with), or None to feed
            already normalized inputs.
        **backbone_kwargs: other `VGG16` arguments (input_shape, freeze_blocks, ...).

    Returns the backbone. Raises `core.ConversionError` naming every missing, unexpected or
    mis-shaped key before any weight is written.
    """
    from kerasdet.backbones.vgg import VGG16

    state_dict, source = core.state_dict_and_source(state_dict_or_path)
    reduced = reduced_style is not None
    backbone = VGG16(reduced=reduced, reduced_style=reduced_style or "ssd",
                     input_normalization=input_normalization, **backbone_kwargs)
    ignore = []
    if reduced:
        ignore.append("classifier.6.")
    elif not backbone.include_top:
        ignore.append("classifier.")
    core.assign(vgg16_key_map(backbone), state_dict, source=source, ignore=ignore)
    return backbone
