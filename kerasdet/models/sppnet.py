"""SPP-net detector (He, Zhang, Ren & Sun, "Spatial Pyramid Pooling in Deep Convolutional Networks
for Visual Recognition", ECCV 2014; TPAMI 2015, section 4).

    image + ~2000 selective-search windows (kerasdet.data.proposals)
      -> the image resized so that its shorter side is s, for every s in S = {480, 576, 688, 864,
         1200}; conv5 of ZF-5 computed once per scale (not once per window, which is R-CNN's cost)
      -> each window pooled at one scale only: the s whose scaled window area is closest to
         224 x 224 (kerasdet.ops.spp.choose_scale)
      -> the window projected onto that scale's conv5 by the appendix's corner rule
         (kerasdet.ops.spp.project_to_features) and pooled by a {6, 3, 2, 1} pyramid (12800-d)
      -> fc6 / fc7 (4096) -> per-class linear SVMs on fc7 (scores), ridge box regression on the
         pooled conv5 vector (boxes), greedy per-class NMS at 0.3 (R-CNN's post-hoc stages,
         kerasdet.models.region_stages)

Single-scale mode: scales=(688,) (the paper reports 1-scale and 5-scale results).

Training (section 4.1 of the TPAMI paper):
1. The conv layers come from ImageNet pre-training (here: `from_classifier` on a trained
   kerasdet.models.spp_classifier.SPPClassifier) and stay fixed (`train_conv=False`); only fc6,
   fc7 and a new (K + 1)-way fc8 are fine-tuned on windows sampled per image: positives overlap a
   ground truth by IoU in [0.5, 1], negatives in [0.1, 0.5), 25 % positives per mini-batch.
   Fine-tuning fc layers only is what lets SPP-net compute conv5 once per image while training too.
2. SVMs with hard negative mining and 3. ridge box regression: `fit_region_stages` (the mixin).
   Negatives for the SVMs overlap every ground truth of the class by at most 0.3 (R-CNN's rule, as in
   the paper); the paper also drops a negative overlapping another negative by more than 0.7,
   which kerasdet.heads.region_svms does not do.

Coordinates: boxes are kerasdet's continuous pixel coordinates (pixel i spans [i, i + 1)) on the
network input. Per scale, each image's valid region is resized with tf.image.resize (bilinear)
to (round(h s / m), round(w s / m)), m = min(h, w), and padded to the batch's largest; the boxes
are scaled by the actual per-axis factors of that resize, then projected with the backbone's
stride and receptive-field offset (`feature_geometry`: ZF-5 conv5 is centred at input pixel
16 m + 20, i.e. 20.5 in continuous coordinates). The paper runs one image at a time; in a batch of
differently sized images the smaller ones are padded per scale, so conv features within a
receptive field of a padded border differ slightly from a one-image run (batch 1 is exact).
"""
import keras
import tensorflow as tf

from kerasdet import losses as kd_losses
from kerasdet.backbones import registry as backbones
from kerasdet.heads.proposals import ExternalProposals
from kerasdet.heads.roi_sampler import sample_rois
from kerasdet.models.base import Detector, batch_image_shapes, ground_truth, ground_truth_crowd
from kerasdet.models.region_stages import RegionStages
from kerasdet.models.spp_classifier import _BACKBONES
from kerasdet.ops import spp as spp_ops

__all__ = ["SPPNet", "feature_geometry", "SPP_DETECTION_SCALES"]

SPP_DETECTION_SCALES = spp_ops.SPP_SCALES


def feature_geometry(backbone, feature):
    """(stride S, offset O) such that pixel m of `feature` has its receptive field centred at input
    pixel S m + O (pixel indices, 0-based), found by walking the backbone's layers.

    Assumes a chain up to the feature (ZF-5 and the tiny backbone are chains). Each padding /
    conv / pool layer with left padding p, kernel k and stride s maps m to the previous layer's
    s m + (k - 1) / 2 - p; "same" padding with stride 1 and an odd kernel is centred (p = (k-1)/2).
    """
    target = backbone.output[feature]
    producer = target._keras_history.operation
    stride, offset = 1, 0.0
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.ZeroPadding2D):
            (top, _), (left, _) = layer.padding
            if top != left:
                raise ValueError(f"feature_geometry: asymmetric padding in {layer.name!r}")
            offset -= stride * top
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.MaxPooling2D,
                                keras.layers.AveragePooling2D)):
            kernel = layer.kernel_size if isinstance(layer, keras.layers.Conv2D) else layer.pool_size
            step = layer.strides
            if kernel[0] != kernel[1] or step[0] != step[1]:
                raise ValueError(f"feature_geometry: non-square kernel or stride in {layer.name!r}")
            k, s = int(kernel[0]), int(step[0])
            if layer.padding == "same":
                if s != 1 or k % 2 == 0:
                    raise ValueError(f"feature_geometry: 'same' padding needs stride 1 and an odd "
                                     f"kernel, got {layer.name!r} with kernel {k}, stride {s}")
            else:
                offset += stride * (k - 1) / 2.0
            stride *= s
        if layer is producer:
            return stride, offset
    raise ValueError(f"feature_geometry: no layer of {backbone.name!r} produces {feature!r}")


