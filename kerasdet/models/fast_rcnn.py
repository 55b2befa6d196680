"""Fast R-CNN (Girshick 2015): a detector on external region proposals.

One forward pass of the backbone per image, RoI max pooling (section 2.1) of every proposal from
the last conv map, fc layers, and the two sibling outputs (K + 1 softmax scores, per-class box
deltas) trained with the multi-task loss (eq. 1). Hierarchical sampling (section 2.3): each batch
holds N images and R RoIs in all (N = 2, R = 128: 64 per image), a quarter foreground with
IoU >= 0.5, the rest background with IoU in [0.1, 0.5).

Parts (kerasdet.models.two_stage): the backbone's `feature` map, external proposals and the same
box stage as Faster R-CNN. The proposals (selective search in the paper) travel in the batch as
`proposals` [B, P, 4]; rows with zero area are padding. `jittered_proposals` makes a stand-in for data sets that have none.
"""
import keras
import tensorflow as tf

from kerasdet import backbones as kd_backbones
from kerasdet import ops
from kerasdet.heads.box_head import BoxPredictor, TwoFCHead, truncated_svd_compress
from kerasdet.heads.box_outputs import OutputConfig
from kerasdet.heads.box_stage import BoxStage
from kerasdet.heads.part_config import part_config
from kerasdet.heads.proposals import ExternalProposals
from kerasdet.heads.roi_extractor import RoIExtractor
from kerasdet.heads.roi_sampler import RoIConfig
from kerasdet.models.two_stage import TwoStageDetector

__all__ = ["FastRCNN", "FastRCNNConfig", "jittered_proposals"]


@part_config(attribute="fast_rcnn_config")
class FastRCNNConfig:
    """backbone / backbone_config: registered backbone and its kwargs ("vgg16" is the paper's);
    feature: the backbone output to pool from ("conv5_3" for VGG-16, "C4" for ResNet / tiny);
    fc_dim / num_fcs / svd_ranks: the fc6 / fc7 head (4096 in the paper) and its optional
    truncated-SVD factorization (section 3.1)."""
    backbone: str = "vgg16"
    backbone_config: dict = None
    feature: str = "conv5_3"
    fc_dim: int = 4096
    num_fcs: int = 2
    svd_ranks: tuple = None


@keras.saving.register_keras_serializable(package="kerasdet")
class FastRCNN(TwoStageDetector):
    """Fast R-CNN on a single feature map.

    Arguments: FastRCNNConfig's, RoIConfig's (roi_*; the paper's defaults here: RoI max pooling to
    7 x 7, 64 RoIs per image (`roi_batch_size`; `rois_per_image` is its old name), background IoU
    in [0.1, 0.5)), OutputConfig's (test-time per-class NMS at 0.3 as in the paper's code) and
    `seed`.
    """

    loss_names = ("roi_cls", "roi_box")
    settings = (FastRCNNConfig, RoIConfig, OutputConfig)
    setting_defaults = {"roi_pooling": "roi_pool", "roi_output_size": 7, "roi_batch_size": 64,
                        "roi_background_iou_low": 0.1, "nms_iou": 0.3}
    renamed_settings = {"rois_per_image": "roi_batch_size"}

    @property
    def feature(self):
        return self.fast_rcnn_config.feature

    @property
    def roi_output_size(self):
        return int(self.roi_config.output_size)

    def build_parts(self):
        c, r = self.fast_rcnn_config, self.roi_config
        self.backbone = kd_backbones.get(c.backbone, **dict(c.backbone_config or {}))
        if c.feature not in self.backbone.strides:
            raise ValueError(f"Backbone {c.backbone!r} has no feature map {c.feature!r}; it has "
                             f"{list(self.backbone.strides)}.")
        self.roi_extractor = RoIExtractor(
            self.roi_output_size, strides=(self.backbone.strides[c.feature],), method=r.pooling,
            sampling_ratio=r.sampling_ratio, aligned=r.aligned, name="roi_extractor")
        self.box_head = TwoFCHead(int(c.fc_dim), int(c.num_fcs), ranks=c.svd_ranks,
                                  name="box_head")
        self.box_predictor = BoxPredictor(self.num_classes,
                                          class_agnostic=self.output_config.class_agnostic,
                                          name="box_predictor")
        stage = BoxStage(self.roi_extractor, self.box_predictor, self.box_head,
                         self.output_config.box_weights, r.foreground_iou)
        return dict(proposal_source=ExternalProposals(), box_stages=[stage])

    def features(self, images, training=False):
        """(no proposal maps, the pooled map)."""
        return [], self.backbone(images, training=training)[self.feature]

    def compress(self, ranks):
        """Truncated-SVD compression of the fc head (section 3.1): returns (model, report).

        The returned model shares every other weight with this one."""
        head, report = truncated_svd_compress(self.box_head, ranks)
        config = self.get_config()
        config["svd_ranks"] = list(ranks)
        compressed = FastRCNN.from_config(config)
        compressed.build()
        for old, new in ((self.backbone, compressed.backbone),
                         (self.box_predictor, compressed.box_predictor)):
            new.set_weights(old.get_weights())
        compressed.box_head.set_weights(head.get_weights())
        return compressed, report


def jittered_proposals(gt_boxes, gt_labels, image_shapes, num_proposals=128, num_near=8,
                       jitter=0.25, seed=None):
    """Proposals around the ground truth plus random boxes: a reproducible stand-in for selective
    search where a data set ships no proposals (tests, the synthetic set).

    For each ground-truth box, `num_near` copies with their centers moved and sides scaled by up to
    `jitter` of the size; the rest of the `num_proposals` slots are uniformly random boxes in the
    image. Padding ground truth (label -1) yields random boxes only.

    Args:
        gt_boxes [B, N, 4], gt_labels [B, N], image_shapes [B, 2]; seed: int or SeedGenerator.

    Returns:
        float32 [B, num_proposals, 4], clipped to the images.
    """
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    batch = tf.shape(gt_boxes)[0]
    image_shapes = tf.cast(image_shapes, tf.float32)
    near = tf.repeat(gt_boxes, num_near, axis=1)  # [B, N * num_near, 4]
    near_valid = tf.repeat(gt_labels >= 0, num_near, axis=1)
    size = tf.concat([near[..., 2:] - near[..., :2]] * 2, axis=-1)
    noise = keras.random.uniform(tf.shape(near), -jitter, jitter, seed=seed)
    near = near + noise * size
    h, w = image_shapes[:, 0:1, tf.newaxis], image_shapes[:, 1:2, tf.newaxis]
    corners = keras.random.uniform([batch, num_proposals, 2, 2], 0.0, 1.0, seed=seed)
    xs = tf.sort(corners[..., 0], axis=-1) * w
    ys = tf.sort(corners[..., 1], axis=-1) * h
    random_boxes = tf.stack([xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]], axis=-1)
    # Valid jittered boxes first, random ones filling the remaining slots.
    order = tf.argsort(tf.cast(near_valid, tf.int32), axis=1, direction="DESCENDING",
                       stable=True)
    near = tf.gather(near, order, batch_dims=1)
    count = tf.reduce_sum(tf.cast(near_valid, tf.int32), axis=1)
    pad = tf.maximum(num_proposals - tf.shape(near)[1], 0)
    near = tf.pad(near, [[0, 0], [0, pad], [0, 0]])[:, :num_proposals]
    take_near = tf.range(num_proposals)[tf.newaxis, :] < count[:, tf.newaxis]
    boxes = tf.where(take_near[..., tf.newaxis], near, random_boxes)
    return ops.clip_boxes(boxes, image_shapes)
