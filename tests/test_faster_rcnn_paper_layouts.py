"""Faster R-CNN as in its paper (Ren et al. 2015): the single map is a choice (`feature`), with zoo
entries on VGG-16 conv5_3 and on ZF conv5, and cross-boundary anchors ignored in training
(`rpn_ignore_cross_boundary`)."""
import numpy as np
import pytest
import tensorflow as tf

from kerasdet import ops, zoo
from kerasdet.heads import rpn as rpn_module
from kerasdet.heads.box_head import TwoFCHead
from kerasdet.models.faster_rcnn import FasterRCNN


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERASDET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KERASDET_WEIGHTS", raising=False)


def _conv(k, c_in, c_out):
    return k * k * c_in * c_out + c_out


def _dense(n_in, n_out):
    return n_in * n_out + n_out


# VGG-16 configuration D: 13 3x3 convs, conv1_1 .. conv5_3.
VGG16_CONVS = (_conv(3, 3, 64) + _conv(3, 64, 64) + _conv(3, 64, 128) + _conv(3, 128, 128)
               + _conv(3, 128, 256) + 2 * _conv(3, 256, 256) + _conv(3, 256, 512)
               + 2 * _conv(3, 512, 512) + 3 * _conv(3, 512, 512))
# ZF-5: conv1 96 7x7, conv2 256 5x5, conv3 / conv4 384 3x3, conv5 256 3x3 (LRN has no weights).
ZF_CONVS = (_conv(7, 3, 96) + _conv(5, 96, 256) + _conv(3, 256, 384) + _conv(3, 384, 384)
            + _conv(3, 384, 256))


def _expected_params(trunk, channels, rpn_width, pooled, classes=20, anchors=9, fc=4096):
    """trunk + RPN (3x3 conv to `rpn_width`, one objectness logit and 4 deltas per anchor) +
    fc6 on the pooled x pooled x channels RoI, fc7, and the predictor (K + 1 scores, 4 K deltas)."""
    rpn = _conv(3, channels, rpn_width) + _conv(1, rpn_width, anchors) \
        + _conv(1, rpn_width, 4 * anchors)
    head = _dense(pooled * pooled * channels, fc) + _dense(fc, fc)
    predictor = _dense(fc, classes + 1) + _dense(fc, 4 * classes)
    return trunk + rpn + head + predictor


@pytest.mark.parametrize("name, feature, rpn_width, pooled, expected", [
    # 14,714,688 + 2,382,893 + 119,545,856 + 413,797
    ("faster_rcnn_vgg16", "conv5_3", 512, 7, 137_057_234),
    # 3,726,464 + 601,645 + 54,534,144 + 413,797
    ("faster_rcnn_zf", "conv5", 256, 6, 59_276_050),
])
def test_paper_entries_build_with_their_map_rpn_width_and_pooling(name, feature, rpn_width,
                                                                   pooled, expected):
    trunk, channels = (VGG16_CONVS, 512) if name.endswith("vgg16") else (ZF_CONVS, 256)
    assert VGG16_CONVS == 14_714_688 and ZF_CONVS == 3_726_464
    assert _expected_params(trunk, channels, rpn_width, pooled) == expected
    model = zoo.build(name)
    assert isinstance(model, FasterRCNN) and not model.use_fpn
    assert model.feature == feature and model.backbone.strides[feature] == 16
    assert model.backbone.output[feature].shape[-1] == channels
    assert model.rpn_channels == rpn_width and model.rpn_head.conv.kernel.shape[-1] == rpn_width
    assert model.roi_output_size == pooled and model.roi_strides == (16,)
    assert model.roi_config.pooling == "roi_pool"
    assert isinstance(model.box_head, TwoFCHead) and model.box_head.fc_dim == 4096
    assert model.box_head.fcs[0].kernel.shape == (pooled * pooled * channels, 4096)
    assert model.anchor_sizes == ((128, 256, 512),) and model.anchor_strides == (16,)
    assert model.anchor_generator.num_anchors_per_location == [9]
    assert model.count_params() == expected
    # The paper's proposal settings: NMS 0.7, 2000 proposals to train the detector on, 300 at
    # test (its Table 2); cross-boundary anchors ignored in training.
    r = model.rpn_config
    assert (r.nms_iou, r.post_nms_top_k_train, r.post_nms_top_k_test) == (0.7, 2000, 300)
    assert r.ignore_cross_boundary is True
    info = zoo.info(name)
    assert info["dataset"] == "voc" and info["weights"] is None and info["metrics"] == {}
    # no detector weights; the VGG-16 entry starts from its ImageNet backbone (issue 17), ZF random
    assert info["status"].startswith("random weights") or (
        info["status"].startswith("backbone pretrained") and "detection layers random" in info["status"])
    assert info["input"] == {"min_size": 600, "max_size": 1000, "stride": 16}
    recipe = info["recipe"]
    assert (recipe["learning_rate"], recipe["steps"], recipe["decay_steps"],
            recipe["momentum"], recipe["weight_decay"], recipe["batch_size"]) == \
        (0.001, 80000, [60000], 0.9, 0.0005, 1)


def test_feature_must_name_a_backbone_output():
    with pytest.raises(ValueError, match="conv6"):
        FasterRCNN(3, backbone="zf", fpn=False, feature="conv6")


