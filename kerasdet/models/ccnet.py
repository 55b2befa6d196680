"""CC-Net, the chained cascade network (Ouyang, Wang, Zhu and Wang, ICCV 2017), on the two-stage
parts: a trunk computed once per image, a proposal source (the RPN of Faster R-CNN, or external
proposals as the released Caffe code), and one box stage that is the chain of T cascade stages
(kerasdet.heads.chained_cascade.ChainedCascade): each stage pools the RoIs enlarged by its own
context scale from its own feature level, runs its own head (a 2fc head, or the ResNet res5 stage
in the C4 layout: the reference copies the upper trunk blocks per stage), and chains features
(h_t = h_{t-1} + alpha_t o_t) and classifier scores (c_t = c_{t-1} + beta_t f_t).

Training (the released SoftmaxWithCascadeLoss, cascade_type 1): every stage runs on the same
sampled RoIs; stage t's softmax loss counts the RoIs still in the cascade, and a stage that
rejects hands on only the RoIs whose probability of their own label is below its threshold (at
least keep_ratio of the positive and negative quotas stay, the hardest first). The loss of stage t
is divided by the number of RoIs it counts (the released proto's normalization is ambiguous).
Reference settings: 4 stages, context 1.0 / 1.5 / 1.8 / 2.7 with output sizes 28 / 22 / 16 / 14,
loss weights 0.006 / 0.006 / 0.006 / 1, thresholds 0.992 / 0.99 / 0.99 / 0.9, stage 1 without
rejection, 64 RoIs per image, a quarter foreground, box regression from h_1.
Test: final score softmax(c_T); a RoI whose background probability after a rejecting stage
exceeds its threshold is dropped there (its score is that stage's), later stages run only on the
survivors.
"""
import keras

from kerasdet import backbones as kd_backbones
from kerasdet.heads.box_head import TwoFCHead
from kerasdet.heads.box_stage import roi_wise
from kerasdet.heads.chained_cascade import ChainedCascade, ChainScale, ContextRoIExtractor
from kerasdet.heads.part_config import part_config
from kerasdet.heads.proposals import ExternalProposals
from kerasdet.models.faster_rcnn import FasterRCNN
from kerasdet.necks.fpn import FPN

__all__ = ["CCNet", "CCNetConfig"]

_FPN_LEVELS = ("C2", "C3", "C4", "C5")


@part_config(attribute="ccnet_config")
class CCNetConfig:
    """proposals: "rpn" (the shared RPN) or "external" (`proposals` [B, P, 4] in the batch).
    stage_context: each stage's context scale (its number of entries is T).
    stage_output_sizes: each stage's pooled size; None: 7 for the 2fc head, 14 for res5.
    stage_features: single-map layout only: the backbone output each stage pools from (None: the
        detector's `feature` for every stage); with FPN every stage routes its enlarged boxes
        over the pyramid.
    feature_chaining / score_chaining: the learned alpha / beta chains (off: h_t = o_t, c_t = f_t).
    rejection: the cascade loss's rejection in training (off: every stage counts every RoI).
    test_rejection: early rejection at test time (off: every stage on every RoI, same output).
    stage_thresholds / stage_rejects: each stage's threshold and whether it rejects.
    stage_loss_weights: factor on each stage's classification loss; loss_normalize: "sampled"
        (divide each stage's loss by the sampled RoIs) or "passing" (by the RoIs it counts);
        keep_ratio: the least
        fraction of each quota that stays; box_from: "first" (h_1) or "last" (h_T).
    gating: pairs (i, j) of 0-based stages, o_i <- o_i * sigmoid(o_j) (the reference prototxt's
        ((0, 1), (1, 3), (3, 2)) for A * sigmoid(B), B * sigmoid(D), D * sigmoid(C)); None: off."""
    proposals: str = "rpn"
    stage_context: tuple = (1.0, 1.5, 1.8, 2.7)
    stage_output_sizes: tuple = None
    stage_features: tuple = None
    feature_chaining: bool = True
    score_chaining: bool = True
    rejection: bool = True
    test_rejection: bool = True
    stage_thresholds: tuple = (0.992, 0.99, 0.99, 0.9)
    stage_rejects: tuple = (False, True, True, True)
    stage_loss_weights: tuple = (0.006, 0.006, 0.006, 1.0)
    keep_ratio: float = 0.1
    box_from: str = "first"
    gating: tuple = None
    # Why "sampled": dividing stage t's loss by the RoIs still in the cascade ("passing") makes
    # rejection a positive feedback. As the stages grow confident, fewer RoIs pass (down to the
    # keep_ratio floor, ~1/9 of the 128 sampled), so each survivor's gradient grows ~9x just when
    # the chained logits (c_T sums T classifiers on features h_t that sum t heads, so a step moves
    # them ~sum t^2 = 30x more than one Fast R-CNN classifier's) are large. Measured on the
    # synthetic set (tiny FPN, lr 0.02, 3 epochs): "passing" spiked in epoch 2 and collapsed to
    # background (held-out VOC mAP@0.5 0.0; 0.0 also with all loss weights 1, which diverged);
    # "sampled" trains smoothly (0.436; 0.519 without rejection). A rejected RoI now just leaves
    # the sum, as the reference's multiplication of the gradient by bp_map does.
    loss_normalize: str = "sampled"

    def __post_init__(self):
        t = len(self.stage_context)
        if t < 1:
            raise ValueError("`stage_context` must name at least one stage.")
        if self.proposals not in ("rpn", "external"):
            raise ValueError(f"`proposals` must be 'rpn' or 'external', got {self.proposals!r}.")
        if self.box_from not in ("first", "last"):
            raise ValueError(f"`box_from` must be 'first' or 'last', got {self.box_from!r}.")
        for name in ("stage_output_sizes", "stage_features", "stage_thresholds", "stage_rejects",
                     "stage_loss_weights"):
            value = getattr(self, name)
            if value is not None and len(value) != t:
                raise ValueError(f"`{name}` must have one entry per stage ({t}), got {value}.")
        if any(float(s) <= 0 for s in self.stage_context):
            raise ValueError(f"`stage_context` scales must be > 0, got {self.stage_context}.")
        if self.loss_normalize not in ("sampled", "passing"):
            raise ValueError(f"`loss_normalize` must be 'sampled' or 'passing', got "
                             f"{self.loss_normalize!r}.")
        if not 0.0 <= float(self.keep_ratio) <= 1.0:
            raise ValueError(f"`keep_ratio` must lie in [0, 1], got {self.keep_ratio}.")
        for pair in self.gating or ():
            if len(pair) != 2 or not all(0 <= int(i) < t for i in pair):
                raise ValueError(f"`gating` pairs must name two of the {t} stages, got {pair}.")

    @property
    def num_stages(self):
        return len(self.stage_context)


