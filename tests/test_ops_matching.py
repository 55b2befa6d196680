"""kerasdet.ops.matching against hand cases and a loop-based numpy reference."""
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.ops import matching as Mt


def np_match(iou, pos, neg, low, low_quality, gt_valid, anchor_valid=None):
    """Reference written from the rule, one anchor at a time."""
    n, m = iou.shape
    anchor_valid = np.ones(n, bool) if anchor_valid is None else anchor_valid
    valid_cols = [j for j in range(m) if gt_valid[j]]
    labels = np.full(n, -1)
    matched = np.zeros(n, int)
    for i in range(n):
        if not valid_cols:
            labels[i] = 0
            continue
        best_j = max(valid_cols, key=lambda j: (iou[i, j], -j))  # first index on ties
        matched[i] = best_j
        best = iou[i, best_j]
        if best >= pos:
            labels[i] = 1
        elif low <= best < neg:
            labels[i] = 0
    if low_quality:
        for j in valid_cols:
            col = [iou[i, j] for i in range(n) if anchor_valid[i]]
            if not col or max(col) <= 0:
                continue
            for i in range(n):
                if anchor_valid[i] and iou[i, j] == max(col):
                    labels[i] = 1
    labels[~anchor_valid] = -1
    return matched, labels


def run(iou, *args, **kwargs):
    m, l = Mt.match_boxes(np.asarray(iou, np.float32), *args, **kwargs)
    return m.numpy(), l.numpy()


def test_rpn_ignore_band_hand_case():
    iou = [[0.8, 0.1], [0.5, 0.2], [0.1, 0.29], [0.0, 0.3], [0.2, 0.7]]
    matched, labels = run(iou, 0.7, 0.3)
    np.testing.assert_array_equal(labels, [1, -1, 0, -1, 1])
    np.testing.assert_array_equal(matched[[0, 4]], [0, 1])


def test_fast_rcnn_lower_bound_ignores_easy_background():
    iou = [[0.05], [0.1], [0.45], [0.5], [0.0]]
    _, labels = run(iou, 0.5, 0.5, 0.1)
    np.testing.assert_array_equal(labels, [-1, 0, 0, 1, -1])
    _, labels = run(iou, 0.5, 0.5, 0.0)
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 0])


def test_low_quality_matches_include_ties_and_keep_own_best_gt():
    # gt 0 best IoU 0.4 reached by anchors 0 and 2 (tie); gt 1 best 0.6 at anchor 1.
    # anchor 2's own best gt is gt 1 (0.45 > 0.4): it turns positive but stays matched to gt 1.
    iou = [[0.4, 0.1], [0.2, 0.6], [0.4, 0.45], [0.1, 0.2]]
    matched, labels = run(iou, 0.7, 0.3, allow_low_quality_matches=True)
    np.testing.assert_array_equal(labels, [1, 1, 1, 0])
    np.testing.assert_array_equal(matched[:3], [0, 1, 1])
    _, labels = run(iou, 0.7, 0.3, allow_low_quality_matches=False)
    np.testing.assert_array_equal(labels, [-1, -1, -1, 0])


def test_low_quality_ignores_gt_without_overlap():
    iou = [[0.0, 0.9], [0.0, 0.1]]
    _, labels = run(iou, 0.7, 0.3, allow_low_quality_matches=True)
    np.testing.assert_array_equal(labels, [1, 0])


def test_zero_gt_all_negative_even_with_lower_bound():
    for iou in (np.zeros((4, 0), np.float32), np.full((4, 2), 0.9, np.float32)):
        matched, labels = Mt.match_boxes(iou, 0.5, 0.5, 0.1, allow_low_quality_matches=True,
                                         gt_valid=np.zeros(iou.shape[1], bool))
        np.testing.assert_array_equal(labels.numpy(), 0)
        np.testing.assert_array_equal(matched.numpy(), 0)


