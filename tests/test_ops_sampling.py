"""kerasdet.ops.sampling: counts, fractions over many draws, padding, seeds, hard negatives."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.ops import sampling as S


def expected_counts(labels, num_samples, fraction):
    num_pos = min(int((labels == 1).sum()), int(num_samples * fraction))
    num_neg = min(int((labels == 0).sum()), num_samples - num_pos)
    return num_pos, num_neg


def check_sample(labels, indices, valid, num_samples, fraction):
    num_pos, num_neg = expected_counts(labels, num_samples, fraction)
    assert valid.sum() == num_pos + num_neg
    assert valid[:num_pos + num_neg].all()  # valid slots first
    picked = indices[valid]
    assert len(set(picked.tolist())) == len(picked)  # no duplicates
    np.testing.assert_array_equal(labels[picked[:num_pos]], 1)
    np.testing.assert_array_equal(labels[picked[num_pos:]], 0)
    np.testing.assert_array_equal(indices[~valid], 0)


@pytest.mark.parametrize("n_pos,n_neg,n_ign", [(5, 50, 10), (40, 50, 0), (0, 30, 5), (3, 4, 2),
                                               (0, 0, 6)])
def test_counts_and_padding(n_pos, n_neg, n_ign):
    rng = np.random.default_rng(n_pos + n_neg)
    labels = rng.permutation(np.array([1] * n_pos + [0] * n_neg + [-1] * n_ign, np.int32))
    indices, valid = S.sample_balanced_indices(labels, 16, 0.25, seed=3)
    assert indices.shape == (16,) and indices.dtype == tf.int32
    check_sample(labels, indices.numpy(), valid.numpy(), 16, 0.25)


def test_batched_rows_are_independent_images():
    labels = np.array([[1, 1, 1, 0, 0, 0, -1, -1],
                       [0, 0, 0, 0, 0, 0, 0, 0],
                       [-1, -1, -1, -1, -1, -1, -1, -1]], np.int32)
    indices, valid = S.sample_balanced_indices(labels, 4, 0.5, seed=1)
    for i in range(3):
        check_sample(labels[i], indices.numpy()[i], valid.numpy()[i], 4, 0.5)


def test_selection_is_uniform_over_many_draws():
    # 1000 identical images in one batch = 1000 independent draws.
    draws = 1000
    labels = np.array([1] * 8 + [0] * 20 + [-1] * 4, np.int32)
    batch = np.tile(labels, (draws, 1))
    mask = S.sample_balanced(batch, 10, 0.25, seed=keras.random.SeedGenerator(7)).numpy()
    freq = mask.mean(axis=0)
    # 2 of 8 positives (p = 0.25), 8 of 20 negatives (p = 0.4), ignored never.
    for idx, p in ((labels == 1, 2 / 8), (labels == 0, 8 / 20)):
        tol = 4 * np.sqrt(p * (1 - p) / draws)
        assert np.all(np.abs(freq[idx] - p) < tol), (freq[idx], p)
    np.testing.assert_array_equal(freq[labels == -1], 0.0)
    np.testing.assert_array_equal(mask.sum(axis=1), 10)
    assert (mask & (batch == 1)).sum(axis=1).max() == 2


def test_mask_matches_indices_and_seeds():
    labels = np.array([1, 0, 0, 1, 0, -1, 0, 1, 0, 0], np.int32)
    idx, valid = S.sample_balanced_indices(labels, 6, 0.5, seed=11)
    mask = S.sample_balanced(labels, 6, 0.5, seed=11).numpy()
    expected = np.zeros(10, bool)
    expected[idx.numpy()[valid.numpy()]] = True
    np.testing.assert_array_equal(mask, expected)
    again, _ = S.sample_balanced_indices(labels, 6, 0.5, seed=11)
    np.testing.assert_array_equal(idx, again)  # int seed: reproducible


def test_seed_generator_gives_fresh_draws_inside_tf_function():
    gen = keras.random.SeedGenerator(5)
    labels = np.array([1] * 20 + [0] * 100, np.int32)

    @tf.function
    def draw(x):
        return S.sample_balanced_indices(x, 16, 0.5, seed=gen)[0]

    first, second = draw(labels).numpy(), draw(labels).numpy()
    assert not np.array_equal(np.sort(first), np.sort(second))
    for out in (first, second):
        check_sample(labels, out, np.ones(16, bool), 16, 0.5)


def test_sampler_bad_input():
    with pytest.raises(TypeError, match="labels"):
        S.sample_balanced_indices(np.zeros(4, np.float32), 2)
    with pytest.raises(ValueError, match="positive_fraction"):
        S.sample_balanced_indices(np.zeros(4, np.int32), 2, 1.5)


def np_hard_negatives(losses, labels, ratio, min_neg):
    """Reference: sort negatives by loss (stable, descending), keep the allowed number."""
    num_pos = int((labels == 1).sum())
    neg = np.nonzero(labels == 0)[0]
    k = min(len(neg), max(int(np.floor(ratio * num_pos)), min_neg))
    order = neg[np.argsort(-losses[neg], kind="stable")]
    keep = labels == 1
    keep[order[:k]] = True
    return keep


@pytest.mark.parametrize("n_pos,min_neg", [(4, 3), (0, 3), (0, 0), (30, 3), (1, 10)])
def test_hard_negative_mining_matches_reference(n_pos, min_neg):
    rng = np.random.default_rng(n_pos * 7 + min_neg)
    labels = rng.permutation(np.array([1] * n_pos + [0] * 60 + [-1] * 10, np.int32))
    losses = rng.uniform(size=labels.shape).astype(np.float32)
    got = S.hard_negative_mining(losses, labels, 3.0, min_neg).numpy()
    np.testing.assert_array_equal(got, np_hard_negatives(losses, labels, 3.0, min_neg))
    negs = (got & (labels == 0)).sum()
    assert negs == min(60, max(3 * n_pos, min_neg))


def test_hard_negative_mining_batched_and_hardest_chosen():
    labels = np.array([[1, 0, 0, 0, 0, -1], [0, 0, 0, 0, 0, 0]], np.int32)
    losses = np.array([[0.1, 0.5, 0.9, 0.2, 0.7, 5.0], [0.3, 0.1, 0.2, 0.9, 0.8, 0.0]], np.float32)
    got = S.hard_negative_mining(losses, labels, neg_pos_ratio=2, min_negatives=1).numpy()
    np.testing.assert_array_equal(got, [[1, 0, 1, 0, 1, 0], [0, 0, 0, 1, 0, 0]])
    for i in range(2):
        np.testing.assert_array_equal(got[i], np_hard_negatives(losses[i], labels[i], 2, 1))


def test_hard_negative_mining_blocks_gradient_and_checks_shapes():
    losses = tf.Variable([0.5, 0.2, 0.9])
    with tf.GradientTape() as tape:
        mask = S.hard_negative_mining(losses, np.array([1, 0, 0], np.int32))
        total = tf.reduce_sum(tf.where(mask, losses, 0.0))
    np.testing.assert_allclose(tape.gradient(total, losses).numpy(), [1, 1, 1])
    with pytest.raises(ValueError, match="losses"):
        S.hard_negative_mining(np.zeros(4), np.zeros(3, np.int32))
