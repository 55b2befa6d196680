"""torchvision AlexNet checkpoints (``torchvision.models.alexnet`` state-dict layout) -> `kerasdet.backbones.AlexNet`.

torchvision keys: ``features.{0, 3, 6, 8, 10}.weight / bias`` (conv1..conv5), ``classifier.1`` (fc6,
4096 x 9216, reading pool5 flattened channel-major as [256, 6, 6]), ``classifier.4`` (fc7, 4096 x
4096), ``classifier.6`` (fc8, num_classes x 4096). Keras flattens the channels-last pool5 as
[6, 6, 256], so fc6's input axis is permuted, not just transposed.

Only the "torchvision" variant converts: torchvision's AlexNet is the 2014 "one weird trick" network
(64/192/384/256/256 channels, no LRN, no groups), not the 2012 / R-CNN net of the "caffe" variant,
whose Caffe checkpoint is not available offline (so there is no converter for it).
The checkpoint expects RGB normalized by the ImageNet mean / std: ``input_normalization="torchvision"``
(the variant's default).
"""

from kerasdet.converters import core

__all__ = ["convert_alexnet", "alexnet_key_map", "TORCHVISION_INDEX"]

# Module index of each weighted layer inside torchvision's `features` / `classifier` Sequentials.
TORCHVISION_INDEX = {"conv1": "features.0", "conv2": "features.3", "conv3": "features.6", "conv4": "features.8",
                     "conv5": "features.10", "fc6": "classifier.1", "fc7": "classifier.4", "fc8": "classifier.6"}


def _fc6_kernel_for(channels, height, width):
    def transform(weight):
        if weight.ndim != 2 or weight.shape[1] != channels * height * width:
            return weight  # let `core.assign` report the shape mismatch with the key's name
        out = weight.shape[0]
        return weight.reshape(out, channels, height, width).transpose(0, 2, 3, 1).reshape(out, -1).T
    return transform


def alexnet_key_map(backbone, prefix=""):
    """{torch key: core.Target} for every weight of a torchvision-variant `AlexNet` ``backbone``."""
    if backbone.variant != "torchvision":
        raise ValueError(f"alexnet_key_map: only the 'torchvision' variant has torchvision's layout, "
                         f"got variant {backbone.variant!r}")
    key_map = {}
    for name, module in TORCHVISION_INDEX.items():
        if name.startswith("fc") and not backbone.include_top:
            continue
        layer = backbone.get_layer(name)
        if name == "fc6":
            _, height, width, channels = backbone.get_layer("pool5").output.shape
            transform = _fc6_kernel_for(channels, height, width)
        elif name.startswith("fc"):
            transform = core.dense_kernel
        else:
            transform = core.conv_kernel
        key_map[f"{prefix}{module}.weight"] = core.Target(layer.kernel, transform)
        key_map[f"{prefix}{module}.bias"] = core.Target(layer.bias)
    return key_map


def convert_alexnet(state_dict_or_path, include_top=True, **backbone_kwargs):
    """Builds a torchvision-variant `AlexNet` and fills it from a torchvision AlexNet checkpoint.

    Args:
        state_dict_or_path: {key: numpy array} or a `.pth` file (read with
            `core.read_torch_checkpoint`, which needs torch).
        include_top: keep fc6, fc7, fc8 (their keys are ignored when False).
        **backbone_kwargs: the other `AlexNet` arguments (num_classes, input_shape,
            input_normalization, dropout, ...); ``variant`` is always "torchvision".

    Returns the backbone. Raises `core.ConversionError` naming every missing, unexpected or
    mis-shaped key, before any weight is written.
    """
    from kerasdet.backbones.alexnet import AlexNet

    variant = backbone_kwargs.pop("variant", "torchvision")
    if variant != "torchvision":
        raise ValueError(f"convert_alexnet: torchvision checkpoints fit only variant='torchvision' "
                         f"(64/192/384/256/256 channels), not {variant!r}; the caffe variant has no converter")
    state_dict, source = core.state_dict_and_source(state_dict_or_path)
    backbone = AlexNet(variant="torchvision", include_top=include_top, **backbone_kwargs)
    ignore = [] if include_top else ["classifier."]
    core.assign(alexnet_key_map(backbone), state_dict, source=source, ignore=ignore)
    return backbone
