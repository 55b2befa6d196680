"""kerasdet.backbones: feature extractors with named outputs and output strides.

    backbone = kerasdet.backbones.get("resnet50", frozen_bn=True, freeze_at=2)
    features = backbone(images)          # {"C2": ..., "C5": ...}
    backbone.strides                     # {"C2": 4, "C3": 8, "C4": 16, "C5": 32}
    kerasdet.backbones.list()            # registered names
"""
from kerasdet.backbones.alexnet import AlexNet, alexnet, alexnet_caffe, alexnet_tiny
from kerasdet.backbones.base import Backbone, ImageNormalization
from kerasdet.backbones.registry import get, list_names, register
from kerasdet.backbones.resnet import (ResNet, ResNetConv5Head, load_torchvision_weights, resnet50, resnet101,
                                      resnet_c4, torchvision_key_to_keras)
from kerasdet.backbones.mobilenet_v2 import MobileNetV2, mobilenet_v2
from kerasdet.backbones.overfeat import OverFeat, overfeat_accurate, overfeat_fast
from kerasdet.backbones.tiny import TinyBackbone
from kerasdet.backbones.vgg import VGG16, vgg16, vgg16_reduced, vgg16_refinedet
from kerasdet.backbones.zf import ZF5

register("resnet50", resnet50)
register("resnet101", resnet101)
register("resnet50_c4", lambda **kw: ResNet(depth=50, include_c5=False, **kw))
register("resnet101_c4", lambda **kw: ResNet(depth=101, include_c5=False, **kw))
register("tiny", TinyBackbone)
register("vgg16", vgg16)
register("vgg16_reduced", vgg16_reduced)
register("vgg16_refinedet", vgg16_refinedet)
register("zf", ZF5)
register("overfeat_fast", overfeat_fast)
register("overfeat_accurate", overfeat_accurate)
register("mobilenet_v2", mobilenet_v2)
register("alexnet", alexnet)
register("alexnet_caffe", alexnet_caffe)
register("alexnet_tiny", alexnet_tiny)

# `list` is the public name the project asked for; inside this package use `list_names`.
list = list_names  # noqa: A001

__all__ = [
    "Backbone", "ImageNormalization", "OverFeat", "ResNet", "ResNetConv5Head", "TinyBackbone", "VGG16", "ZF5",
    "get", "list", "list_names", "overfeat_accurate", "overfeat_fast", "register", "resnet50", "resnet101",
    "resnet_c4", "vgg16", "vgg16_reduced", "vgg16_refinedet", "load_torchvision_weights", "torchvision_key_to_keras",
    "MobileNetV2", "mobilenet_v2", "AlexNet", "alexnet", "alexnet_caffe", "alexnet_tiny",
]
# Importing the module registers the deformable (DCN) and dilated ResNets.
from kerasdet.backbones import resnet_dcn  # noqa: E402,F401
