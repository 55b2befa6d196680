"""SPP-net image classifier (He et al. 2014, sec. 3): conv layers + spatial pyramid pooling + fc.

    images [B, H, W, 3] (any H, W) -> backbone feature map (ZF-5 conv5) -> SPP {6, 3, 2, 1}
    (50 bins x 256 = 12800-d for any input size) -> fc6 4096 -> dropout -> fc7 4096 -> dropout
    -> fc8 num_classes (logits).

The pyramid makes the fc input length independent of the image size, which is what allows
multi-size training: the paper trains on 224 x 224 crops and, every other full epoch, on the same
crops resized to 180 x 180 (conv5 13 x 13 vs 10 x 10), keeping all weights. `multi_size_dataset`
builds that schedule inside tf.data: the epoch number is an element of the pipeline, so the
schedule has no Python or per-step state and resumes deterministically.

Dropout 0.5 follows fc6 and fc7 as in the ZF / AlexNet nets SPP-net builds on. The model returns
logits (float32 also under a mixed policy); train with from_logits=True.
"""
import keras
import tensorflow as tf

from kerasdet.backbones import registry as backbones
from kerasdet.layers.spp import SpatialPyramidPooling
from kerasdet.ops.spp import SPP_LEVELS

__all__ = ["SPPClassifier", "multi_size_dataset", "MULTI_SIZES"]

MULTI_SIZES = (224, 180)
_BACKBONES = {"zf5": ("zf", "conv5"), "tiny": ("tiny", None)}


@keras.saving.register_keras_serializable(package="kerasdet")
class SPPClassifier(keras.Model):
    """ZF-5 (or the tiny test backbone) + SPP + fc6 / fc7 / classifier.

    Args:
      num_classes: outputs of the last fc layer.
      backbone: "zf5" (conv5, stride 16) or "tiny" (kerasdet's test backbone).
      levels: pyramid levels (n x n bins each).
      fc_dims: widths of the hidden fc layers (the paper: 4096, 4096).
      dropout: rate after each hidden fc layer.
      feature: backbone output to pool (default: "conv5" for ZF-5, the deepest level for tiny).
      backbone_kwargs: extra constructor arguments of the backbone (e.g. input_normalization,
        channels for tiny).
    """

    def __init__(self, num_classes, backbone="zf5", levels=SPP_LEVELS, fc_dims=(4096, 4096),
                 dropout=0.5, feature=None, backbone_kwargs=None, **kwargs):
        super().__init__(**kwargs)
        if int(num_classes) < 1:
            raise ValueError(f"SPPClassifier: `num_classes` must be >= 1, got {num_classes!r}")
        if backbone not in _BACKBONES:
            raise ValueError(f"SPPClassifier: `backbone` must be one of {sorted(_BACKBONES)}, "
                             f"got {backbone!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"SPPClassifier: `dropout` must be in [0, 1), got {dropout!r}")
        self.num_classes = int(num_classes)
        self.backbone_name = backbone
        self.levels = tuple(int(n) for n in levels)
        self.fc_dims = tuple(int(d) for d in fc_dims)
        self.dropout_rate = float(dropout)
        self.backbone_kwargs = dict(backbone_kwargs or {})
        registered, default_feature = _BACKBONES[backbone]
        self.backbone = backbones.get(registered, **self.backbone_kwargs)
        names = list(self.backbone.strides)
        self.feature = feature or default_feature or names[-1]
        if self.feature not in names:
            raise ValueError(f"SPPClassifier: `feature` must be one of {names} for backbone "
                             f"{backbone!r}, got {self.feature!r}")
        self.spp = SpatialPyramidPooling(self.levels, dtype=self.dtype_policy, name="spp")
        self.hidden = []
        for i, dim in enumerate(self.fc_dims):
            self.hidden.append((
                keras.layers.Dense(dim, activation="relu", dtype=self.dtype_policy,
                                   name=f"fc{6 + i}"),
                keras.layers.Dropout(self.dropout_rate, name=f"drop{6 + i}")))
        self.classifier = keras.layers.Dense(self.num_classes, dtype=self.dtype_policy,
                                             name=f"fc{6 + len(self.fc_dims)}")

    def features(self, images, training=False):
        """The pooled fixed-length vector [B, C * sum(n^2)] (SPP-net's pool5 / spp output)."""
        return self.spp(self.backbone(images, training=training)[self.feature])

    def call(self, images, training=False):
        x = self.features(images, training=training)
        for dense, drop in self.hidden:
            x = drop(dense(x), training=training)
        return tf.cast(self.classifier(x), tf.float32)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, backbone=self.backbone_name,
                      levels=list(self.levels), fc_dims=list(self.fc_dims),
                      dropout=self.dropout_rate, feature=self.feature,
                      backbone_kwargs=self.backbone_kwargs)
        return config


def multi_size_dataset(dataset, epochs, sizes=MULTI_SIZES, first_epoch=0):
    """SPP-net's multi-size training schedule as one tf.data pipeline.

    Epoch e yields every batch of `dataset` with its images resized (bilinear) to
    sizes[e % len(sizes)] squared: the paper's 224 crops in one epoch, the same crops resized to
    180 in the next, and so on. Pass the returned steps to Keras, which then keeps one iterator
    across epochs so epoch e of fit is epoch e of the schedule:

        data, steps = multi_size_dataset(train, epochs=10)
        model.fit(data, epochs=10, steps_per_epoch=steps)

    Args:
      dataset: finite tf.data.Dataset of (images [B, H, W, 3], labels) batches (shuffling inside
        it is redone every epoch).
      epochs: total epochs of the run.
      sizes: the input sizes, cycled by epoch.
      first_epoch: the epoch to start from (for fit's initial_epoch when resuming).
    Returns:
      (dataset of epochs * steps batches, steps per epoch).
    """
    sizes = tuple(int(s) for s in sizes)
    if not sizes or min(sizes) < 1:
        raise ValueError(f"multi_size_dataset: `sizes` must be positive ints, got {sizes!r}")
    if int(epochs) < 1 or not 0 <= int(first_epoch) < int(epochs):
        raise ValueError(f"multi_size_dataset: need epochs >= 1 and 0 <= first_epoch < epochs, "
                         f"got epochs={epochs!r}, first_epoch={first_epoch!r}")
    steps = int(dataset.cardinality())
    if steps < 1:
        raise ValueError(f"multi_size_dataset: `dataset` must be finite and non-empty with a "
                         f"known length, got cardinality {steps}")
    table = tf.constant(sizes, tf.int32)

    def one_epoch(epoch):
        size = table[epoch % len(sizes)]

        def resize(images, *rest):
            resized = tf.image.resize(images, tf.stack([size, size]), method="bilinear")
            return (tf.cast(resized, images.dtype) if images.dtype.is_floating else resized,
                    *rest)
        return dataset.map(resize, num_parallel_calls=tf.data.AUTOTUNE)

    epochs_ds = tf.data.Dataset.range(int(first_epoch), int(epochs), output_type=tf.int32)
    return epochs_ds.flat_map(one_epoch), steps
