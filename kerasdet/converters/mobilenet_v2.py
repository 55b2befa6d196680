"""torchvision MobileNetV2 checkpoints -> `kerasdet.backbones.MobileNetV2`.

The key rule (see `kerasdet.backbones.mobilenet_v2` for the layout): a Keras layer named e.g.
``features_2_conv_1_0`` holds torchvision's module ``features.2.conv.1.0``, i.e. the layer name with
"_" replaced by ".", since no segment of a torchvision MobileNetV2 module path contains "_". Per
layer type:
  Conv2D           <- {module}.weight   (core.conv_kernel: [out, in, kh, kw] -> [kh, kw, in, out])
  DepthwiseConv2D  <- {module}.weight   (core.depthwise_kernel: [C, 1, kh, kw] -> [kh, kw, C, 1])
  BatchNorm        <- {module}.weight / bias / running_mean / running_var
                      -> gamma / beta / moving_mean / moving_variance
  Dense            <- {module}.weight (core.dense_kernel: [out, in] -> [in, out]) and {module}.bias
``num_batches_tracked`` has no Keras counterpart and is ignored.
"""

import keras

from kerasdet.converters import core

__all__ = ["convert_mobilenet_v2", "mobilenet_v2_key_map"]

_BN_PARAMS = (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
              ("running_var", "moving_variance"))


def mobilenet_v2_key_map(backbone, prefix=""):
    """{torch key: core.Target} for every weight of a `MobileNetV2` ``backbone``.

    ``prefix`` is prepended to every torch key (a detector's checkpoint nests the backbone, e.g.
    "backbone.body."). The classifier's keys appear only when the backbone has its top.
    Raises ValueError for a layer with weights of a type this rule does not know, so a layer added
    to the backbone later cannot silently stay unconverted.
    """
    key_map = {}
    for layer in backbone.layers:
        if not layer.weights:
            continue
        module = prefix + layer.name.replace("_", ".")
        # Order matters: DepthwiseConv2D is not a Conv2D subclass in Keras 3, FrozenBatchNormalization
        # is a BatchNormalization subclass.
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            targets = {"weight": core.Target(layer.kernel, core.depthwise_kernel)}
            if layer.use_bias:
                targets["bias"] = core.Target(layer.bias)
        elif isinstance(layer, keras.layers.Conv2D):
            targets = {"weight": core.Target(layer.kernel, core.conv_kernel)}
            if layer.use_bias:
                targets["bias"] = core.Target(layer.bias)
        elif isinstance(layer, keras.layers.BatchNormalization):
            targets = {torch_name: core.Target(getattr(layer, keras_name)) for torch_name, keras_name in _BN_PARAMS}
        elif isinstance(layer, keras.layers.Dense):
            targets = {"weight": core.Target(layer.kernel, core.dense_kernel), "bias": core.Target(layer.bias)}
        else:
            raise ValueError(f"mobilenet_v2_key_map: layer {layer.name!r} of type {type(layer).__name__} has "
                             "weights but no torchvision counterpart rule")
        for param, target in targets.items():
            key_map[f"{module}.{param}"] = target
    mapped = {id(target.variable) for target in key_map.values()}
    unmapped = [w.path for w in backbone.weights if id(w) not in mapped]
    if unmapped:
        raise ValueError(f"mobilenet_v2_key_map: weights without a torch key: {unmapped}")
    return key_map


def _is_num_batches_tracked(key):
    return key.endswith(".num_batches_tracked")


def convert_mobilenet_v2(state_dict_or_path, include_top=True, **backbone_kwargs):
    """Builds a `MobileNetV2` and fills it from a torchvision MobileNetV2 checkpoint.

    Args:
        state_dict_or_path: {key: numpy array} or the path of a `.pth` file (read with
            `core.read_torch_checkpoint`, which needs torch).
        include_top: keep the classifier (its keys are ignored when False).
        **backbone_kwargs: the other `MobileNetV2` arguments (frozen_bn, freeze_at, input_shape,
            input_normalization, ...).

    Returns the backbone. Raises `core.ConversionError` naming every missing, unexpected or
    mis-shaped key, before any weight is written.
    """
    from kerasdet.backbones.mobilenet_v2 import MobileNetV2

    state_dict, source = core.state_dict_and_source(state_dict_or_path)
    backbone = MobileNetV2(include_top=include_top, **backbone_kwargs)
    ignore = [_is_num_batches_tracked]
    if not include_top:
        ignore.append("classifier.")
    core.assign(mobilenet_v2_key_map(backbone), state_dict, source=source, ignore=ignore)
    return backbone