@keras.saving.register_keras_serializable(package="kerasdet")
class CCNet(FasterRCNN):
    """CC-Net. Arguments: FasterRCNN's (backbone, fpn, feature, box_head "2fc" | "res5", fc_dim,
    anchors, rpn_*, roi_* sampling and pooler, outputs; class-specific boxes) and CCNetConfig's."""

    settings = FasterRCNN.settings + (CCNetConfig,)
    setting_defaults = {"roi_batch_size": 64}
    fixed_settings = {"class_agnostic": False}
    excluded_settings = ("roi_ohem", "roi_ohem_nms_iou", "roi_output_size")

    @property
    def loss_names(self):
        rpn = ("rpn_cls", "rpn_box") if self.ccnet_config.proposals == "rpn" else ()
        return rpn + tuple(f"stage{t + 1}_cls" for t in range(self.ccnet_config.num_stages)) + \
            ("box",)

    @property
    def num_stages(self):
        return self.ccnet_config.num_stages

    @property
    def chain(self):
        return self.box_stages[0]

    # -- parts ----------------------------------------------------------------------------------
    def build_parts(self):
        if self.ccnet_config.proposals == "rpn":
            return super().build_parts()
        c = self.faster_rcnn_config
        self.anchor_strides = (4, 8, 16, 32, 64) if c.fpn else ()
        self.backbone = kd_backbones.get(c.backbone, **self.backbone_config)
        self.neck = FPN(self.fpn_channels, input_levels=_FPN_LEVELS, name="fpn") if c.fpn else None
        return dict(proposal_source=ExternalProposals(), box_stages=self.build_box_stages())

    @property
    def stage_feature_names(self):
        """Single map: the backbone output of each stage; FPN: None per stage (the pyramid)."""
        c = self.ccnet_config
        if self.use_fpn:
            return (None,) * c.num_stages
        return tuple(c.stage_features or (self.feature,) * c.num_stages)

    @property
    def roi_strides(self):
        return self.anchor_strides[:4] if self.use_fpn else None

    def build_box_stages(self):
        c, r, t_all = self.ccnet_config, self.roi_config, range(self.ccnet_config.num_stages)
        if self.box_head_kind not in ("2fc", "res5"):
            raise ValueError(f"`box_head` must be '2fc' or 'res5', got {self.box_head_kind!r}.")
        default_size = 14 if self.box_head_kind == "res5" else 7
        sizes = c.stage_output_sizes or (default_size,) * c.num_stages
        names = self.stage_feature_names
        for name in names:
            if name is not None and name not in self.backbone.strides:
                raise ValueError(f"Backbone {self.faster_rcnn_config.backbone!r} has no feature "
                                 f"map {name!r}; it has {list(self.backbone.strides)}.")
        sources, heads, classifiers, alphas, betas = [], [], [], [], []
        for t in t_all:
            strides = self.roi_strides or (self.backbone.strides[names[t]],)
            source = ContextRoIExtractor(int(sizes[t]), context_scale=float(c.stage_context[t]),
                                         strides=strides, method=r.pooling,
                                         sampling_ratio=r.sampling_ratio, aligned=r.aligned,
                                         gamma=self.deform_config.gamma,
                                         name=f"stage{t + 1}_roi_extractor")
            if self.box_head_kind == "res5":
                layer = kd_backbones.ResNetConv5Head(
                    frozen_bn=self.backbone_config.get("frozen_bn", True),
                    input_channels=self.backbone.output[names[t]].shape[-1], global_pool=True,
                    name=f"stage{t + 1}_res5_head")
                head = roi_wise(layer)
            else:
                layer = head = TwoFCHead(int(self.faster_rcnn_config.fc_dim),
                                         name=f"stage{t + 1}_head")
            classifier = keras.layers.Dense(
                self.num_classes + 1, kernel_initializer=keras.initializers.RandomNormal(
                    stddev=0.01), name=f"stage{t + 1}_cls_score")
            # alpha_t: per-channel, so it follows the layers' dtype policy; beta_t scales float32
            # scores (the chained logits stay float32 under a mixed policy).
            alpha = ChainScale(name=f"stage{t + 1}_alpha") \
                if c.feature_chaining and t > 0 else None
            beta = ChainScale(dtype="float32", name=f"stage{t + 1}_beta") \
                if c.score_chaining else None
            for attr, value in (("roi_extractor", source), ("head", layer),
                                ("cls_score", classifier), ("alpha", alpha), ("beta", beta)):
                if value is not None:
                    setattr(self, f"stage{t + 1}_{attr}", value)
            sources.append(source)
            heads.append(head)
            classifiers.append(classifier)
            alphas.append(alpha)
            betas.append(beta)
        self.bbox_pred = keras.layers.Dense(
            4 * self.num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
            name="bbox_pred")
        chain = ChainedCascade(
            self.num_classes, sources, names, heads, classifiers, alphas, betas, self.bbox_pred,
            thresholds=c.stage_thresholds, rejects=c.stage_rejects,
            loss_weights=c.stage_loss_weights, keep_ratio=c.keep_ratio, rejection=c.rejection,
            test_rejection=c.test_rejection, box_from=c.box_from, gating=c.gating,
            normalize=c.loss_normalize,
            box_weights=self.output_config.box_weights, foreground_iou=r.foreground_iou)
        return [chain]

    def features(self, images, training=False):
        """(RPN feature maps, RoI maps: the FPN levels, or {backbone output name: map})."""
        outputs = self.backbone(images, training=training)
        if self.use_fpn:
            pyramid = self.neck({k: outputs[k] for k in _FPN_LEVELS}, training=training)
            levels = [pyramid[f"P{k}"] for k in range(2, 7)]
            return levels, levels[:4]
        maps = {name: outputs[name] for name in set(self.stage_feature_names)}
        rpn_maps = [outputs[self.feature]] if self.ccnet_config.proposals == "rpn" else []
        return rpn_maps, maps

    # -- the two-stage hooks --------------------------------------------------------------------
    @property
    def quotas(self):
        """(positive, negative) RoIs per image of the sampler: the rejection rule's quotas."""
        positives = self.roi_config.max_positives
        return positives, int(self.roi_config.batch_size) - positives

    def box_losses(self, roi_features, sampled, gt_boxes, gt_labels, image_shapes,
                   gt_crowd=None, training=False):
        losses, _ = self.chain.losses(roi_features, sampled, *self.quotas, training=training)
        return losses, sampled

    def detect_boxes(self, roi_features, proposals, valid, image_shapes, training=False):
        probs, deltas, _ = self.chain.infer(roi_features, proposals, valid, training)
        return self.output_config.detections(probs, deltas, proposals, valid, image_shapes,
                                             self.chain.box_weights)

    def refine(self, roi_features, proposals, image_shapes, training=False):
        probs, deltas, _ = self.chain.infer(roi_features, proposals,
                                            proposals[..., 2] > proposals[..., 0], training)
        return probs, deltas, proposals, self.chain.box_weights
