"""Choosing which matched anchors / RoIs a loss sees: the balanced random sampler of Fast/Faster
R-CNN and the hard negative mining of SSD / RefineDet.

Inputs are the labels of `kerasdet.ops.match_boxes`: 1 positive, 0 negative, -1 ignored, shape
[N] or [B, N] (one row per image of a padded batch; padding rows should be -1).
"""
import keras
import tensorflow as tf

__all__ = [
    "sample_balanced_indices",
    "sample_balanced",
    "hard_negative_mining",
]


def _as_batched_labels(labels):
    labels = tf.convert_to_tensor(labels)
    if not labels.dtype.is_integer:
        raise TypeError(f"`labels` must be integer (1 / 0 / -1), got dtype {labels.dtype.name}.")
    rank = labels.shape.rank
    if rank not in (1, 2):
        raise ValueError(f"`labels` must have shape [N] or [B, N], got {labels.shape}.")
    labels = tf.cast(labels, tf.int32)
    return (labels[tf.newaxis] if rank == 1 else labels), rank == 1


def _random_top(keys_mask, k, seed):
    """Indices of min(k, count) uniformly random True entries per row, first in each row of the
    [B, k] result; the rest point at sentinel positions (>= N)."""
    shape = tf.shape(keys_mask)
    noise = keras.random.uniform(shape, seed=seed)
    keys = tf.where(keys_mask, noise, -1.0)
    # k sentinel columns guarantee top_k always has k entries to pick from, even for N < k.
    keys = tf.concat([keys, tf.fill([shape[0], k], -2.0)], axis=1)
    return tf.math.top_k(keys, k=k, sorted=True).indices


def sample_balanced_indices(labels, num_samples, positive_fraction=0.5, seed=None):
    """Fixed-size random sample per image with at most a fraction of positives.

    Per image: ``P = min(#positives, floor(num_samples * positive_fraction))`` random positives,
    then ``min(#negatives, num_samples - P)`` random negatives (so missing positives are filled
    with negatives), without replacement; ignored (-1) entries are never taken. Faster R-CNN's RPN
    uses 256 / 0.5, its RoI heads 512 / 0.25 (Fast R-CNN: 64 per image / 0.25).

    Args:
        labels: int [N] or [B, N] with 1 / 0 / -1.
        num_samples: Python int, the fixed number S of output slots per image.
        positive_fraction: upper bound on the share of positives.
        seed: a `keras.random.SeedGenerator` (what a layer should pass: a fresh draw every step,
            reproducible from its seed), an int (the same draw on every call; for tests) or None
            (Keras' global seed generator).

    Returns:
        (indices int32 [..., S], valid bool [..., S]): positives first, then negatives; unused slots
        have valid False and index 0.
    """
    labels, squeeze = _as_batched_labels(labels)
    num_samples = int(num_samples)
    if num_samples <= 0 or not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(
            f"Need num_samples > 0 and 0 <= positive_fraction <= 1, got {num_samples}, "
            f"{positive_fraction}."
        )
    max_positives = int(num_samples * positive_fraction)
    positive, negative = labels == 1, labels == 0
    num_pos = tf.minimum(tf.reduce_sum(tf.cast(positive, tf.int32), axis=1), max_positives)
    num_neg = tf.minimum(tf.reduce_sum(tf.cast(negative, tf.int32), axis=1), num_samples - num_pos)

    if isinstance(seed, int):  # two independent streams from one integer seed
        pos_seed, neg_seed = seed, seed + 1
    else:
        pos_seed = neg_seed = seed
    neg_idx = _random_top(negative, num_samples, neg_seed)  # [B, S]
    slot = tf.range(num_samples)[tf.newaxis, :]
    if max_positives > 0:
        pos_idx = _random_top(positive, max_positives, pos_seed)  # [B, P_max]
        from_pos = tf.gather(pos_idx, tf.minimum(slot, max_positives - 1)[0], axis=1)
    else:
        from_pos = tf.zeros_like(neg_idx)
    neg_slot = tf.maximum(slot - num_pos[:, tf.newaxis], 0)
    from_neg = tf.gather(neg_idx, neg_slot, batch_dims=1)
    is_pos = slot < num_pos[:, tf.newaxis]
    valid = slot < (num_pos + num_neg)[:, tf.newaxis]
    indices = tf.where(valid, tf.where(is_pos, from_pos, from_neg), 0)
    if squeeze:
        return indices[0], valid[0]
    return indices, valid


