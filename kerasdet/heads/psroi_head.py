"""R-FCN's position-sensitive RoI head (Dai et al. 2016), with Deformable ConvNets' deformable
PS-RoI pooling (Dai et al. 2017) as an option.

The whole per-RoI computation of R-FCN is a pooling and a mean:
  trunk feature -> [1x1 conv to `head_channels` + ReLU] -> two sibling 1x1 convs:
    class maps k^2 (C + 1) channels, box maps 4 k^2 channels (class-agnostic regression);
  PS-RoI pooling of each RoI into k x k bins, bin (i, j) of output channel c reading the map
  (c * k + i) * k + j (the channel layout of kerasdet.ops.ps_roi_pool);
  average voting: the mean over the k x k bins gives the C + 1 class logits and the 4 box deltas.
There are no learnable layers after the pooling, so the cost per RoI is negligible.
"""
import keras
import tensorflow as tf

from kerasdet.heads.roi_extractor import RoIExtractor
from kerasdet.layers.roi_layers import keep_input_dtypes

__all__ = ["PSRoIHead", "average_vote", "PS_POOLINGS", "VOTINGS"]

PS_POOLINGS = ("ps_roi_pool", "ps_roi_align", "deform_ps_roi_pool")
VOTINGS = ("mean", "sum")


def average_vote(pooled, voting="mean"):
    """R-FCN voting: [..., k, k, C] pooled bins -> [..., C].

    "mean" is the averaging of the paper's text and of the reference implementation (an average
    pooling over the k x k bins); "sum" is the paper's eq. (2), r_c = sum_ij r_c(i, j). They differ
    by the factor k^2, which scales the logits and the gradient reaching each score map.
    """
    if voting == "mean":
        return tf.reduce_mean(pooled, axis=[-3, -2])
    if voting == "sum":
        return tf.reduce_sum(pooled, axis=[-3, -2])
    raise ValueError(f"average_vote: `voting` must be one of {VOTINGS}, got {voting!r}")


def _check_rois(rois):
    if rois.shape.rank != 3 or (rois.shape[-1] is not None and rois.shape[-1] != 4):
        raise ValueError(f"PSRoIHead: `rois` must be [B, R, 4], got shape {rois.shape}")


