"""The base of the single-shot detectors (RefineDet; an SSD-style model would be a subclass that
runs one dense head on the source maps).

    images -> backbone -> source maps (+ per-map L2Normalization) -> [neck] -> dense heads
           anchors per source map (AnchorGenerator, 4 x stride by default)
    training: match ground truth to anchors (kerasdet.heads.single_shot), multibox loss with hard
              negative mining (kerasdet.losses.multibox_loss);
    test:     decode, [filter], top-k, per-class NMS (kerasdet.heads.single_shot.dense_detections).

A subclass states its settings as part configs (kerasdet.heads.part_config, as the region-based
detectors do: flat constructor arguments, `get_config` derived from them), builds its layers in
`build_parts()` as attributes (their names are the weight paths) and implements
`compute_detection_losses` / `detect`.
"""
import tensorflow as tf

from kerasdet import backbones as kd_backbones
from kerasdet import ops
from kerasdet.heads.part_config import flat_settings, part_config, read_settings
from kerasdet.heads.single_shot import dense_detections
from kerasdet.layers.normalization import L2Normalization
from kerasdet.models.base import Detector, ground_truth, ground_truth_crowd

__all__ = ["SingleShotDetector", "SingleShotOutputConfig", "DEFAULT_SOURCE_LAYERS"]

# The source maps of each backbone: strides 8 / 16 / 32 / 64 for the RefineDet layouts (VGG-16
# conv4_3, conv5_3, fc7, conv6_2; ResNet res3b3, res4b22, res5c, res6); the test backbone's four
# levels are at strides 4..32.
DEFAULT_SOURCE_LAYERS = {
    "vgg16_refinedet": ("conv4_3", "conv5_3", "fc7", "conv6_2"),
    "vgg16_reduced": ("conv4_3", "conv5_3", "fc7", "conv6_2"),
    "resnet50": ("C3", "C4", "C5", "C6"),
    "resnet101": ("C3", "C4", "C5", "C6"),
    "tiny": ("C2", "C3", "C4", "C5"),
}
# ParseNet L2 normalization with learned scales on VGG-16's conv4_3 (10) and conv5_3 (8), whose
# activations are much larger than the deeper maps' (SSD sec. 3.1; RefineDet sec. 4).
DEFAULT_L2_SCALES = {"vgg16_refinedet": (10.0, 8.0, 0.0, 0.0), "vgg16_reduced": (10.0, 8.0, 0.0, 0.0)}


@part_config(attribute="output_config")
class SingleShotOutputConfig:
    """Test-time settings (RefineDet sec. 3 "Inference"): the top `pre_nms_top_k` (box, class)
    scores per image over all classes, per-class NMS at `nms_iou`, the top `max_detections` per
    image, scores above `score_threshold`. `per_class_top_k` (the reference code's 1000, with
    max_detections 500) replaces the per-image top-k by a per-class one."""
    score_threshold: float = 0.01
    nms_iou: float = 0.45
    pre_nms_top_k: int = 400
    max_detections: int = 200
    per_class_top_k: int = None

    def detections(self, boxes, class_probs, image_shapes, filtered=None):
        return dense_detections(boxes, class_probs, image_shapes, filtered,
                                int(self.max_detections), int(self.pre_nms_top_k),
                                float(self.nms_iou), float(self.score_threshold),
                                None if self.per_class_top_k is None else int(self.per_class_top_k))


class SingleShotDetector(Detector):
    """Settings plumbing, backbone source maps and anchors shared by the single-shot detectors.

    Subclasses set `settings` (part config classes) and implement `build_parts()`,
    `compute_detection_losses` and `detect`.
    """

    settings = ()
    setting_defaults = {}

    def __init__(self, num_classes, seed=None, **kwargs):
        configs = read_settings(self.settings, kwargs, self.setting_defaults, owner=type(self).__name__)
        self._setting_attributes = tuple(cls.attribute for cls in configs)
        for cls, config in configs.items():
            setattr(self, cls.attribute, config)
        super().__init__(num_classes, **kwargs)  # keeps image_info float32 (keep_input_dtypes)
        self.seed = seed
        self.build_parts()

    def build_parts(self):
        raise NotImplementedError

    # -- shared pieces --------------------------------------------------------------------------
    def build_backbone_sources(self, backbone, backbone_config, source_layers, l2_scales):
        """Creates `self.backbone` and the L2Normalization layers; returns the source names."""
        self.backbone = kd_backbones.get(backbone, **dict(backbone_config or {}))
        if source_layers is None:
            if backbone not in DEFAULT_SOURCE_LAYERS:
                raise ValueError(f"{type(self).__name__}: give `source_layers` for backbone "
                                 f"{backbone!r} (its outputs: {list(self.backbone.strides)}).")
            source_layers = DEFAULT_SOURCE_LAYERS[backbone]
        source_layers = tuple(source_layers)
        missing = [n for n in source_layers if n not in self.backbone.strides]
        if missing:
            raise ValueError(f"{type(self).__name__}: backbone {backbone!r} has no output(s) "
                             f"{missing}; it has {list(self.backbone.strides)}.")
        if l2_scales is None:
            l2_scales = DEFAULT_L2_SCALES.get(backbone, (0.0,) * len(source_layers))
        if len(l2_scales) != len(source_layers):
            raise ValueError(f"{type(self).__name__}: {len(l2_scales)} l2_norm_scales for "
                             f"{len(source_layers)} source layers.")
        self.source_layers = source_layers
        self.l2_norms = [L2Normalization(float(s), name=f"{n}_norm") if s else None
                         for n, s in zip(source_layers, l2_scales)]
        return source_layers

    def build_anchor_generator(self, anchor_config, size_per_stride=4.0):
        """Anchors on the source maps' strides; sizes default to `size_per_stride` x stride."""
        a = anchor_config
        strides = tuple(a.strides or [self.backbone.strides[n] for n in self.source_layers])
        sizes = a.sizes or tuple((size_per_stride * s,) for s in strides)
        self.anchor_generator = ops.AnchorGenerator(strides, sizes, tuple(a.ratios),
                                                    offset=float(a.offset), rounded=bool(a.rounding))
        counts = self.anchor_generator.num_anchors_per_location
        if len(set(counts)) != 1:
            raise ValueError("Every level must have the same number of anchors per location.")
        return counts[0]

    def source_maps(self, images, training=False):
        """The backbone's source maps, L2-normalized where configured, shallowest first."""
        outputs = self.backbone(images, training=training)
        maps = [outputs[n] for n in self.source_layers]
        return [norm(x) if norm is not None else x for norm, x in zip(self.l2_norms, maps)]

    def anchors(self, maps):
        """[N, 4] float32 anchors of the given maps (their real shapes), concatenated."""
        return tf.concat(self.anchor_generator([tf.shape(x)[1:3] for x in maps]), axis=0)

    def num_anchors_for_image(self, image_size):
        """Number of anchors of an (H, W) input: what the backbone's maps give at that size."""
        maps = self.source_maps(tf.zeros([1, image_size[0], image_size[1], 3], self.compute_dtype))
        return int(self.anchors(maps).shape[0])

    @staticmethod
    def ground_truth(batch):
        """(boxes, labels) padded with label -1; COCO crowd regions are not matched against."""
        boxes, labels = ground_truth(batch)
        return boxes, tf.where(ground_truth_crowd(batch), -1, labels)

    # -- config ---------------------------------------------------------------------------------
    @property
    def part_configs(self):
        return tuple(getattr(self, name) for name in self._setting_attributes)

    def get_config(self):
        config = super().get_config()
        config.update(flat_settings(self.part_configs))
        config["seed"] = self.seed
        return config