def test_padded_gt_never_matches():
    iou = [[0.9, 0.2], [0.3, 0.6]]
    matched, labels = run(iou, 0.5, 0.4, gt_valid=np.array([False, True]))
    np.testing.assert_array_equal(matched, [1, 1])
    np.testing.assert_array_equal(labels, [0, 1])


@pytest.mark.parametrize("low_quality", [False, True])
def test_batched_random_matches_reference(low_quality):
    rng = np.random.default_rng(0)
    b, n, m = 4, 30, 5
    # Quantized IoUs so that ties actually occur.
    iou = (rng.integers(0, 11, (b, n, m)) / 10.0).astype(np.float32)
    gt_valid = rng.uniform(size=(b, m)) < 0.7
    gt_valid[0] = False  # one image without ground truth
    anchor_valid = rng.uniform(size=(b, n)) < 0.9
    matched, labels = Mt.match_boxes(iou, 0.7, 0.3, 0.0, low_quality, gt_valid=gt_valid,
                                     anchor_valid=anchor_valid)
    for i in range(b):
        ref_m, ref_l = np_match(iou[i], 0.7, 0.3, 0.0, low_quality, gt_valid[i], anchor_valid[i])
        np.testing.assert_array_equal(labels.numpy()[i], ref_l)
        pos = ref_l == 1
        np.testing.assert_array_equal(matched.numpy()[i][pos], ref_m[pos])


def test_matcher_in_tf_function_with_dynamic_shapes_and_config():
    matcher = Mt.Matcher.rpn()
    assert Mt.Matcher.from_config(matcher.get_config()).get_config() == matcher.get_config()

    @tf.function(input_signature=[tf.TensorSpec([None, None, None]), tf.TensorSpec([None, None],
                                                                                    tf.bool)])
    def f(iou, valid):
        return matcher(iou, gt_valid=valid)

    iou = np.array([[[0.8, 0.0], [0.1, 0.2]]], np.float32)
    _, labels = f(iou, np.array([[True, False]]))
    np.testing.assert_array_equal(labels.numpy(), [[1, 0]])
    _, labels = f(np.zeros((1, 3, 0), np.float32), np.zeros((1, 0), bool))
    np.testing.assert_array_equal(labels.numpy(), [[0, 0, 0]])


def test_gather_by_match_including_empty_gt():
    gt_boxes = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    idx = np.array([[2, 0], [1, 1]], np.int32)
    got = Mt.gather_by_match(gt_boxes, idx).numpy()
    np.testing.assert_array_equal(got, np.stack([gt_boxes[0][[2, 0]], gt_boxes[1][[1, 1]]]))
    empty = Mt.gather_by_match(np.zeros((2, 0), np.int32), np.zeros((2, 3), np.int32), -1)
    np.testing.assert_array_equal(empty.numpy(), -1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="positive_threshold"):
        Mt.match_boxes(np.zeros((2, 2)), 0.3, 0.7)
    with pytest.raises(TypeError, match="gt_valid"):
        Mt.match_boxes(np.zeros((2, 2)), 0.5, gt_valid=np.ones(2))
    with pytest.raises(ValueError, match="gt_valid"):
        Mt.match_boxes(np.zeros((2, 2)), 0.5, gt_valid=np.ones(3, bool))


def _rpn_targets(anchors, gt_boxes, gt_labels, image_shape):
    """The RPN target pipeline a detector runs in train_step, built from the public ops."""
    from kerasdet import ops

    iou = ops.box_iou(anchors, gt_boxes)  # [B, N, M]
    inside = ops.anchors_inside_image_mask(anchors, image_shape)  # [B, N]
    matched, labels = ops.Matcher.rpn()(iou, gt_valid=gt_labels >= 0, anchor_valid=inside)
    box_targets = ops.encode_boxes(ops.gather_by_match(gt_boxes, matched), anchors, (1, 1, 1, 1))
    class_targets = ops.assign_class_targets(labels, ops.gather_by_match(gt_labels, matched))
    sampled = ops.sample_balanced(labels, 32, 0.5, seed=4)
    return labels, box_targets, class_targets, sampled


