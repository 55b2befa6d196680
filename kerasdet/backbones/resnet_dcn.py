"""Deformable ConvNets backbones (Dai et al. 2017; Zhu et al. 2019) and R-FCN's dilated ResNet.

Registered names (import-time registration through `kerasdet.backbones.register`):
  "resnet50_dcn", "resnet101_dcn": torchvision-layout ResNet whose 3x3 convs in
      `deformable_stages` (default C3..C5 = layer2..layer4, the DCNv2 setting; (5,) is DCNv1's) are
      `DeformConv2D`; `modulated=True` gives DCN v2 (offsets and a sigmoid modulation mask).
  "resnet50_dilated", "resnet101_dilated": R-FCN's trunk (R-FCN section 3.2 / Deformable ConvNets
      section 4): layer4 (C5) keeps stride 16 — its first block has stride 1 and every 3x3 conv
      of the stage has dilation 2 — so C5 has the stride of C4. `deformable_stages` works here
      too (the DCN R-FCN model uses (5,): deformable dilated res5).
  "tiny_dcn": the test-sized trunk of kerasdet.backbones.tiny with deformable 3x3 convs in chosen
      levels and optionally dilated last levels (`output_stride` 16 or 8), for fast tests of the
      deformable and R-FCN models.

Layer names are those of kerasdet.backbones.resnet (e.g. ``layer4_0_conv2``), so
`load_torchvision_weights` fills the same weights from a torchvision checkpoint; the offset convs
of the deformable layers are extra weights that start at zero (the net starts as the plain one).
"""
import keras

from kerasdet.backbones.base import Backbone, check_input_shape, normalization_layer
from kerasdet.backbones.registry import register
from kerasdet.backbones.resnet import (EXPANSION, STAGE_BLOCKS, STAGE_PLANES, ResNet, _conv,
                                       _conv_initializer, _norm, _stage_of_layer, resnet_stage)
from kerasdet.layers.deform_layers import DeformConv2D

__all__ = ["DilatedResNet", "TinyDCNBackbone", "resnet50_dcn", "resnet101_dcn",
           "resnet50_dilated", "resnet101_dilated"]

DEFAULT_DCN_STAGES = (3, 4, 5)


def _version(modulated):
    return 2 if modulated else 1


def resnet50_dcn(deformable_stages=DEFAULT_DCN_STAGES, modulated=False, **kwargs):
    """ResNet-50 with deformable 3x3 convs in `deformable_stages` (v2 when `modulated`)."""
    kwargs.setdefault("name", "resnet50")
    return ResNet(depth=50, deformable_stages=deformable_stages,
                  deformable_version=_version(modulated), **kwargs)


def resnet101_dcn(deformable_stages=DEFAULT_DCN_STAGES, modulated=False, **kwargs):
    """ResNet-101 with deformable 3x3 convs in `deformable_stages` (v2 when `modulated`)."""
    kwargs.setdefault("name", "resnet101")
    return ResNet(depth=101, deformable_stages=deformable_stages,
                  deformable_version=_version(modulated), **kwargs)


def _dilated_block(x, prefix, planes, downsample, frozen_bn, deformable):
    """A torchvision Bottleneck with stride 1 and dilation 2 on its 3x3 conv (padding 2)."""
    shortcut = x
    y = _conv(x, planes, 1, 1, f"{prefix}_conv1")
    y = _norm(f"{prefix}_bn1", frozen_bn)(y)
    y = keras.layers.ReLU(name=f"{prefix}_relu1")(y)
    if deformable:
        y = DeformConv2D(planes, 3, strides=1, padding=2, dilation_rate=2, use_bias=False,
                         use_mask=deformable == 2, kernel_initializer=_conv_initializer(),
                         name=f"{prefix}_conv2")(y)
    else:
        # Stride 1, dilation 2: "same" pads 2 on every side, as PyTorch's padding=2.
        y = keras.layers.Conv2D(planes, 3, padding="same", dilation_rate=2, use_bias=False,
                                kernel_initializer=_conv_initializer(), name=f"{prefix}_conv2")(y)
    y = _norm(f"{prefix}_bn2", frozen_bn)(y)
    y = keras.layers.ReLU(name=f"{prefix}_relu2")(y)
    y = _conv(y, planes * EXPANSION, 1, 1, f"{prefix}_conv3")
    y = _norm(f"{prefix}_bn3", frozen_bn)(y)
    if downsample:
        shortcut = keras.layers.Conv2D(planes * EXPANSION, 1, use_bias=False,
                                       kernel_initializer=_conv_initializer(),
                                       name=f"{prefix}_downsample_0")(x)
        shortcut = _norm(f"{prefix}_downsample_1", frozen_bn)(shortcut)
    y = keras.layers.Add(name=f"{prefix}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{prefix}_out")(y)


