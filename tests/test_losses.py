"""kerasdet.losses against numpy references from the papers' definitions, plus gradient checks."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet import losses as L
from kerasdet import ops


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_smooth_l1(x, beta):
    ax = np.abs(x)
    if beta == 0:
        return ax
    return np.where(ax < beta, 0.5 * x ** 2 / beta, ax - 0.5 * beta)


def np_softmax_ce(labels, logits):
    m = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
    picked = np.take_along_axis(logits, np.maximum(labels, 0)[..., None], -1)[..., 0]
    return np.where(labels >= 0, log_z - picked, 0.0)


def np_bce(t, x):
    p = np_sigmoid(x)
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def np_focal(t, x, alpha, gamma):
    p = np_sigmoid(x)
    p_t = np.where(t == 1, p, 1 - p)
    a_t = np.where(t == 1, alpha, 1 - alpha)
    return -a_t * (1 - p_t) ** gamma * np.log(p_t)


def grad_check(fn, x, atol=1e-5):
    x = tf.constant(x, tf.float64)
    theo, num = tf.test.compute_gradient(fn, [x], delta=1e-6)
    np.testing.assert_allclose(theo[0], num[0], atol=atol, rtol=1e-4)
    assert np.abs(theo[0]).sum() > 0  # the check is not vacuous


# ---------------------------------------------------------------- smooth L1

@pytest.mark.parametrize("beta", [1.0, 1.0 / 9.0, 0.0])
def test_smooth_l1_elementwise_and_loss(beta):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (50,))
    np.testing.assert_allclose(L.smooth_l1(x, beta).numpy(), np_smooth_l1(x, beta), rtol=1e-12)
    t, p = rng.normal(0, 1, (6, 4)), rng.normal(0, 1, (6, 4))
    w = np.array([1, 0, 1, 1, 0, 1], np.float64)
    expected = (w * np_smooth_l1(p - t, beta).sum(-1)).sum() / 6.0
    got = L.smooth_l1_loss(t, p, beta, weights=w, normalizer=6.0).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    default = L.smooth_l1_loss(t, p, beta, weights=w).numpy()  # normalized by sum(weights)
    np.testing.assert_allclose(default, expected * 6.0 / w.sum(), rtol=1e-10)


def test_smooth_l1_continuous_at_beta_and_gradient():
    beta = 0.5
    below, above = L.smooth_l1(np.array([beta - 1e-7, beta + 1e-7]), beta).numpy()
    assert abs(below - above) < 1e-6
    x = np.array([-2.0, -0.3, 0.1, 0.4, 1.7])  # away from the kinks at 0 and +-beta
    grad_check(lambda v: L.smooth_l1(v, beta), x)
    rng = np.random.default_rng(1)
    t = tf.constant(rng.normal(0, 1, (3, 4)))
    grad_check(lambda p: L.smooth_l1_loss(t, p, 1.0), rng.normal(0, 1, (3, 4)) + 0.05)


def test_zero_normalizer_gives_zero_not_nan():
    out = L.smooth_l1_loss(np.zeros((3, 4)), np.ones((3, 4)), weights=np.zeros(3))
    assert out.numpy() == 0.0


# ---------------------------------------------------------------- softmax cross entropy

def test_softmax_cross_entropy_matches_numpy_and_ignores():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (2, 7, 5))
    labels = rng.integers(-1, 5, (2, 7))
    np.testing.assert_allclose(L.softmax_cross_entropy(labels, logits).numpy(),
                               np_softmax_ce(labels, logits), rtol=1e-10, atol=1e-12)
    ref = np_softmax_ce(labels, logits)
    np.testing.assert_allclose(L.softmax_cross_entropy_loss(labels, logits).numpy(),
                               ref.sum() / (labels >= 0).sum(), rtol=1e-10)
    np.testing.assert_allclose(
        L.softmax_cross_entropy_loss(labels, logits, normalizer=100.0).numpy(), ref.sum() / 100,
        rtol=1e-10)


def test_softmax_cross_entropy_gradient_and_stability():
    labels = tf.constant([0, 3, -1, 2])
    rng = np.random.default_rng(3)
    grad_check(lambda z: L.softmax_cross_entropy_loss(labels, z), rng.normal(0, 2, (4, 4)))
    big = L.softmax_cross_entropy([1], np.array([[500.0, -500.0]], np.float32)).numpy()
    np.testing.assert_allclose(big, [1000.0], rtol=1e-6)


def test_softmax_cross_entropy_bad_input():
    with pytest.raises(TypeError, match="labels"):
        L.softmax_cross_entropy(np.zeros(3, np.float32), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="labels"):
        L.softmax_cross_entropy(np.zeros(4, np.int32), np.zeros((3, 2)))


# ---------------------------------------------------------------- binary cross entropy

def test_binary_cross_entropy_matches_numpy_and_gradient():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 3, (5, 6))
    t = (rng.uniform(size=(5, 6)) < 0.3).astype(np.float64)
    np.testing.assert_allclose(L.binary_cross_entropy(t, x).numpy(), np_bce(t, x), rtol=1e-8)
    w = (rng.uniform(size=(5, 6)) < 0.5).astype(np.float64)
    np.testing.assert_allclose(L.binary_cross_entropy_loss(t, x, w, 256.0).numpy(),
                               (w * np_bce(t, x)).sum() / 256.0, rtol=1e-8)
    grad_check(lambda z: L.binary_cross_entropy_loss(t, z, w), x)


def test_binary_cross_entropy_bad_shape():
    with pytest.raises(ValueError, match="targets"):
        L.binary_cross_entropy(np.zeros((2, 3)), np.zeros((2, 4)))


# ---------------------------------------------------------------- focal loss

def test_sigmoid_focal_matches_numpy():
    rng = np.random.default_rng(5)
    x = rng.normal(0, 3, (8, 5))
    t = (rng.uniform(size=(8, 5)) < 0.2).astype(np.float64)
    for alpha, gamma in ((0.25, 2.0), (0.5, 0.0), (0.25, 1.0)):
        np.testing.assert_allclose(L.sigmoid_focal(t, x, alpha, gamma).numpy(),
                                   np_focal(t, x, alpha, gamma), rtol=1e-8)
    num_pos = t.sum()
    np.testing.assert_allclose(L.sigmoid_focal_loss(t, x, normalizer=num_pos).numpy(),
                               np_focal(t, x, 0.25, 2.0).sum() / num_pos, rtol=1e-8)
    # gamma = 0, alpha None is plain binary cross entropy
    np.testing.assert_allclose(L.sigmoid_focal(t, x, None, 0.0).numpy(), np_bce(t, x), rtol=1e-8)


def test_sigmoid_focal_accurate_for_confident_logits():
    x = np.array([[-2.0], [0.5], [3.0], [25.0], [-40.0]], np.float32)
    t = np.array([[1.0], [0.0], [1.0], [0.0], [1.0]], np.float32)
    np.testing.assert_allclose(L.sigmoid_focal(t, x).numpy(), np_focal(t, x.astype(np.float64),
                                                                       0.25, 2.0), rtol=1e-4)
    graph = tf.function(L.sigmoid_focal)(t, x).numpy()
    np.testing.assert_allclose(graph, np_focal(t, x.astype(np.float64), 0.25, 2.0), rtol=1e-4)


def test_per_anchor_weights_repeat_over_classes():
    rng = np.random.default_rng(10)
    x = rng.normal(0, 2, (2, 6, 3))
    t = (rng.uniform(size=(2, 6, 3)) < 0.3).astype(np.float64)
    w = (rng.uniform(size=(2, 6)) < 0.7).astype(np.float64)
    expected = (w[..., None] * np_focal(t, x, 0.25, 2.0)).sum() / 4.0
    np.testing.assert_allclose(L.sigmoid_focal_loss(t, x, weights=w, normalizer=4.0).numpy(),
                               expected, rtol=1e-8)
    with pytest.raises(ValueError, match="weights"):
        L.binary_cross_entropy_loss(t[0], x[0], weights=np.ones((6, 3, 1)))


def test_sigmoid_focal_gradient():
    rng = np.random.default_rng(6)
    t = tf.constant((rng.uniform(size=(4, 3)) < 0.3).astype(np.float64))
    grad_check(lambda z: L.sigmoid_focal_loss(t, z, normalizer=2.0), rng.normal(0, 2, (4, 3)))


# ---------------------------------------------------------------- Fast R-CNN and mask losses

def test_fast_rcnn_loss_class_specific_matches_numpy():
    rng = np.random.default_rng(7)
    r, k = 6, 3
    u = np.array([0, 1, 3, -1, 2, 0])
    logits = rng.normal(0, 1, (r, k + 1))
    v = rng.normal(0, 1, (r, 4))
    deltas = rng.normal(0, 1, (r, k, 4))
    out = L.fast_rcnn_loss(u, logits, v, deltas, beta=1.0, box_loss_weight=2.0)
    sampled = u >= 0
    n = sampled.sum()
    cls = np_softmax_ce(u, logits)[sampled].sum() / n
    box = sum(np_smooth_l1(deltas[i, u[i] - 1] - v[i], 1.0).sum()
              for i in range(r) if u[i] >= 1) / n
    np.testing.assert_allclose(out["classification"].numpy(), cls, rtol=1e-10)
    np.testing.assert_allclose(out["box"].numpy(), 2.0 * box, rtol=1e-10)
    np.testing.assert_allclose(out["total"].numpy(), cls + 2.0 * box, rtol=1e-10)
    agnostic = L.fast_rcnn_loss(u, logits, v, deltas[:, 0], beta=1.0)
    box0 = sum(np_smooth_l1(deltas[i, 0] - v[i], 1.0).sum() for i in range(r) if u[i] >= 1) / n
    np.testing.assert_allclose(agnostic["box"].numpy(), box0, rtol=1e-10)


def test_multibox_loss_matches_numpy_with_hard_negatives():
    rng = np.random.default_rng(11)
    b, n, c = 2, 20, 4
    targets = rng.choice([0, 0, 0, 0, 1, 2, 3, -1], size=(b, n))
    targets[1, :] = np.where(targets[1] > 0, 0, targets[1])  # second image: no positives
    logits = rng.normal(0, 2, (b, n, c))
    box_t, box_p = rng.normal(0, 1, (b, n, 4)), rng.normal(0, 1, (b, n, 4))
    out = L.multibox_loss(targets, logits, box_t, box_p, neg_pos_ratio=3, min_negatives=2)
    ce = np_softmax_ce(targets, logits)
    total_pos = (targets > 0).sum()
    cls = 0.0
    for i in range(b):
        pos = targets[i] > 0
        neg = np.nonzero(targets[i] == 0)[0]
        k = min(len(neg), max(3 * pos.sum(), 2))
        hardest = neg[np.argsort(-ce[i][neg], kind="stable")[:k]]
        cls += ce[i][pos].sum() + ce[i][hardest].sum()
    box = (np_smooth_l1(box_p - box_t, 1.0).sum(-1) * (targets > 0)).sum()
    np.testing.assert_allclose(out["classification"].numpy(), cls / total_pos, rtol=1e-8)
    np.testing.assert_allclose(out["box"].numpy(), box / total_pos, rtol=1e-8)
    none = L.multibox_loss(np.zeros((1, 5), np.int32), logits[:1, :5], box_t[:1, :5],
                           box_p[:1, :5])
    assert none["total"].numpy() == 0.0  # N = 0 gives 0, not NaN
    # Gradient on a smaller slice keeps the finite-difference check cheap.
    grad_check(lambda x: L.multibox_loss(targets[:1, :8], x, box_t[:1, :8], box_p[:1, :8])["total"],
               logits[:1, :8])


def np_mask_loss(targets, logits, classes, weights):
    per_roi = np.array([np_bce(targets[i], logits[i, :, :, classes[i]]).mean()
                        for i in range(len(classes))])
    return (weights * per_roi).sum() / weights.sum()


def test_mask_loss_uses_only_ground_truth_class_channel():
    rng = np.random.default_rng(8)
    r, m, k = 4, 3, 3
    logits = rng.normal(0, 2, (r, m, m, k))
    targets = (rng.uniform(size=(r, m, m)) < 0.5).astype(np.float64)
    classes = np.array([2, 0, 1, 2])
    weights = np.array([1.0, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(L.mask_loss(targets, logits, classes, weights).numpy(),
                               np_mask_loss(targets, logits, classes, weights), rtol=1e-8)
    x = tf.Variable(logits)
    with tf.GradientTape() as tape:
        loss = L.mask_loss(targets, x, classes, weights)
    grad = tape.gradient(loss, x).numpy()
    for i in range(r):
        for c in range(k):
            nonzero = np.abs(grad[i, :, :, c]).sum() > 0
            assert nonzero == (c == classes[i] and weights[i] > 0)
    grad_check(lambda z: L.mask_loss(targets[:2], z, classes[:2], weights[:2]), logits[:2])


def test_mask_loss_batched_leading_dims():
    rng = np.random.default_rng(9)
    logits = rng.normal(0, 1, (2, 3, 4, 4, 2))
    targets = (rng.uniform(size=(2, 3, 4, 4)) < 0.5).astype(np.float64)
    classes = rng.integers(0, 2, (2, 3))
    weights = np.ones((2, 3))
    expected = np_mask_loss(targets.reshape(6, 4, 4), logits.reshape(6, 4, 4, 2),
                            classes.reshape(6), weights.reshape(6))
    np.testing.assert_allclose(L.mask_loss(targets, logits, classes, weights).numpy(), expected,
                               rtol=1e-8)
    with pytest.raises(ValueError, match="mask_targets"):
        L.mask_loss(targets[..., :3], logits, classes)


def test_assign_class_targets_and_losses_in_tf_function():
    match_labels = np.array([[1, 0, -1, 1]], np.int32)
    gt_labels = np.array([[4, 0]], np.int32)
    matched = np.array([[0, 1, 0, 1]], np.int32)
    targets = ops.assign_class_targets(match_labels, ops.gather_by_match(gt_labels, matched))
    np.testing.assert_array_equal(targets.numpy(), [[5, 0, -1, 1]])

    @tf.function
    def total(labels, logits):
        return L.softmax_cross_entropy_loss(labels, logits)

    logits = np.zeros((1, 4, 6), np.float32)
    np.testing.assert_allclose(total(targets, logits).numpy(), np.log(6.0), rtol=1e-6)