@pytest.mark.parametrize("jit_compile", [False, True])
def test_rpn_target_pipeline_end_to_end(jit_compile):
    from kerasdet import ops

    anchors = ops.AnchorGenerator(strides=(8,), sizes=[(16, 32)]).for_image((64, 64))
    gt_boxes = np.array([[[4, 4, 30, 20], [34, 30, 60, 62], [0, 0, 0, 0]],
                         [[10, 12, 50, 40], [0, 0, 0, 0], [0, 0, 0, 0]],
                         [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
    gt_labels = np.array([[2, 0, -1], [1, -1, -1], [-1, -1, -1]], np.int32)
    image_shape = np.array([[64, 64], [64, 64], [48, 64]], np.int32)
    fn = tf.function(_rpn_targets, jit_compile=jit_compile)
    labels, box_targets, class_targets, sampled = [t.numpy() for t in fn(
        anchors, gt_boxes, gt_labels, image_shape)]
    anchors = anchors.numpy()
    from kerasdet.ops import boxes as B
    for i in range(3):
        valid_gt = gt_labels[i] >= 0
        pos = labels[i] == 1
        # Every real object gets at least one positive anchor (low-quality rule), none otherwise.
        assert pos.any() == valid_gt.any()
        decoded = B.decode_boxes(box_targets[i][pos], anchors[pos], (1, 1, 1, 1)).numpy()
        ious = B.box_iou(decoded, gt_boxes[i][valid_gt]).numpy() if pos.any() else np.zeros((0, 1))
        assert np.all(ious.max(axis=1) > 0.999)  # targets decode back onto a real object
        expected_classes = gt_labels[i][valid_gt][ious.argmax(axis=1)] if pos.any() else []
        np.testing.assert_array_equal(class_targets[i][pos] - 1, expected_classes)
        assert sampled[i].sum() == min(32, (labels[i] >= 0).sum())
        assert np.all(labels[i][sampled[i]] >= 0)
    assert np.all(labels[2][anchors[:, 3] > 48] == -1)  # cross-boundary anchors ignored


def test_label_boxes_names_classes_bands_and_crowd_in_one_rule():
    gt = tf.constant([[[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0], [0.0, 0.0, 0.0, 0.0]]])
    labels = tf.constant([[2, 0, -1]])
    crowd = tf.constant([[False, True, False]])
    boxes = tf.constant([[[0.0, 0.0, 10.0, 8.0],      # IoU 0.8 with the class-2 box
                          [0.0, 0.0, 10.0, 3.0],      # IoU 0.3: background band
                          [22.0, 22.0, 30.0, 30.0],   # inside the crowd region
                          [60.0, 60.0, 70.0, 70.0],   # far from everything
                          [0.0, 0.0, 10.0, 10.0]]])   # padding row (box_valid False)
    valid = tf.constant([[True, True, True, True, False]])
    out = Mt.label_boxes(boxes, gt, labels, 0.5, 0.5, 0.0, box_valid=valid, gt_crowd=crowd)
    np.testing.assert_array_equal(out.match_labels.numpy(), [[1, 0, -1, 0, -1]])
    np.testing.assert_array_equal(out.classes.numpy(), [[3, 0, -1, 0, -1]])
    # Without the crowd flags the crowd box is an ordinary class-0 object.
    plain = Mt.label_boxes(boxes, gt, labels, 0.5, 0.5, 0.0, box_valid=valid)
    np.testing.assert_array_equal(plain.classes.numpy(), [[3, 0, 0, 0, -1]])
    np.testing.assert_allclose(out.iou.numpy(), [[0.8, 0.3, 0.0, 0.0, 1.0]], atol=1e-6)
    assert out.matched_index.numpy()[0, 0] == 0
