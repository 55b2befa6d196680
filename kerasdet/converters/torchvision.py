"""torchvision checkpoints -> kerasdet models: ResNet-50/101 (ImageNet) and the Faster / Mask R-CNN
ResNet-50-FPN detectors (COCO).

Key rules (torchvision key -> kerasdet weight), all 1:1:
  ResNet: module path with "." -> "_" is the Keras layer name (see kerasdet/backbones/resnet.py);
      inside a detector the keys carry the prefix "backbone.body.".
  FPN: backbone.fpn.inner_blocks.{i}.0 -> fpn_lateral{i+2}; backbone.fpn.layer_blocks.{i}.0 ->
      fpn_output{i+2} (P6 is a parameter-free max pool on both sides).
  RPN: rpn.head.conv.0.0 -> rpn/conv; rpn.head.cls_logits -> rpn/objectness; rpn.head.bbox_pred ->
      rpn/box. Both sides order anchors aspect-ratio-major per location and deltas (dx, dy, dw, dh)
      per anchor, so no channel permutation is needed.
  Box head: roi_heads.box_head.fc6 / fc7 -> box_head/fc6 / fc7. fc6 reads the pooled RoI flattened
      channels-first (C, 7, 7) in PyTorch and channels-last (7, 7, C) here, so its input rows are
      permuted.
  Box predictor: roi_heads.box_predictor.cls_score -> box_predictor/cls_score (K + 1 logits, index
      0 = background on both sides); bbox_pred holds 4 deltas for each of the K + 1 classes, kerasdet
      has none for the background: its first 4 rows are dropped.
  Mask head: roi_heads.mask_head.{i}.0 -> mask_head/mask_fcn{i+1}; mask_predictor.conv5_mask ->
      mask_head/deconv; mask_predictor.mask_fcn_logits (K + 1 channels) -> mask_head/mask_logits
      (K channels: the background channel is dropped).
Older checkpoints (the published COCO ones, torchvision < 0.13) name some modules differently
(`inner_blocks.0.weight`, `rpn.head.conv.weight`, `mask_head.mask_fcn1.weight`);
`normalize_keys` rewrites them to the current names first.

Conventions the checkpoints were trained with, set by `detector_config`: anchors centred on the
cells' top-left corners with whole-pixel rounding, RoIAlign without the half-pixel shift and 2x2
samples per bin, RPN min box size 1e-3, box-coder weights (10, 10, 5, 5) for the heads and
(1, 1, 1, 1) for the RPN, log(1000/16) clamp, 1000 proposals at test time. Class k of the converted
model (0-based) is torchvision label k + 1, i.e. COCO category id k + 1 for the COCO checkpoints
(90 classes including the ten unused ids; `kerasdet.zoo.classes.COCO_CATEGORY_NAMES`).
"""
import os
import re

import numpy as np

from kerasdet.converters import core

__all__ = ["ARCHITECTURES", "resnet_key_map", "fpn_detector_key_map", "normalize_keys", "detector_config",
           "build_detector", "convert_detector", "convert_resnet", "IGNORED_KEYS"]

_KERAS_TO_TORCH_PARAM = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias",
                         "moving_mean": "running_mean", "moving_variance": "running_var"}

# Keys with no kerasdet counterpart: BatchNorm's step counter.
IGNORED_KEYS = (lambda key: key.endswith("num_batches_tracked"),)


def _own_weights(layer):
    """The layer's own variables (a DeformConv2D also lists its offset conv's)."""
    return [w for w in layer.weights if w.path.split("/")[-2] == layer.name]


def _layer_targets(layer, module, transform_for=None):
    """{f"{module}.{param}": Target} for one Keras layer holding a PyTorch module's parameters."""
    targets = {}
    for weight in _own_weights(layer):
        param = _KERAS_TO_TORCH_PARAM[weight.name]
        if transform_for is not None:
            transform = transform_for(weight)
        elif len(weight.shape) == 4:
            transform = core.conv_kernel
        elif len(weight.shape) == 2:
            transform = core.dense_kernel
        else:
            transform = core.identity
        targets[f"{module}.{param}"] = core.Target(weight, transform)
    return targets


