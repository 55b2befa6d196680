"""The single-map paper layouts learn on the synthetic shapes: R-FCN with one dilated stride-16
map and mean voting, and Faster R-CNN C4 with the ResNet conv5 (res5) head.

Both run on the tiny trunk trained from scratch, so what made them learn is settings, not model
code: trunk channels (16, 32, 64, 128, 128) instead of (8, 16, 32, 48, 64), anchors of 16-64
pixels at stride 16 (the objects are 16-64 pixels on 128 x 128 images; the C4 defaults are
128-512), and for R-FCN k = 3 bins per side (an 8 x 8 map), score maps initialised with std 0.1
and learning rate 0.04 (see `single_map_rfcn_settings`). The full-width res5 head (2048 channels)
costs far more per RoI than the tiny trunk, so its test trains 2 epochs and asserts what that
reaches (mAP@0.5 ~0.03); benchmarks/single_map_layouts.py trains it longer (0.81 after 8 epochs).
"""
import numpy as np

from kerasdet.models.faster_rcnn import FasterRCNN
from kerasdet.models.rfcn import RFCN
from learning import fit_and_evaluate

WIDE_TINY = (16, 32, 64, 128, 128)
RFCN_LEARNING_RATE = 0.04
C4_RES5_LEARNING_RATE = 0.02


def _single_map_common(seed):
    return dict(anchor_strides=(16,), anchor_sizes=((16, 32, 64),), rpn_batch_size=128,
                rpn_pre_nms_top_k_train=500, rpn_post_nms_top_k_train=300,
                rpn_pre_nms_top_k_test=300, rpn_post_nms_top_k_test=100, seed=seed)


def single_map_rfcn_settings(seed=0):
    """R-FCN's layout at toy size: the tiny trunk with a dilated C5 (stride 1, dilation 2, so C4
    and C5 are both at stride 16, as the paper's dilated res5), RPN on C4, position-sensitive maps
    on C5, PS-RoIAlign, mean voting for classes and boxes.

    k = 3 rather than the paper's 7: an object covers one to four cells of the 8 x 8 map. Mean
    voting scales each score map's gradient by 1 / k^2, so the maps start at std 0.1 instead of
    0.01 (the gradient reaching the shared 1x1 conv and the trunk is then that of summed voting
    at std 0.01) and the learning rate is 0.04. Measured with lr 0.02 (std 0.1, seed 0): 0.013
    after 8 epochs, 0.765 after 20; with std 0.3 and lr 0.02: 0.583 after 14."""
    return dict(backbone="tiny_dcn",
                backbone_config=dict(deformable_stages=(), output_stride=16, channels=WIDE_TINY),
                feature_level="C5", rpn_level="C4", pool_size=3, ps_pooling="ps_roi_align",
                head_channels=128, voting="mean", score_init_std=0.1, roi_batch_size=128,
                **_single_map_common(seed))


def c4_res5_settings(seed=0):
    """Faster R-CNN C4 on the tiny trunk: RPN and RoIAlign on C4 (stride 16), the res5 head
    (torchvision layer4 at full width, stride 2 in its first block, average pooling). RoIs are
    pooled to 4 x 4 (2 x 2 after the head's stride), not 14 x 14: the objects span one to four
    cells of C4, and the head's cost grows with the pooled area. 32 RoIs per image."""
    return dict(backbone="tiny", backbone_config=dict(channels=WIDE_TINY), fpn=False,
                box_head="res5", roi_output_size=4, roi_batch_size=32, **_single_map_common(seed))


