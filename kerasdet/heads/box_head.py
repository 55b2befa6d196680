"""Second-stage box heads: the FPN 2fc head and the per-class (or class-agnostic) box predictor."""
import keras
import tensorflow as tf

__all__ = ["TwoFCHead", "BoxPredictor"]


@keras.saving.register_keras_serializable(package="kerasdet")
class TwoFCHead(keras.layers.Layer):
    """[B, R, S, S, C] pooled features -> [B, R, fc_dim] through `num_fcs` ReLU fc layers
    (FPN's 2fc head with 1024 units; Fast R-CNN's fc6/fc7 with 4096)."""

    def __init__(self, fc_dim=1024, num_fcs=2, **kwargs):
        super().__init__(**kwargs)
        self.fc_dim = int(fc_dim)
        self.num_fcs = int(num_fcs)
        self.fcs = [keras.layers.Dense(self.fc_dim, activation="relu", name=f"fc{i + 6}")
                    for i in range(self.num_fcs)]

    def build(self, input_shape):
        size = 1
        for d in input_shape[2:]:
            size *= int(d)
        shape = (None, size)
        for fc in self.fcs:
            fc.build(shape)
            shape = (None, self.fc_dim)

    def call(self, pooled):
        batch, num = tf.shape(pooled)[0], tf.shape(pooled)[1]
        size = 1
        for d in pooled.shape[2:]:
            size *= int(d)
        x = tf.reshape(pooled, [-1, size])
        for fc in self.fcs:
            x = fc(x)
        return tf.reshape(x, [batch, num, self.fc_dim])

    def get_config(self):
        config = super().get_config()
        config.update(fc_dim=self.fc_dim, num_fcs=self.num_fcs)
        return config


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

    def call(self, features):
        """features [B, R, D] -> logits [B, R, K + 1], deltas [B, R, K or 1, 4]."""
        logits = self.cls(features)
        deltas = self.box(features)
        shape = tf.concat([tf.shape(features)[:-1], [-1, 4]], axis=0)
        return logits, tf.reshape(deltas, shape)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, class_agnostic=self.class_agnostic)
        return config