@keras.saving.register_keras_serializable(package="kerasdet")
class DilatedResNet(Backbone):
    """ResNet-50/101 whose C5 stage is dilated (stride 16), as R-FCN and Deformable ConvNets use.

    Outputs "C2".."C5" at strides 4, 8, 16, 16. Args as `kerasdet.backbones.ResNet` (depth,
    frozen_bn, freeze_at, input_shape, input_normalization), plus:
        deformable_stages: levels in 3..5 with deformable 3x3 convs (the DCN R-FCN uses (5,)).
        modulated: DCN v2 (modulation mask) instead of v1.
    """

    def __init__(self, depth=101, frozen_bn=True, freeze_at=2, input_shape=(None, None, 3),
                 input_normalization="torchvision", deformable_stages=(), modulated=False,
                 name=None, **kwargs):
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"DilatedResNet: `depth` must be one of {sorted(STAGE_BLOCKS)}, "
                             f"got {depth!r}")
        if not isinstance(freeze_at, int) or not 0 <= freeze_at <= 5:
            raise ValueError(f"DilatedResNet: `freeze_at` must be an int in [0, 5], got {freeze_at!r}")
        deformable_stages = tuple(sorted(int(k) for k in deformable_stages))
        if any(k not in (3, 4, 5) for k in deformable_stages):
            raise ValueError(f"DilatedResNet: `deformable_stages` must be levels in 3..5, "
                             f"got {deformable_stages}")
        input_shape = check_input_shape(input_shape, "DilatedResNet")
        version = _version(modulated)

        inputs = keras.Input(shape=input_shape, name="images")
        x = inputs
        norm = normalization_layer(input_normalization)
        if norm is not None:
            x = norm(x)
        x = _conv(x, 64, 7, 2, "conv1")
        x = _norm("bn1", frozen_bn)(x)
        x = keras.layers.ReLU(name="relu")(x)
        # Zero padding is exact before this max pool: its input is post-ReLU (see resnet.py).
        x = keras.layers.ZeroPadding2D(1, name="maxpool_pad")(x)
        x = keras.layers.MaxPooling2D(3, strides=2, padding="valid", name="maxpool")(x)
        outputs, strides = {}, {}
        for stage in range(1, 4):
            deformable = version if stage + 1 in deformable_stages else None
            x = resnet_stage(x, stage, STAGE_BLOCKS[depth][stage - 1], 1 if stage == 1 else 2,
                             frozen_bn, deformable=deformable)
            outputs[f"C{stage + 1}"] = x
            strides[f"C{stage + 1}"] = 2 ** (stage + 1)
        deformable = version if 5 in deformable_stages else None
        for i in range(STAGE_BLOCKS[depth][3]):
            x = _dilated_block(x, f"layer4_{i}", STAGE_PLANES[3], i == 0, frozen_bn, deformable)
        outputs["C5"], strides["C5"] = x, 16

        super().__init__(inputs=inputs, outputs=outputs, strides=strides,
                         name=name or f"resnet{depth}", **kwargs)
        self.depth = depth
        self.frozen_bn = bool(frozen_bn)
        self.freeze_at = freeze_at
        self._input_shape_arg = input_shape
        self.input_normalization = input_normalization
        self.deformable_stages = deformable_stages
        self.modulated = bool(modulated)
        self.freeze_stages(_stage_of_layer, freeze_at)

    def get_config(self):
        return {"depth": self.depth, "frozen_bn": self.frozen_bn, "freeze_at": self.freeze_at,
                "input_shape": list(self._input_shape_arg),
                "input_normalization": self.input_normalization,
                "deformable_stages": list(self.deformable_stages), "modulated": self.modulated,
                "name": self.name}