def _iou(anchors, boxes):
    """numpy IoU [A, M] in float64."""
    a, b = anchors[:, None, :], boxes[None, :, :]
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return w * h / (area_a + area_b - w * h)


def _reference_rpn_labels(anchors, gt_boxes, height, width, ignore_cross_boundary):
    """The Faster R-CNN anchor labels in numpy: 1 at IoU >= 0.7 or the best anchor of a ground
    truth (ties included), 0 below 0.3, -1 otherwise; with `ignore_cross_boundary`, anchors with
    x1 < 0, y1 < 0, x2 > W or y2 > H are -1 and take no part in the best-anchor rule."""
    iou = _iou(anchors.astype(np.float64), gt_boxes.astype(np.float64))
    best = iou.max(axis=1)
    labels = np.full(len(anchors), -1)
    labels[best < 0.3] = 0
    labels[best >= 0.7] = 1
    inside = np.ones(len(anchors), bool)
    if ignore_cross_boundary:
        inside = ((anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] <= width)
                  & (anchors[:, 3] <= height))
    candidates = np.where(inside[:, None], iou, -1.0)
    for m in range(gt_boxes.shape[0]):
        top = candidates[:, m].max()
        if top > 0:
            labels[np.abs(candidates[:, m] - top) < 1e-6] = 1
    labels[~inside] = -1
    return labels, inside


def test_cross_boundary_anchors_are_ignored_only_with_the_option():
    # Two padded images of different valid sizes, paper anchors at stride 16.
    shapes = np.array([[304, 400], [256, 336]], np.float32)
    generator = ops.AnchorGenerator((16,), ((128, 256, 512),), (0.5, 1.0, 2.0))
    anchors = tf.concat(generator([tf.constant([19, 25])]), 0)  # the padded 304 x 400 batch
    rng = np.random.default_rng(7)
    gt = []
    for h, w in shapes:  # two boxes per image at random (non-symmetric) places
        xy = rng.uniform([5, 5], [w / 2, h / 2], size=(2, 2))
        wh = rng.uniform(60, 180, size=(2, 2))
        gt.append(np.concatenate([xy, np.minimum(xy + wh, [w - 1, h - 1])], -1))
    gt = np.stack(gt).astype(np.float32)
    labels_gt = np.zeros([2, 2], np.int32)
    count = int(anchors.shape[0])
    out = {}
    for flag in (False, True):
        # Every anchor sampled (num_samples = A, no positive cap): the labels are the matcher's.
        labels, _ = rpn_module.rpn_targets(anchors, tf.constant(gt), tf.constant(labels_gt),
                                           tf.constant(shapes), num_samples=count,
                                           positive_fraction=1.0, ignore_cross_boundary=flag,
                                           seed=0)
        out[flag] = labels.numpy()
    a = anchors.numpy()
    crossing = 0
    for b, (h, w) in enumerate(shapes):
        for flag in (False, True):
            want, inside = _reference_rpn_labels(a, gt[b], h, w, flag)
            np.testing.assert_array_equal(out[flag][b], want)
        crossing += int((~inside).sum())
        # The option only turns crossing anchors to -1 (and may promote the best inside anchor).
        changed = out[True][b] != out[False][b]
        assert np.all(out[True][b][~inside] == -1)
        assert np.any(out[False][b][~inside] >= 0)
        assert np.all(~changed | ~inside | (out[True][b] == 1))
    assert crossing > count // 2  # most large anchors cross the border of small images


def _zf_batch():
    images = tf.random.uniform([2, 256, 320, 3], 0, 255, seed=3)
    boxes = tf.constant([[[40, 30, 200, 180], [150, 100, 300, 240]],
                         [[10, 20, 130, 150], [0, 0, 0, 0]]], tf.float32)
    return {"images": images,
            "bounding_boxes": {"boxes": boxes, "labels": tf.constant([[3, 7], [12, -1]])},
            "image_info": tf.constant([[256, 320, 1, 1, 256, 320], [224, 300, 1, 1, 224, 300]],
                                      tf.float32)}


def test_zf_entry_trains_a_step_with_cross_boundary_anchors_ignored(monkeypatch):
    seen = []
    original = rpn_module.rpn_targets

    def recording(*args, **kwargs):
        labels, targets = original(*args, **kwargs)
        seen.append((kwargs.get("ignore_cross_boundary"), args[0], labels))
        return labels, targets

    monkeypatch.setattr(rpn_module, "rpn_targets", recording)
    model = zoo.build("faster_rcnn_zf", fc_dim=512, rpn_post_nms_top_k_train=300)
    batch = _zf_batch()
    # Eager first: the labels the RPN loss used leave every crossing anchor out.
    model.compute_detection_losses(batch, training=True)
    flag, anchors, labels = seen[-1]
    assert flag is True
    inside = ops.anchors_inside_image_mask(anchors, tf.constant([[256, 320], [224, 300]]))
    labels, inside = labels.numpy(), inside.numpy()
    assert np.all(labels[~inside] == -1) and np.any(labels[inside] == 1)
    assert (~inside).sum() > 0
    model.compile(optimizer="sgd")
    logs = model.train_on_batch(batch, return_dict=True)
    assert all(np.isfinite(v) for v in logs.values()), logs
    assert logs["rpn_cls"] > 0.0 and logs["roi_cls"] > 0.0