def test_single_map_rfcn_with_mean_voting_learns(synthetic_data):
    """Measured (14 epochs, lr 0.04; seeds 0 / 1 / 2 = conftest's global seed and sampling seed
    0, then 1235 / 1 and 1236 / 2): held-out VOC mAP@0.5 0.827 / 0.843 / 0.902."""
    model = RFCN(3, **single_map_rfcn_settings())
    history, results, seconds = fit_and_evaluate(model, synthetic_data, epochs=14,
                                                 learning_rate=RFCN_LEARNING_RATE)
    losses = history["loss"]
    print(f"R-FCN single dilated stride-16 map, mean voting: mAP@0.5 {results['voc']['mAP']:.3f} "
          f"after {seconds:.0f}s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    config = model.get_config()
    assert config["voting"] == "mean" and config["fpn"] is False
    assert model.backbone.strides[config["feature_level"]] == 16
    assert losses[-1] < 0.4 * losses[0]
    assert results["voc"]["mAP"] >= 0.7


def test_c4_model_with_res5_head_learns(synthetic_data):
    """What the full-width res5 head reaches in a test budget. Measured (2 epochs, lr 0.02; seeds
    0 / 1 as in the R-FCN test): held-out VOC mAP@0.5 0.027 / 0.032, loss 1.299 -> 0.920 and
    1.403 -> 0.964. With more epochs it learns (benchmarks/single_map_layouts.py, seed 0):
    mAP@0.5 0.315 after 4 epochs and 0.809 after 8 (630 s of training)."""
    model = FasterRCNN(3, **c4_res5_settings())
    history, results, seconds = fit_and_evaluate(model, synthetic_data, epochs=2,
                                                 learning_rate=C4_RES5_LEARNING_RATE)
    losses = history["loss"]
    print(f"Faster R-CNN C4 + res5 head: mAP@0.5 {results['voc']['mAP']:.3f} after {seconds:.0f}s, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.8 * losses[0]
    assert results["voc"]["mAP"] >= 0.01


def _res5_weight_shapes(input_channels):
    """torchvision layer4 (3 bottlenecks of 512 planes, expansion 4) as {layer: shapes}."""
    shapes = {}
    for block in range(3):
        prefix = f"layer4_{block}"
        shapes[f"{prefix}_conv1"] = [(1, 1, input_channels if block == 0 else 2048, 512)]
        shapes[f"{prefix}_conv2"] = [(3, 3, 512, 512)]
        shapes[f"{prefix}_conv3"] = [(1, 1, 512, 2048)]
        for bn, width in (("bn1", 512), ("bn2", 512), ("bn3", 2048)):
            shapes[f"{prefix}_{bn}"] = [(width,)] * 4  # gamma, beta, moving mean / variance
    shapes["layer4_0_downsample_0"] = [(1, 1, input_channels, 2048)]
    shapes["layer4_0_downsample_1"] = [(2048,)] * 4
    return shapes


def test_c4_res5_head_is_the_torchvision_layer4_stage():
    """The C4 model named by its head: box_head="res5" builds the conv5 stage, run per RoI."""
    channels = (8, 16, 32, 48, 64)
    model = FasterRCNN(2, backbone="tiny", backbone_config=dict(channels=channels), fpn=False,
                       box_head="res5", anchor_sizes=((32, 64, 128),), rpn_pre_nms_top_k_test=50,
                       rpn_post_nms_top_k_test=20)
    out = model.predict_on_batch(np.zeros([1, 64, 64, 3], np.float32))
    assert out["scores"].shape == (1, 100)

    head = {}
    for weight in model.weights:
        layer = weight.path.split("/")[-2]
        if layer.startswith("layer4_"):
            head.setdefault(layer, []).append(tuple(weight.shape))
    want = _res5_weight_shapes(input_channels=channels[3])  # pooled from C4
    assert {k: sorted(v) for k, v in head.items()} == {k: sorted(v) for k, v in want.items()}

    # Everything else is known exactly too: the trunk's five 3x3 convs, the RPN (3x3 conv to 512,
    # 9 objectness and 36 box outputs), and the predictor on the head's 2048 pooled channels
    # (K + 1 = 3 logits, 4 K = 8 deltas). No fc layer exists.
    trunk = sum(9 * cin * cout + cout for cin, cout in zip((3,) + channels[:-1], channels))
    rpn = (9 * channels[3] * 512 + 512) + (512 * 9 + 9) + (512 * 36 + 36)
    res5 = sum(int(np.prod(s)) for shapes in want.values() for s in shapes)
    predictor = (2048 * 3 + 3) + (2048 * 8 + 8)
    assert model.count_params() == trunk + rpn + res5 + predictor