def resnet50_dilated(**kwargs):
    """ResNet-50 with a dilated C5 at stride 16 (keyword arguments as `DilatedResNet`)."""
    return DilatedResNet(depth=50, **kwargs)


def resnet101_dilated(**kwargs):
    """ResNet-101 with a dilated C5 at stride 16 (R-FCN's trunk)."""
    return DilatedResNet(depth=101, **kwargs)


@keras.saving.register_keras_serializable(package="kerasdet")
class TinyDCNBackbone(Backbone):
    """The tiny test backbone (conv 3x3/2 stem, one conv 3x3 + ReLU per level C2..C5) with
    deformable convs in `deformable_stages` and optionally dilated last levels.

    Args:
        channels: 5 channel counts (stem, C2, C3, C4, C5).
        deformable_stages: levels in 3..5 whose conv is a `DeformConv2D`.
        modulated: DCN v2 instead of v1.
        output_stride: 32 (plain), 16 (C5 with stride 1 and dilation 2: R-FCN's dilated res5 at
            toy size) or 8 (C4 dilated 2 and C5 dilated 4, all at stride 8: finer maps for the
            small objects of the synthetic test set).
        input_shape, input_normalization: as `TinyBackbone` (None = inputs scaled by 1/255).
    """

    def __init__(self, channels=(8, 16, 32, 48, 64), deformable_stages=(4, 5), modulated=False,
                 output_stride=32, input_shape=(None, None, 3), input_normalization=None,
                 name=None, **kwargs):
        channels = tuple(int(c) for c in channels)
        if len(channels) != 5 or min(channels) < 1:
            raise ValueError(f"TinyDCNBackbone: `channels` needs 5 positive counts, got {channels}")
        deformable_stages = tuple(sorted(int(k) for k in deformable_stages))
        if any(k not in (3, 4, 5) for k in deformable_stages):
            raise ValueError(f"TinyDCNBackbone: `deformable_stages` must be levels in 3..5, "
                             f"got {deformable_stages}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"TinyDCNBackbone: `output_stride` must be 8, 16 or 32, "
                             f"got {output_stride!r}")
        input_shape = check_input_shape(input_shape, "TinyDCNBackbone")
        inputs = keras.Input(shape=input_shape, name="images")
        norm = normalization_layer(input_normalization)
        x = norm(inputs) if norm is not None else keras.layers.Rescaling(1.0 / 255.0,
                                                                         name="rescale")(inputs)
        outputs, strides = {}, {}
        stride, dilation = 1, 1
        for i, (filters, level) in enumerate(zip(channels, ("stem", "C2", "C3", "C4", "C5"))):
            # Past the output stride, levels keep the resolution and dilate instead (R-FCN / DeepLab).
            step = 2 if stride < output_stride else 1
            if step == 1:
                dilation *= 2
            stride *= step
            lname = level.lower()
            if i >= 2 and i + 1 in deformable_stages:
                x = DeformConv2D(filters, 3, strides=step, padding=dilation, dilation_rate=dilation,
                                 use_mask=bool(modulated), name=f"{lname}_conv")(x)
            else:
                x = keras.layers.ZeroPadding2D(dilation, name=f"{lname}_pad")(x)
                x = keras.layers.Conv2D(filters, 3, strides=step, dilation_rate=dilation,
                                        name=f"{lname}_conv")(x)
            x = keras.layers.ReLU(name=f"{lname}_relu")(x)
            if level != "stem":
                outputs[level], strides[level] = x, stride
        super().__init__(inputs=inputs, outputs=outputs, strides=strides,
                         name=name or "tiny_dcn", **kwargs)
        self.channels = channels
        self.deformable_stages = deformable_stages
        self.modulated = bool(modulated)
        self.output_stride = int(output_stride)
        self._input_shape_arg = input_shape
        self.input_normalization = input_normalization

    def get_config(self):
        return {"channels": list(self.channels), "deformable_stages": list(self.deformable_stages),
                "modulated": self.modulated, "output_stride": self.output_stride,
                "input_shape": list(self._input_shape_arg),
                "input_normalization": self.input_normalization, "name": self.name}


register("resnet50_dcn", resnet50_dcn)
register("resnet101_dcn", resnet101_dcn)
register("resnet50_dilated", resnet50_dilated)
register("resnet101_dilated", resnet101_dilated)
register("tiny_dcn", TinyDCNBackbone)