@keras.saving.register_keras_serializable(package="kerasdet")
class PSRoIHead(keras.layers.Layer):
    """Position-sensitive score / box maps and PS-RoI pooling with average voting.

    Args:
        num_classes: object classes C (the head scores C + 1 with background at index 0).
        pool_size: k, the bins per side (7 in the paper).
        stride: stride of the input feature map (spatial scale 1 / stride for the pooling).
        head_channels: width of the 1x1 conv + ReLU applied to the trunk feature before the
            score maps (1024 in the paper, on the dilated res5 output); 0 or None to skip it.
        pooling: "ps_roi_pool" (the paper's integer bins), "ps_roi_align" (bilinear samples) or
            "deform_ps_roi_pool" (Deformable ConvNets: offsets from a zero-initialized fc on a
            first PS-RoIAlign pooling, scaled by `gamma`; equal to "ps_roi_align" at init).
        sampling_ratio: samples per bin side of the bilinear poolings (0 = adaptive).
        gamma: offset scale of the deformable pooling (0.1 in the paper).
        score_init_std: std of the normal initializer of the two sibling convs (0.01 as in the
            reference implementation).
        voting: class-score voting, "mean" (default, average voting) or "sum" (the paper's
            eq. 2); see `average_vote`. The box deltas are always averaged (paper section 2).

    Call: head(feature [B, H, W, C_in], rois [B, R, 4]) -> (class logits [B, R, C + 1],
    box deltas [B, R, 1, 4]).
    """

    def __init__(self, num_classes, pool_size=7, stride=16, head_channels=1024,
                 pooling="ps_roi_pool", sampling_ratio=0, gamma=0.1, score_init_std=0.01,
                 voting="mean", **kwargs):
        super().__init__(**kwargs)
        keep_input_dtypes(self)  # the RoIs stay float32 under a mixed policy
        if int(num_classes) < 1:
            raise ValueError(f"PSRoIHead: `num_classes` must be >= 1, got {num_classes!r}")
        if int(pool_size) < 1:
            raise ValueError(f"PSRoIHead: `pool_size` must be >= 1, got {pool_size!r}")
        if int(stride) < 1:
            raise ValueError(f"PSRoIHead: `stride` must be >= 1, got {stride!r}")
        if pooling not in PS_POOLINGS:
            raise ValueError(f"PSRoIHead: `pooling` must be one of {PS_POOLINGS}, got {pooling!r}")
        if voting not in VOTINGS:
            raise ValueError(f"PSRoIHead: `voting` must be one of {VOTINGS}, got {voting!r}")
        self.voting = voting
        self.num_classes = int(num_classes)
        self.pool_size = int(pool_size)
        self.stride = int(stride)
        self.head_channels = int(head_channels or 0)
        self.pooling = pooling
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)
        self.score_init_std = float(score_init_std)

        k2 = self.pool_size ** 2
        init = keras.initializers.RandomNormal(stddev=self.score_init_std)
        self.reduce = None
        if self.head_channels:
            self.reduce = keras.layers.Conv2D(self.head_channels, 1, activation="relu",
                                              dtype=self.dtype_policy, name="reduce")
        self.cls_conv = keras.layers.Conv2D(k2 * (self.num_classes + 1), 1, kernel_initializer=init,
                                            dtype=self.dtype_policy, name="cls_maps")
        self.box_conv = keras.layers.Conv2D(4 * k2, 1, kernel_initializer=init,
                                            dtype=self.dtype_policy, name="box_maps")
        self.cls_pool = self._make_pool("cls_pool")
        self.box_pool = self._make_pool("box_pool")

    def _make_pool(self, name):
        return RoIExtractor(self.pool_size, strides=(self.stride,), method=self.pooling,
                            sampling_ratio=self.sampling_ratio, gamma=self.gamma,
                            dtype=self.dtype_policy, name=name)

    def build(self, features_shape, rois_shape=None):
        channels = features_shape[-1]
        if channels is None:
            raise ValueError("PSRoIHead: the channel dimension of the features must be known")
        shape = tuple(features_shape)
        if self.reduce is not None:
            self.reduce.build(shape)
            shape = shape[:-1] + (self.head_channels,)
        self.cls_conv.build(shape)
        self.box_conv.build(shape)
        k2 = self.pool_size ** 2
        self.cls_pool.build(shape[:-1] + (k2 * (self.num_classes + 1),))
        self.box_pool.build(shape[:-1] + (4 * k2,))

    def score_maps(self, features):
        """(class maps [B, H, W, k^2 (C+1)], box maps [B, H, W, 4 k^2])."""
        x = self.reduce(features) if self.reduce is not None else features
        return self.cls_conv(x), self.box_conv(x)

    def pool(self, features, rois):
        """The RoI feature extractor of an R-FCN box stage: score maps, then PS-RoI pooling of
        each RoI -> (class bins [B, R, k, k, C + 1], box bins [B, R, k, k, 4])."""
        _check_rois(rois)
        if not self.built:  # called directly, not through __call__
            self.build(features.shape)
        cls_maps, box_maps = self.score_maps(tf.cast(features, self.compute_dtype))
        rois = tf.cast(rois, tf.float32)
        return self.cls_pool(cls_maps, rois), self.box_pool(box_maps, rois)

    def vote(self, pooled, training=False):
        """The predictor: (class logits [B, R, C + 1], box deltas [B, R, 1, 4]) by voting (no
        weights: `training` changes nothing)."""
        cls_bins, box_bins = pooled
        # The paper aggregates the 4 k^2 box bins "by average voting" whatever the class voting.
        deltas = average_vote(box_bins, "mean")
        return average_vote(cls_bins, self.voting), deltas[:, :, tf.newaxis, :]

    def call(self, features, rois):
        return self.vote(self.pool(features, rois))

    def compute_output_shape(self, features_shape, rois_shape):
        b, r = rois_shape[0], rois_shape[1]
        return (b, r, self.num_classes + 1), (b, r, 1, 4)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, pool_size=self.pool_size, stride=self.stride,
                      head_channels=self.head_channels, pooling=self.pooling,
                      sampling_ratio=self.sampling_ratio, gamma=self.gamma,
                      score_init_std=self.score_init_std, voting=self.voting)
        return config