@keras.saving.register_keras_serializable(package="kerasdet")
class SPPNet(RegionStages, Detector):
    """SPP-net detector (see the module docstring).

    Args:
        num_classes: K foreground classes.
        backbone: "zf5" (the paper's ZF-5, conv5) or "tiny" (tests and synthetic entries).
        feature: backbone output to pool (default conv5 for ZF-5, "C3" for tiny).
        scales: shorter sides of the resized image (the paper's 5 scales; one value: single-scale).
        target: side of the window area each window's scale aims at (224: ZF-5's training size).
        levels: pyramid levels ({6, 3, 2, 1}: 50 bins).
        fc_dims: widths of fc6 / fc7 (4096, 4096).
        dropout: on fc6 / fc7 while fine-tuning.
        roi_batch_size, positive_fraction, foreground_iou, background_iou_low: fine-tuning windows
            per image, the positive share, positive IoU and the lower IoU of negatives.
        train_conv: fine-tune the conv layers too (False: the paper's fc-only fine-tuning).
        nms_iou, score_threshold, max_detections, pre_nms_top_k: test-time output.
        svm / ridge: dicts of kerasdet.heads.region_svms.SVMSettings / RidgeSettings fields.
        backbone_kwargs: extra constructor arguments of the backbone (e.g. input_normalization).
    """

    loss_names = ("cls",)
    predict_input_keys = ("images", "image_info", "proposals")
    proposal_reader = staticmethod(ExternalProposals.read)

    def __init__(self, num_classes, backbone="zf5", feature=None, scales=SPP_DETECTION_SCALES,
                 target=224.0, levels=spp_ops.SPP_LEVELS, fc_dims=(4096, 4096), dropout=0.5,
                 roi_batch_size=128, positive_fraction=0.25, foreground_iou=0.5,
                 background_iou_low=0.1, train_conv=False, nms_iou=0.3, score_threshold=0.05,
                 max_detections=100, pre_nms_top_k=6000, svm=None, ridge=None,
                 backbone_kwargs=None, seed=None, class_names=None, input_settings=None, **kwargs):
        super().__init__(num_classes, class_names=class_names, input_settings=input_settings, **kwargs)
        if backbone not in _BACKBONES:
            raise ValueError(f"SPPNet: `backbone` must be one of {sorted(_BACKBONES)}, got {backbone!r}")
        try:
            scales = tuple(int(s) for s in scales)
        except TypeError:
            raise TypeError(f"SPPNet: `scales` must be a sequence of ints, got {scales!r}") from None
        if not scales or min(scales) < 1:
            raise ValueError(f"SPPNet: `scales` must be non-empty positive ints, got {scales!r}")
        if not float(target) > 0:
            raise ValueError(f"SPPNet: `target` must be > 0, got {target!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"SPPNet: `dropout` must be in [0, 1), got {dropout!r}")
        if not 0.0 <= float(background_iou_low) < float(foreground_iou) <= 1.0:
            raise ValueError(f"SPPNet: need 0 <= background_iou_low < foreground_iou <= 1, got "
                             f"background_iou_low={background_iou_low!r}, "
                             f"foreground_iou={foreground_iou!r}")
        registered, default_feature = _BACKBONES[backbone]
        self.settings = dict(
            backbone=backbone, feature=feature or default_feature or "C3", scales=list(scales),
            target=float(target), levels=[int(n) for n in levels],
            fc_dims=[int(d) for d in fc_dims], dropout=float(dropout),
            roi_batch_size=int(roi_batch_size), positive_fraction=float(positive_fraction),
            foreground_iou=float(foreground_iou), background_iou_low=float(background_iou_low),
            train_conv=bool(train_conv), nms_iou=float(nms_iou),
            score_threshold=float(score_threshold), max_detections=int(max_detections),
            pre_nms_top_k=int(pre_nms_top_k), svm=dict(svm or {}), ridge=dict(ridge or {}),
            backbone_kwargs=dict(backbone_kwargs or {}), seed=seed)
        for key, value in self.settings.items():
            setattr(self, key, value)
        self.scales, self.levels = tuple(self.scales), tuple(self.levels)
        from kerasdet.heads.region_svms import RidgeSettings, SVMSettings

        self.svm_settings, self.ridge_settings = SVMSettings(**self.svm), RidgeSettings(**self.ridge)
        self.backbone = backbones.get(registered, **self.backbone_kwargs)
        if self.feature not in self.backbone.strides:
            raise ValueError(f"SPPNet: `feature` must be one of {list(self.backbone.strides)} for "
                             f"backbone {backbone!r}, got {self.feature!r}")
        # The paper's detector fine-tunes fc layers only; the frozen flag also keeps Keras from
        # building optimizer slots for the conv weights.
        self.backbone.trainable = self.train_conv
        stride, offset = feature_geometry(self.backbone, self.feature)
        if self.train_conv:
            # layers past the pooled feature (tiny's C4 / C5) get no gradient: freezing them keeps
            # the optimizer from building slots for them and from warning about it every step
            producer = self.backbone.output[self.feature]._keras_history.operation
            past = False
            for layer in self.backbone.layers:
                if past:
                    layer.trainable = False
                past = past or layer is producer
        self.feature_stride = stride
        # +0.5: kerasdet boxes are continuous (pixel i spans [i, i + 1)), the offset is in indices
        self.feature_offset = offset + 0.5
        self.channels = int(self.backbone.output[self.feature].shape[-1])
        # Same layers and names as SPPClassifier, so `from_classifier` maps fc6 / fc7 one to one.
        self.hidden = [(keras.layers.Dense(d, activation="relu", dtype=self.dtype_policy, name=f"fc{6 + i}"),
                        keras.layers.Dropout(self.dropout, name=f"drop{6 + i}"))
                       for i, d in enumerate(self.fc_dims)]
        self.classifier = keras.layers.Dense(self.num_classes + 1, dtype=self.dtype_policy,
                                             name=f"fc{6 + len(self.fc_dims)}")
        self._seed = seed if seed is not None else 0

    @classmethod
    def from_classifier(cls, classifier, num_classes, **kwargs):
        """An SPPNet whose conv layers and fc6 / fc7 are a trained SPPClassifier's (the paper's
        ImageNet-pre-trained ZF-5 + SPP network); fc8 is new, (K + 1)-way. `kwargs` are SPPNet's
        (backbone, feature, levels and fc_dims are taken from the classifier)."""
        for name in ("backbone", "feature", "levels", "fc_dims", "backbone_kwargs"):
            if name in kwargs:
                raise ValueError(f"SPPNet.from_classifier: `{name}` comes from the classifier, "
                                 f"got {name}={kwargs[name]!r}")
        model = cls(num_classes, backbone=classifier.backbone_name, feature=classifier.feature,
                    levels=classifier.levels, fc_dims=classifier.fc_dims,
                    backbone_kwargs=classifier.backbone_kwargs, **kwargs)
        model.build()
        model.backbone.set_weights(classifier.backbone.get_weights())
        if not classifier.hidden[0][0].built:
            raise ValueError("SPPNet.from_classifier: the classifier has no weights yet (call it "
                             "on an image batch or load its weights first)")
        for (mine, _), (theirs, _) in zip(model.hidden, classifier.hidden):
            mine.set_weights(theirs.get_weights())
        return model

    # -- regions --------------------------------------------------------------------------------
    def resized_shapes(self, image_shapes):
        """[S, B, 2] int32 valid (height, width) of every image at every scale: the shorter side
        becomes s, the longer one keeps the aspect ratio (rounded)."""
        shapes = tf.cast(image_shapes, tf.float32)
        shorter = tf.reduce_min(shapes, axis=-1, keepdims=True)
        factors = tf.constant(self.scales, tf.float32)[:, None, None] / shorter[None]
        return tf.cast(tf.maximum(tf.round(shapes[None] * factors), 1.0), tf.int32)

    def resize_images(self, images, image_shapes, size):
        """Every image's valid region resized to its `size` [B, 2] and padded (with the backbone's
        padding colour) to the batch's largest size."""
        fill = tf.constant(self.padding_value() or (0.0, 0.0, 0.0), tf.float32)
        valid = tf.cast(tf.round(image_shapes), tf.int32)
        canvas = tf.reduce_max(size, axis=0)

        def one(args):
            image, (h, w), (nh, nw) = args[0], tf.unstack(args[1]), tf.unstack(args[2])
            out = tf.image.resize(tf.cast(image[:h, :w], tf.float32), tf.stack([nh, nw])) - fill
            # padded with zeros after removing the fill colour, i.e. padded with the fill colour
            return tf.pad(out, [[0, canvas[0] - nh], [0, canvas[1] - nw], [0, 0]]) + fill

        # (parallel_iterations only means something in a graph; eagerly TF warns about it)
        return tf.map_fn(one, (images, valid, size),
                         parallel_iterations=1 if tf.executing_eagerly() else 4,
                         fn_output_signature=tf.TensorSpec([None, None, 3], tf.float32))

    def window_scales(self, rois, image_shapes):
        """int32 [B, R]: the index into `scales` each window is pooled at."""
        return spp_ops.choose_scale(rois, self.scales, self.target, image_size=image_shapes)

    def project(self, rois, image_shapes, resized, feature_size=None):
        """Feature-map cells [B, R, 4] of `rois` at one scale (`resized`: [B, 2] its image sizes)."""
        factor = tf.cast(resized, tf.float32) / tf.cast(image_shapes, tf.float32)  # (fy, fx)
        scaled = tf.cast(rois, tf.float32) * tf.tile(factor[:, None, ::-1], [1, 1, 2])
        return spp_ops.project_to_features(scaled, self.feature_stride, self.feature_offset,
                                           feature_size)

    def pooled_windows(self, images, rois, valid, image_shapes, training=False):
        """The SPP vector [B, R, C * sum(n^2)] of every window, each pooled from the conv features
        of its chosen scale; rows that are not `valid` are zero."""
        b, r = tf.shape(rois)[0], tf.shape(rois)[1]
        image_shapes = tf.cast(image_shapes, tf.float32)
        choice = tf.where(valid, self.window_scales(rois, image_shapes), -1)
        sizes = self.resized_shapes(image_shapes)
        dim = spp_ops.spp_output_dim(self.channels, self.levels)
        pooled = tf.zeros([b * r, dim], self.compute_dtype)
        flat_choice = tf.reshape(choice, [-1])
        image_index = tf.repeat(tf.range(b), r)
        for i in range(len(self.scales)):
            # conv features once per image and scale (all images of the batch at once), even at
            # scales no window chose: a tf.cond would save them at test time but not the shapes
            resized = self.resize_images(images, image_shapes, sizes[i])
            maps = self.backbone(tf.cast(resized, self.compute_dtype),
                                 training=training and self.train_conv)[self.feature]
            if not self.train_conv:
                # also skips the RoI SPP's arg-max backward pass, which nothing would use
                maps = tf.stop_gradient(maps)
            cells = tf.reshape(self.project(rois, image_shapes, sizes[i], tf.shape(maps)[1:3]), [-1, 4])
            rows = tf.where(tf.equal(flat_choice, i))[:, 0]
            values = spp_ops.roi_spatial_pyramid_pool(
                maps, tf.gather(cells, rows), tf.gather(image_index, rows), self.levels)
            pooled = tf.tensor_scatter_nd_update(pooled, rows[:, None], tf.cast(values, pooled.dtype))
        return tf.reshape(pooled, [b, r, dim])

    def head(self, pooled, training=False):
        """(fc7, logits) of pooled windows [..., D]."""
        x = pooled
        for dense, drop in self.hidden:
            x = drop(dense(x), training=training)
        fc7 = x
        return fc7, self.classifier(x)

    def region_features(self, images, rois, valid, image_shapes, training=False):
        """(fc7 [B, R, D], SPP vector [B, R, D5], logits [B, R, K + 1]); invalid rows are zero."""
        pooled = self.pooled_windows(images, rois, valid, image_shapes, training)
        fc7, logits = self.head(pooled, training)
        keep = valid[..., None]
        return (tf.where(keep, tf.cast(fc7, tf.float32), 0.0),
                tf.where(keep, tf.cast(pooled, tf.float32), 0.0),
                tf.where(keep, tf.cast(logits, tf.float32), 0.0))

    # -- training -------------------------------------------------------------------------------
    def compute_detection_losses(self, batch, training):
        images = self.input_images(batch)
        gt_boxes, gt_labels = ground_truth(batch)
        proposals, valid = self.proposal_reader(batch)
        sampled = sample_rois(proposals, valid, gt_boxes, gt_labels, num_samples=self.roi_batch_size,
                              positive_fraction=self.positive_fraction,
                              foreground_iou=self.foreground_iou,
                              background_iou_low=self.background_iou_low, seed=self._seed,
                              gt_crowd=ground_truth_crowd(batch))
        labels = sampled["labels"]
        _, _, logits = self.region_features(images, sampled["rois"], labels >= 0,
                                            batch_image_shapes(batch, images), training)
        return {"cls": kd_losses.softmax_cross_entropy_loss(labels, logits)}

    # Test time (`detect` / `call`) is R-CNN's, from RegionStages: every (window, class) pair
    # scored, per-class NMS, the kept boxes regressed.

    def region_feature_dims(self):
        return self.fc_dims[-1], spp_ops.spp_output_dim(self.channels, self.levels)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, **self.settings)
        return config