def resnet_key_map(model, prefix=""):
    """Key map of a kerasdet `ResNet` (or `ResNetConv5Head`) from torchvision ResNet keys.

    Layers without a torchvision counterpart are not in the map and keep their initialization:
    the offset convs of deformable blocks (zero: the net starts as the plain one) and "res6".
    """
    from kerasdet.backbones.resnet import _stage_of_layer

    key_map = {}
    for layer in model.layers:
        if _stage_of_layer(layer.name) is None and layer.name != "fc":
            continue
        key_map.update(_layer_targets(layer, prefix + layer.name.replace("_", ".")))
    return key_map


def _legacy_renames():
    return (
        (re.compile(r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)$"),
         r"backbone.fpn.\1.\2.0.\3"),
        (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), r"rpn.head.conv.0.0.\1"),
        (re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$"),
         lambda m: f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"),
    )


def normalize_keys(state_dict):
    """Renames pre-0.13 torchvision detector keys to the current module names."""
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in _legacy_renames():
            key = pattern.sub(replacement, key)
        renamed[key] = value
    return renamed


def _fc6_transform(channels, size):
    def transform(value):
        out = value.shape[0]
        return value.reshape(out, channels, size, size).transpose(2, 3, 1, 0).reshape(size * size * channels, out)
    return transform


def _drop_background_rows(per_class):
    """Drops the background's entries along the output axis (first `per_class` rows)."""
    def transform(value):
        return value[per_class:].T if value.ndim == 2 else value[per_class:]
    return transform


def _drop_background_channel(value):
    if value.ndim == 4:  # 1x1 conv [K + 1, C, 1, 1]
        return core.conv_kernel(value[1:])
    return value[1:]


def fpn_detector_key_map(model):
    """Key map of a kerasdet FasterRCNN / MaskRCNN (ResNet + FPN, 2fc head) from torchvision keys."""
    if not getattr(model, "use_fpn", False) or model.box_head_kind != "2fc":
        raise ValueError("fpn_detector_key_map: the model must be an FPN detector with the 2fc box head "
                         f"(torchvision's layout), got fpn={getattr(model, 'use_fpn', None)}, "
                         f"box_head={getattr(model, 'box_head_kind', None)!r}")
    key_map = resnet_key_map(model.backbone, prefix="backbone.body.")
    fpn = model.neck
    for i, (lateral, output) in enumerate(zip(fpn.lateral_convs, fpn.output_convs)):
        key_map.update(_layer_targets(lateral, f"backbone.fpn.inner_blocks.{i}.0"))
        key_map.update(_layer_targets(output, f"backbone.fpn.layer_blocks.{i}.0"))
    rpn = model.rpn_head
    key_map.update(_layer_targets(rpn.conv, "rpn.head.conv.0.0"))
    key_map.update(_layer_targets(rpn.objectness, "rpn.head.cls_logits"))
    key_map.update(_layer_targets(rpn.box, "rpn.head.bbox_pred"))
    head = model.box_head
    if head.num_fcs != 2 or any(r is not None for r in getattr(head, "ranks", ()) or ()):
        raise ValueError("fpn_detector_key_map: torchvision's box head has exactly two full fc layers")
    fc6 = _fc6_transform(model.fpn_channels, model.roi_output_size)
    key_map.update(_layer_targets(head.fcs[0], "roi_heads.box_head.fc6",
                                  lambda w: fc6 if w.name == "kernel" else core.identity))
    key_map.update(_layer_targets(head.fcs[1], "roi_heads.box_head.fc7"))
    predictor = model.box_predictor
    if predictor.class_agnostic:
        raise ValueError("fpn_detector_key_map: torchvision's box predictor is class-specific")
    key_map.update(_layer_targets(predictor.cls, "roi_heads.box_predictor.cls_score"))
    key_map.update(_layer_targets(predictor.box, "roi_heads.box_predictor.bbox_pred",
                                  lambda w: _drop_background_rows(4)))
    mask_head = getattr(model, "mask_head", None)
    if mask_head is not None:
        for i, conv in enumerate(mask_head.convs):
            key_map.update(_layer_targets(conv, f"roi_heads.mask_head.{i}.0"))
        key_map.update(_layer_targets(mask_head.deconv, "roi_heads.mask_predictor.conv5_mask",
                                      lambda w: core.transposed_conv_kernel if w.name == "kernel"
                                      else core.identity))
        key_map.update(_layer_targets(mask_head.predictor, "roi_heads.mask_predictor.mask_fcn_logits",
                                      lambda w: _drop_background_channel))
    return key_map


