"""Mask R-CNN (He et al. 2017): Faster R-CNN plus a mask branch on RoIAlign features.

Training (paper section 3.1): the mask loss is computed on the foreground RoIs of the box
branch's sample only, against the matched ground-truth mask cropped to the RoI at 28 x 28 and
binarized at 0.5; the loss is the per-pixel sigmoid cross entropy of the ground-truth class's
channel (`kerasdet.losses.mask_loss`). Inference (section 3.1, "Inference"): the box branch's top
100 detections after NMS go through the mask branch; each takes its class's channel, sigmoid, and
is pasted into the image and binarized at 0.5 inside the graph, so an exported SavedModel returns
the masks too. The branch is kerasdet.heads.mask_head.MaskBranch, shared with Cascade Mask R-CNN.
"""
import keras

from kerasdet.heads.mask_head import MaskBranch, MaskConfig, MaskHead
from kerasdet.heads.roi_extractor import RoIExtractor
from kerasdet.models.faster_rcnn import FasterRCNN

__all__ = ["MaskRCNN", "build_mask_branch"]


def build_mask_branch(detector):
    """The mask branch of `detector` (its layers become the detector's `mask_roi_extractor` and
    `mask_head`): RoIAlign on the detector's RoI feature maps, at most the RoI sample's
    foreground quota (capped by `mask_rois_per_image`) per image in the loss."""
    m = detector.mask_config
    detector.mask_roi_extractor = RoIExtractor(
        m.pool_size, strides=detector.roi_strides, method="roi_align",
        sampling_ratio=m.sampling_ratio, aligned=detector.roi_config.aligned,
        name="mask_roi_extractor")
    detector.mask_head = MaskHead(detector.num_classes, channels=m.channels,
                                  num_convs=m.num_convs, name="mask_head")
    return MaskBranch(detector.mask_roi_extractor, detector.mask_head, m,
                      m.max_rois(detector.roi_config.max_positives))


@keras.saving.register_keras_serializable(package="kerasdet")
class MaskRCNN(FasterRCNN):
    """Mask R-CNN: every FasterRCNN argument, plus the mask branch's (MaskConfig: mask_pool_size,
    mask_sampling_ratio, mask_channels, mask_num_convs, mask_rois_per_image, mask_threshold) and
    `paste_masks`.

    With fpn=True (the default) RoIs are pooled for the mask branch from P2..P5 by the FPN level
    rule; with fpn=False from the single C4 map (whatever the box head), still through the FPN-style
    head (not the paper's res5-shared C4 mask head).

    paste_masks: True: predict returns image-sized masks `masks` uint8 [B, K, H, W] (0/1 on the
        padded input canvas, zeros in empty detection slots). False: the per-box grids `masks`
        float32 [B, K, 28, 28] of probabilities (kerasdet.evaluation pastes those; cheaper for
        large images). kerasdet.export switches it off while tracing.
    """

    loss_names = FasterRCNN.loss_names + ("mask",)
    settings = FasterRCNN.settings + (MaskConfig,)

    def __init__(self, num_classes, paste_masks=True, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.paste_masks = bool(paste_masks)

    def build_parts(self):
        return dict(super().build_parts(), mask_branch=build_mask_branch(self))

    @property
    def mask_size(self):
        return self.mask_config.mask_size

    @property
    def mask_threshold(self):
        return self.mask_config.threshold

    @property
    def max_mask_rois(self):
        return self.mask_branch.max_rois

    def get_config(self):
        return dict(super().get_config(), paste_masks=self.paste_masks)