def sample_balanced(labels, num_samples, positive_fraction=0.5, seed=None):
    """Mask form of `sample_balanced_indices`: bool [..., N], True for the sampled entries
    (at most `num_samples` per image). Labels of the sample: ``labels`` where the mask is True."""
    batched, squeeze = _as_batched_labels(labels)
    indices, valid = sample_balanced_indices(batched, num_samples, positive_fraction, seed)
    batch_index = tf.broadcast_to(tf.range(tf.shape(indices)[0])[:, tf.newaxis], tf.shape(indices))
    # Every slot is scattered (unused ones add 0 at index 0), so the shapes are fixed and XLA
    # compiles it; a boolean_mask of the valid slots would have a data-dependent length.
    coords = tf.stack([batch_index, indices], -1)
    hits = tf.scatter_nd(coords, tf.cast(valid, tf.int32), tf.shape(batched))
    mask = hits > 0
    return mask[0] if squeeze else mask


def hard_negative_mining(losses, labels, neg_pos_ratio=3.0, min_negatives=3):
    """SSD / RefineDet online hard negative mining.

    Per image, keep every positive and the ``min(#negatives, max(floor(neg_pos_ratio * #positives),
    min_negatives))`` negatives with the highest loss (ties broken by index). With zero positives
    the original SSD keeps no negatives, so a background-only image teaches nothing; here it still
    contributes its `min_negatives` hardest negatives (default 3 = the 3:1 budget of one positive),
    which suppresses confident false positives on empty images. `min_negatives=0` gives SSD exactly.

    Args:
        losses: float [N] or [B, N] per-anchor classification loss (no gradient flows through the
            selection).
        labels: int [N] or [B, N] with 1 / 0 / -1 (-1 is never selected).
        neg_pos_ratio: negatives per positive (3 in SSD and RefineDet).
        min_negatives: negatives kept per image however few positives it has.

    Returns:
        bool mask like `labels`: the positives plus the selected hard negatives — the anchors the
        classification loss is summed over.
    """
    labels, squeeze = _as_batched_labels(labels)
    losses = tf.stop_gradient(tf.cast(tf.convert_to_tensor(losses), tf.float32))
    if losses.shape.rank == 1:
        losses = losses[tf.newaxis]
    if not losses.shape.is_compatible_with(labels.shape):
        raise ValueError(f"`losses` shape {losses.shape} must match `labels` {labels.shape}.")
    if neg_pos_ratio < 0 or min_negatives < 0:
        raise ValueError(
            f"Need neg_pos_ratio >= 0 and min_negatives >= 0, got {neg_pos_ratio}, {min_negatives}."
        )
    positive, negative = labels == 1, labels == 0
    num_pos = tf.reduce_sum(tf.cast(positive, tf.float32), axis=1)
    budget = tf.maximum(tf.floor(neg_pos_ratio * num_pos), float(min_negatives))
    num_neg = tf.minimum(tf.cast(budget, tf.int32),
                         tf.reduce_sum(tf.cast(negative, tf.int32), axis=1))
    keys = tf.where(negative, losses, -float("inf"))
    order = tf.argsort(keys, axis=1, direction="DESCENDING", stable=True)
    rank = tf.argsort(order, axis=1, stable=True)  # inverse permutation: rank of each entry
    selected = positive | (negative & (rank < num_neg[:, tf.newaxis]))
    return selected[0] if squeeze else selected
