"""Second-stage box heads: the FPN 2fc head and the per-class (or class-agnostic) box predictor."""
import keras
import numpy as np
import tensorflow as tf

__all__ = ["TwoFCHead", "BoxPredictor", "truncated_svd_factors", "truncated_svd_compress"]


@keras.saving.register_keras_serializable(package="kerasdet")
class TwoFCHead(keras.layers.Layer):
    """[B, R, S, S, C] pooled features -> [B, R, fc_dim] through `num_fcs` ReLU fc layers
    (FPN's 2fc head with 1024 units; Fast R-CNN's fc6/fc7 with 4096).

    `ranks` (one per fc, None = full) factorizes fc i as Fast R-CNN section 3.1 compresses it with
    a truncated SVD: W ~ U_t S_t V_t^T becomes a first layer of t units without bias or
    non-linearity followed by the original layer's bias and ReLU (see `truncated_svd_compress`).
    """

    def __init__(self, fc_dim=1024, num_fcs=2, ranks=None, **kwargs):
        super().__init__(**kwargs)
        self.fc_dim = int(fc_dim)
        self.num_fcs = int(num_fcs)
        ranks = list(ranks) if ranks is not None else [None] * self.num_fcs
        if len(ranks) != self.num_fcs:
            raise ValueError(f"`ranks` needs {self.num_fcs} entries, got {ranks}.")
        self.ranks = [None if r is None else int(r) for r in ranks]
        self.svd_layers = [
            None if r is None else keras.layers.Dense(r, use_bias=False, name=f"fc{i + 6}_svd")
            for i, r in enumerate(self.ranks)]
        self.fcs = [keras.layers.Dense(self.fc_dim, activation="relu", name=f"fc{i + 6}")
                    for i in range(self.num_fcs)]

    def build(self, input_shape):
        size = 1
        for d in input_shape[2:]:
            size *= int(d)
        shape = (None, size)
        for svd, fc in zip(self.svd_layers, self.fcs):
            if svd is not None:
                svd.build(shape)
                shape = (None, svd.units)
            fc.build(shape)
            shape = (None, self.fc_dim)

    def call(self, pooled):
        batch, num = tf.shape(pooled)[0], tf.shape(pooled)[1]
        size = 1
        for d in pooled.shape[2:]:
            size *= int(d)
        x = tf.reshape(pooled, [-1, size])
        for svd, fc in zip(self.svd_layers, self.fcs):
            if svd is not None:
                x = svd(x)
            x = fc(x)
        return tf.reshape(x, [batch, num, self.fc_dim])

    def get_config(self):
        config = super().get_config()
        config.update(fc_dim=self.fc_dim, num_fcs=self.num_fcs, ranks=self.ranks)
        return config


def truncated_svd_factors(kernel, rank):
    """Best rank-t factorization of a Dense kernel K [in, out] (Eckart-Young): K ~ A @ B with
    A = U_t S_t [in, t] and B = V_t^T [t, out]. Returns (A, B, relative Frobenius error)."""
    u, s, vt = np.linalg.svd(np.asarray(kernel, np.float64), full_matrices=False)
    a = u[:, :rank] * s[:rank]
    b = vt[:rank]
    error = float(np.sqrt(np.sum(s[rank:] ** 2) / max(np.sum(s ** 2), 1e-30)))
    return a.astype(np.float32), b.astype(np.float32), error


def truncated_svd_compress(head, ranks):
    """A new TwoFCHead whose fc layers are the truncated-SVD factorization of `head`'s.

    Fast R-CNN compresses fc6 (25088 x 4096) to t = 1024 and fc7 to t = 256, cutting detection
    time by over 30 % for a 0.3 point mAP drop. Returns (new head, report) where the report lists
    per layer the rank, parameter counts and relative approximation error.
    """
    if not head.built:
        raise ValueError("Build the head (run the model once) before compressing it.")
    compressed = TwoFCHead(head.fc_dim, head.num_fcs, ranks=ranks, name=head.name)
    in_size = head.fcs[0].kernel.shape[0]
    compressed.build((None, None, in_size))
    report = []
    for i, (old, rank) in enumerate(zip(head.fcs, compressed.ranks)):
        kernel, bias = old.kernel.numpy(), old.bias.numpy()
        new_fc = compressed.fcs[i]
        if rank is None:
            new_fc.kernel.assign(kernel)
            new_fc.bias.assign(bias)
            report.append({"layer": old.name, "rank": None, "params_before": int(kernel.size),
                           "params_after": int(kernel.size), "relative_error": 0.0})
            continue
        a, b, error = truncated_svd_factors(kernel, rank)
        compressed.svd_layers[i].kernel.assign(a)
        new_fc.kernel.assign(b)
        new_fc.bias.assign(bias)
        report.append({"layer": old.name, "rank": rank, "params_before": int(kernel.size),
                       "params_after": int(a.size + b.size), "relative_error": error})
    return compressed, report


@keras.saving.register_keras_serializable(package="kerasdet")
class BoxPredictor(keras.layers.Layer):
    """Class logits over K + 1 classes (0 = background) and box deltas, 4 per foreground class or
    4 in all when `class_agnostic` (Cascade R-CNN)."""

    def __init__(self, num_classes, class_agnostic=False, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.class_agnostic = bool(class_agnostic)
        self.cls = keras.layers.Dense(
            self.num_classes + 1, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            name="cls_score")
        box_out = 4 if self.class_agnostic else 4 * self.num_classes
        self.box = keras.layers.Dense(
            box_out, kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
            name="bbox_pred")

    def build(self, input_shape):
        shape = (None, int(input_shape[-1]))
        self.cls.build(shape)
        self.box.build(shape)

    def call(self, features, training=None):
        """features [B, R, D] -> logits [B, R, K + 1], deltas [B, R, K or 1, 4]."""
        logits = self.cls(features)
        deltas = self.box(features)
        boxes_per_roi = 1 if self.class_agnostic else self.num_classes
        shape = tf.concat([tf.shape(features)[:-1], [boxes_per_roi, 4]], axis=0)
        deltas = tf.reshape(deltas, shape)
        # A static box axis lets callers branch on class-agnostic vs per-class inside graphs.
        deltas.set_shape(features.shape[:-1].concatenate([boxes_per_roi, 4]))
        return logits, deltas

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, class_agnostic=self.class_agnostic)
        return config
