"""R-FCN: position-sensitive head math against numpy, model plumbing, and that it learns."""
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.heads.psroi_head import PSRoIHead, average_vote
from kerasdet.models.rfcn import RFCN
from detector_checks import check_predict_on_mixed_sizes, check_train_step_without_objects
from learning import fit_and_evaluate, tiny_fpn_settings


def tiny_rfcn_settings(**overrides):
    """A test-sized R-FCN: the tiny DCN trunk without deformable convs, dilated as R-FCN's trunk
    but to output stride 8 (C3..C5 at stride 8: the synthetic objects are 16-64 pixels), RPN on
    C4, PS maps on C5, k = 7, PS-RoIAlign."""
    settings = dict(backbone="tiny_dcn",
                    backbone_config=dict(deformable_stages=(), output_stride=8,
                                         channels=(16, 32, 64, 96, 128)),
                    anchor_strides=(8,),
                    pool_size=7, ps_pooling="ps_roi_align", head_channels=128,
                    anchor_sizes=((16, 32, 64),), rpn_batch_size=128, roi_batch_size=128,
                    rpn_pre_nms_top_k_train=500, rpn_post_nms_top_k_train=300,
                    rpn_pre_nms_top_k_test=300, rpn_post_nms_top_k_test=100, seed=0)
    settings.update(overrides)
    return settings


def tiny_rfcn_fpn_settings():
    """The learning-test configuration. Measured (4 epochs, lr 0.02): the paper's single-map
    layout on the from-scratch tiny trunk (stride 16 or 8, mean or sum voting) stays at mAP@0.5
    ~0, and so does the same layout with Faster R-CNN's 2fc head (0.08): the toy trunk alone is too
    weak. The PS maps are therefore computed from FPN's P2 (stride 4), and votes are summed (the
    paper's eq. 2): with the mean, each score map gets 1/k^2 of the gradient and the head learned
    ~50x slower in an isolated check."""
    settings = tiny_fpn_settings()
    settings.pop("fc_dim")
    settings.update(fpn=True, feature_level="P2", pool_size=7, ps_pooling="ps_roi_align",
                    head_channels=128, voting="sum")
    return settings


