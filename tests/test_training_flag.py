"""Every part of every detector family sees ``training=True`` in a training step.

Detector.train_step calls the model's parts directly (not through ``model(..., training=True)``),
so Keras' call context does not carry the flag: each part must pass it on. When the FPN, the RPN
head and the mask head did not, their 1x1 and 3x3 convolutions took the inference path in training
(TensorFlow's convolution gradients instead of the matrix-product / Winograd ones)."""
import numpy as np
import pytest
import tensorflow as tf

from detector_checks import check_training_reaches_every_layer
from learning import tiny_fpn_settings


def _batch(masks=False):
    batch = {"images": tf.random.uniform([2, 64, 64, 3], 0, 255, seed=3),
             "bounding_boxes": {"boxes": tf.constant([[[4.0, 6.0, 30.0, 40.0], [0, 0, 0, 0]],
                                                      [[10.0, 12.0, 58.0, 50.0],
                                                       [30.0, 2.0, 60.0, 20.0]]]),
                                "labels": tf.constant([[0, -1], [2, 1]], tf.int32)}}
    if masks:
        batch["masks"] = tf.constant(np.ones([2, 2, 28, 28], np.float32))
    return batch


def _faster():
    from kerasdet.models.faster_rcnn import FasterRCNN
    return FasterRCNN(3, **tiny_fpn_settings())


def _mask():
    from kerasdet.models.mask_rcnn import MaskRCNN
    return MaskRCNN(3, mask_channels=16, mask_rois_per_image=8, **tiny_fpn_settings())


def _cascade_mask():
    from kerasdet.models.cascade_rcnn import CascadeRCNN
    return CascadeRCNN(3, mode="cascade", with_masks=True, mask_channels=16,
                       mask_rois_per_image=8, **tiny_fpn_settings())


def _cascade_integral():
    from kerasdet.models.cascade_rcnn import CascadeRCNN
    return CascadeRCNN(3, mode="integral", **tiny_fpn_settings())


def _rfcn():
    from kerasdet.models.rfcn import RFCN
    return RFCN(3, backbone="tiny_dcn", anchor_strides=(8,), pool_size=3, head_channels=32,
                backbone_config=dict(deformable_stages=(), output_stride=8,
                                     channels=(16, 32, 64, 96, 128)),
                anchor_sizes=((16, 32, 64),), seed=0)


def _deformable_faster():
    from kerasdet.models.deformable import DeformableFasterRCNN
    return DeformableFasterRCNN(3, **dict(tiny_fpn_settings(), backbone="tiny_dcn",
                                          backbone_config=dict(deformable_stages=(4, 5))))


def _ccnet():
    from kerasdet.models.ccnet import CCNet
    return CCNet(3, **tiny_fpn_settings())


def _refinedet():
    from kerasdet.models.refinedet import RefineDet
    return RefineDet(3, backbone="tiny", tcb_channels=32, max_detections=100, seed=0)


@pytest.mark.parametrize("build, masks, expected", [
    (_faster, False, {"fpn", "rpn", "fpn_lateral2", "fpn_output2", "conv", "objectness"}),
    (_mask, True, {"fpn", "mask_head", "mask_fcn1"}),
    (_cascade_mask, True, {"fpn", "mask_fcn1"}),
    (_cascade_integral, False, {"fpn", "box_predictor"}),
    (_rfcn, False, {"rpn"}),
    (_deformable_faster, False, {"fpn", "rpn"}),
    (_ccnet, False, {"fpn", "fpn_lateral2"}),
    (_refinedet, False, set()),
], ids=["faster_rcnn", "mask_rcnn", "cascade_mask_rcnn", "cascade_integral", "rfcn",
                              "deformable_faster_rcnn", "ccnet",
                              "refinedet"])
def test_every_layer_of_a_training_step_gets_training_true(build, masks, expected):
    checked = check_training_reaches_every_layer(build(), _batch(masks))
    assert expected <= set(checked), expected - set(checked)