# torchvision builder name -> (kerasdet model class path, number of classes of its COCO checkpoint)
ARCHITECTURES = {
    "fasterrcnn_resnet50_fpn": ("kerasdet.models.faster_rcnn:FasterRCNN", 90),
    "maskrcnn_resnet50_fpn": ("kerasdet.models.mask_rcnn:MaskRCNN", 90),
}


def detector_config(arch, num_classes=None):
    """Constructor arguments of the kerasdet model equal to torchvision's ``arch`` (eval settings)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown torchvision detector {arch!r}; supported: {sorted(ARCHITECTURES)}")
    config = dict(
        num_classes=int(num_classes or ARCHITECTURES[arch][1]), backbone="resnet50",
        backbone_config={"frozen_bn": True, "freeze_at": 2}, fpn=True, fpn_channels=256, box_head="2fc",
        fc_dim=1024, anchor_offset=0.0, anchor_rounding=True, rpn_min_size=1e-3,
        rpn_pre_nms_top_k_train=2000, rpn_post_nms_top_k_train=2000,
        rpn_pre_nms_top_k_test=1000, rpn_post_nms_top_k_test=1000, rpn_nms_iou=0.7,
        roi_pooling="roi_align", roi_sampling_ratio=2, roi_aligned=False,
        box_weights=(10.0, 10.0, 5.0, 5.0), score_threshold=0.05, nms_iou=0.5, max_detections=100)
    if arch.startswith("maskrcnn"):
        config.update(mask_sampling_ratio=2)
    return config


def build_detector(arch, num_classes=None, input_size=(64, 64), **overrides):
    """The kerasdet model of torchvision's ``arch``, built (weights created), not yet loaded."""
    import importlib

    config = detector_config(arch, num_classes)  # raises for an unknown arch
    module, _, cls = ARCHITECTURES[arch][0].partition(":")
    config.update(overrides)
    model = getattr(importlib.import_module(module), cls)(**config)
    model.build((1, input_size[0], input_size[1], 3))
    return model


def _state_dict(checkpoint):
    if isinstance(checkpoint, (str, os.PathLike)):
        return core.read_torch_checkpoint(checkpoint), os.path.basename(os.fspath(checkpoint))
    return {k: np.asarray(v) for k, v in checkpoint.items()}, "state dict"


def convert_detector(checkpoint, arch="fasterrcnn_resnet50_fpn", num_classes=None, skip_mismatch=False,
                     **overrides):
    """Reads a torchvision detector checkpoint (a .pth path or a state dict of arrays) into a new
    kerasdet model and returns it.

    ``num_classes`` other than the checkpoint's needs ``skip_mismatch=True``: the class-dependent
    layers (box predictor, mask logits) then keep their initialization, for fine-tuning. Anything else
    that does not fit raises `core.ConversionError` listing the keys, and nothing is loaded.
    """
    state, source = _state_dict(checkpoint)
    model = build_detector(arch, num_classes, **overrides)
    core.assign(fpn_detector_key_map(model), normalize_keys(state), source=source, ignore=IGNORED_KEYS,
                skip_mismatch=skip_mismatch)
    return model


def convert_resnet(checkpoint, depth=50, include_top=True, skip_mismatch=False, **backbone_kwargs):
    """A torchvision ImageNet ResNet checkpoint into a new kerasdet `ResNet` (with its fc when
    ``include_top``; without it the checkpoint's fc.* keys are ignored)."""
    from kerasdet.backbones.resnet import ResNet

    state, source = _state_dict(checkpoint)
    model = ResNet(depth=depth, include_top=include_top, **backbone_kwargs)
    ignore = IGNORED_KEYS + (() if include_top else ("fc.",))
    core.assign(resnet_key_map(model), state, source=source, ignore=ignore, skip_mismatch=skip_mismatch)
    return model