def test_rfcn_learns_the_synthetic_shapes(synthetic_data):
    model = RFCN(3, **tiny_rfcn_fpn_settings())
    history, results, seconds = fit_and_evaluate(model, synthetic_data, epochs=10)
    losses = history["loss"]
    print(f"R-FCN tiny (FPN P2, k=7, PS-RoIAlign, sum voting): mAP@0.5 {results['voc']['mAP']:.3f} after {seconds:.0f}s, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.6 * losses[0]
    assert results["voc"]["mAP"] >= 0.5


# -- the position-sensitive head against a numpy reference ----------------------------------------

def _rfcn_bins(lo, hi, k, scale, size):
    """R-FCN's pixel bins along one axis (its Caffe PSROIPooling layer, kerasdet.ops.ps_roi_pool's
    default): corners rounded in image pixels, then scaled, inclusive end; float32 steps."""
    f32 = np.float32
    start = f32(np.sign(lo) * np.floor(abs(float(lo)) + 0.5)) * f32(scale)
    end = f32(np.sign(hi) * np.floor(abs(float(hi)) + 0.5) + 1.0) * f32(scale)
    size_bin = f32(max(f32(end - start), f32(0.1)) / f32(k))
    return [(int(np.clip(np.floor(f32(f32(i) * size_bin) + start), 0, size)),
             int(np.clip(np.ceil(f32(f32(i + 1) * size_bin) + start), 0, size))) for i in range(k)]


def numpy_ps_roi_pool_vote(maps, box, k, out_channels, spatial_scale):
    """R-FCN eq. (1)-(2) from the paper's definition: bin (i, j) of class c averages the pixels of
    map (c * k + i) * k + j inside the bin (integer bins, R-FCN's rounding), then the score of c
    is the mean of its k * k bins."""
    height, width, _ = maps.shape
    x1, y1, x2, y2 = np.asarray(box, np.float32)
    rows = _rfcn_bins(y1, y2, k, spatial_scale, height)
    cols = _rfcn_bins(x1, x2, k, spatial_scale, width)
    scores = np.zeros(out_channels)
    for c in range(out_channels):
        total = 0.0
        for i, (y_lo, y_hi) in enumerate(rows):
            for j, (x_lo, x_hi) in enumerate(cols):
                region = maps[y_lo:y_hi, x_lo:x_hi, (c * k + i) * k + j]
                total += region.mean() if region.size else 0.0
        scores[c] = total / (k * k)
    return scores


def _head_reading_fixed_maps(num_classes, k, stride, pooling="ps_roi_pool"):
    """A PSRoIHead whose 1x1 convs copy fixed input channels: the first k^2 (C+1) channels are the
    class maps, the last 4 k^2 the box maps."""
    cls_ch, box_ch = k * k * (num_classes + 1), 4 * k * k
    head = PSRoIHead(num_classes, pool_size=k, stride=stride, head_channels=0, pooling=pooling)
    head.build((None, None, None, cls_ch + box_ch))
    eye = np.eye(cls_ch + box_ch, dtype=np.float32)
    head.cls_conv.set_weights([eye[:, :cls_ch][None, None], np.zeros(cls_ch, np.float32)])
    head.box_conv.set_weights([eye[:, cls_ch:][None, None], np.zeros(box_ch, np.float32)])
    return head, cls_ch


def test_average_voting_matches_numpy_on_a_fixed_score_map():
    num_classes, k, stride = 2, 3, 4
    head, cls_ch = _head_reading_fixed_maps(num_classes, k, stride)
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(2, 10, 12, cls_ch + 4 * k * k)).astype(np.float32)
    rois = np.array([[[0, 0, 47, 39], [5.2, 7.9, 30.4, 22.0], [20, 4, 26, 9]],
                     [[8, 8, 40, 36], [0, 0, 12, 12], [44, 30, 47, 39]]], np.float32)
    logits, deltas = head(tf.constant(maps), tf.constant(rois))
    assert logits.shape == (2, 3, num_classes + 1) and deltas.shape == (2, 3, 1, 4)
    for b in range(2):
        for r in range(3):
            want_cls = numpy_ps_roi_pool_vote(maps[b, ..., :cls_ch], rois[b, r], k,
                                              num_classes + 1, 1.0 / stride)
            want_box = numpy_ps_roi_pool_vote(maps[b, ..., cls_ch:], rois[b, r], k, 4, 1.0 / stride)
            np.testing.assert_allclose(logits[b, r], want_cls, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(deltas[b, r, 0], want_box, rtol=1e-5, atol=1e-5)


def test_average_vote_is_the_mean_over_the_bins():
    pooled = np.random.default_rng(1).normal(size=(2, 5, 7, 7, 4)).astype(np.float32)
    np.testing.assert_allclose(average_vote(tf.constant(pooled)), pooled.mean(axis=(2, 3)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["ps_roi_pool", "ps_roi_align"])
def test_head_gradient_matches_finite_differences(pooling):
    num_classes, k, stride = 1, 2, 2
    head, cls_ch = _head_reading_fixed_maps(num_classes, k, stride, pooling)
    rng = np.random.default_rng(2)
    maps = tf.constant(rng.normal(size=(1, 5, 6, cls_ch + 4 * k * k)).astype(np.float32))
    rois = tf.constant([[[1.0, 1.5, 9.0, 8.0], [3.0, 0.0, 11.0, 9.0]]])
    probe = tf.constant(rng.normal(size=(1, 2, num_classes + 1 + 4)).astype(np.float32))

    def scalar(x):
        logits, deltas = head(x, rois)
        return tf.reduce_sum(tf.concat([logits, deltas[:, :, 0]], -1) * probe)

    theoretical, numerical = tf.test.compute_gradient(scalar, [maps], delta=1e-2)
    assert np.abs(theoretical[0]).max() > 0
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=2e-3)


def test_head_rejects_bad_arguments():
    with pytest.raises(ValueError, match="pooling"):
        PSRoIHead(3, pooling="roi_align")
    with pytest.raises(ValueError, match="pool_size"):
        PSRoIHead(3, pool_size=0)
    head = PSRoIHead(1, pool_size=2, head_channels=0)
    with pytest.raises(ValueError, match="rois"):
        head(tf.zeros([1, 4, 4, 8]), tf.zeros([1, 4]))


# -- model plumbing ---------------------------------------------------------------------------------

def test_outputs_are_class_logits_and_class_agnostic_deltas():
    model = RFCN(3, **tiny_rfcn_settings(head_channels=0))
    images = tf.random.uniform([2, 64, 96, 3], 0, 255)
    rpn_features, head_features = model.features(images)
    rois = tf.constant([[[0, 0, 30, 30], [10, 5, 60, 40]]] * 2, tf.float32)
    logits, deltas = model.box_branch(head_features, rois)
    assert logits.shape == (2, 2, 4) and deltas.shape == (2, 2, 1, 4)
    # No per-RoI learnable layers: every weight of the PS head is in its convs (and the offset fc
    # of the deformable pooling, which this model does not use).
    assert {w.path.split("/")[-2] for w in model.ps_head.weights} == {"cls_maps", "box_maps"}
    assert model.ps_head.cls_conv.filters == 7 * 7 * 4 and model.ps_head.box_conv.filters == 4 * 49


def test_predict_on_mixed_sizes_and_empty_images():
    check_predict_on_mixed_sizes(RFCN(3, **tiny_rfcn_settings()))


def test_train_step_handles_a_batch_without_objects():
    check_train_step_without_objects(RFCN(3, **tiny_rfcn_settings()))


def test_plain_tiny_backbone_on_c4_and_ps_roi_pool():
    model = RFCN(2, backbone="tiny", feature_level="C4", rpn_level="C4", pool_size=3,
                 ps_pooling="ps_roi_pool", head_channels=32, anchor_sizes=((32, 64),),
                 rpn_pre_nms_top_k_test=50, rpn_post_nms_top_k_test=20)
    out = model.predict_on_batch(np.zeros([1, 64, 64, 3], np.float32))
    assert out["scores"].shape == (1, 100)


def test_config_round_trip_rebuilds_the_same_model():
    model = RFCN(3, **tiny_rfcn_settings())
    model.build()
    config = model.get_config()
    assert config["ps_pooling"] == "ps_roi_align" and config["fpn"] is False
    assert "box_head" not in config and "fc_dim" not in config
    clone = RFCN.from_config(config)
    clone.build()
    assert clone.count_params() == model.count_params()
    assert clone.get_config() == config


def test_bad_configurations_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="box_head"):
        RFCN(3, backbone="tiny", box_head="res5")
    with pytest.raises(ValueError, match="fpn=True"):
        RFCN(3, backbone="tiny", fpn=True, feature_level="C5")
    with pytest.raises(ValueError, match="feature_level"):
        RFCN(3, backbone="tiny", feature_level="P5")
    with pytest.raises(ValueError, match="same stride"):
        RFCN(3, backbone="tiny", feature_level="C5")  # tiny's C5 is at stride 32, C4 at 16
    with pytest.raises(ValueError, match="ps_pooling"):
        RFCN(3, backbone="tiny", ps_pooling="roi_align")


def test_keras_file_round_trip_keeps_every_weight(tmp_path):
    import keras

    model = RFCN(3, **tiny_rfcn_settings(ps_pooling="deform_ps_roi_pool"))
    model.build()
    path = str(tmp_path / "rfcn.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    import json

    # The file stores JSON, so tuples in the config come back as lists.
    assert isinstance(loaded, RFCN)
    assert loaded.get_config() == json.loads(json.dumps(model.get_config()))
    want = {v.path: np.asarray(v) for v in model.weights}
    got = {v.path: np.asarray(v) for v in loaded.weights}
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value)


def test_resnet101_rfcn_parameter_count_matches_the_paper_architecture():
    # torchvision resnet101 without fc: 42,500,160 parameters (BN statistics are buffers there);
    # RPN on res4 (1024 ch): 3x3 conv to 512 + objectness (9) + boxes (36); R-FCN head: 1x1 conv
    # 2048 -> 1024, k^2 (C + 1) score maps and 4 k^2 box maps, k = 7, C = 20 (VOC).
    k, classes = 7, 20
    rpn = (9 * 1024 * 512 + 512) + (512 * 9 + 9) + (512 * 36 + 36)
    head = (2048 * 1024 + 1024) + (1024 + 1) * k * k * (classes + 1) + (1024 + 1) * 4 * k * k
    expected = 42_500_160 + rpn + head
    model = RFCN(classes, backbone_config={"freeze_at": 0})
    model.build((1, 64, 64, 3))
    bn_stats = sum(int(np.prod(v.shape)) for v in model.weights
                   if "moving_mean" in v.path or "moving_variance" in v.path)
    assert model.count_params() - bn_stats == expected
    assert model.backbone.strides["C5"] == 16
