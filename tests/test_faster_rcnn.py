import numpy as np
import pytest

from kerasdet.models.faster_rcnn import FasterRCNN
from detector_checks import check_predict_on_mixed_sizes, check_train_step_without_objects
from learning import fit_and_evaluate, tiny_fpn_settings


def test_faster_rcnn_fpn_learns_the_synthetic_shapes(synthetic_data):
    model = FasterRCNN(3, **tiny_fpn_settings())
    history, results, seconds = fit_and_evaluate(model, synthetic_data, epochs=5)
    losses = history["loss"]
    print(f"Faster R-CNN FPN tiny: mAP@0.5 {results['voc']['mAP']:.3f} after {seconds:.0f}s, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.6 * losses[0]
    assert results["voc"]["mAP"] >= 0.5


def test_predict_on_mixed_sizes_and_empty_images():
    check_predict_on_mixed_sizes(FasterRCNN(3, **tiny_fpn_settings()))


def test_train_step_handles_a_batch_without_objects():
    check_train_step_without_objects(FasterRCNN(3, **tiny_fpn_settings()))


def test_c4_model_with_res5_head_runs():
    model = FasterRCNN(2, backbone="tiny", fpn=False, box_head="res5",
                       anchor_sizes=((32, 64, 128),), rpn_pre_nms_top_k_test=50,
                       rpn_post_nms_top_k_test=20)
    out = model.predict_on_batch(np.zeros([1, 64, 64, 3], np.float32))
    assert out["scores"].shape == (1, 100)
    # The conv5 stage on 14 x 14 RoIs, as the C4 layout of the paper's ResNet variant.
    assert model.box_head.name == "res5_head" and model.roi_output_size == 14


def test_config_round_trip_rebuilds_the_same_model():
    model = FasterRCNN(3, **tiny_fpn_settings())
    model.build()
    clone = FasterRCNN.from_config(model.get_config())
    clone.build()
    assert clone.count_params() == model.count_params()


def conv_params(k, c_in, c_out):
    return k * k * c_in * c_out + c_out


def resnet50_fpn_faster_rcnn_params(num_classes):
    """Faster R-CNN R50-FPN from its architecture: torchvision's resnet50 without fc (23,508,032,
    BatchNorm statistics excluded: buffers there), FPN (1x1 laterals from 256 / 512 / 1024 / 2048
    channels and four 3x3 outputs, 256-d; P6 is a parameter-free subsampling), the RPN (3x3 conv,
    3 anchors: 3 logits and 12 deltas), fc6 on 7 x 7 x 256, fc7 (1024), the predictor (K + 1
    scores, 4 K deltas)."""
    fpn = sum(conv_params(1, c, 256) for c in (256, 512, 1024, 2048)) + 4 * conv_params(3, 256, 256)
    rpn = conv_params(3, 256, 256) + conv_params(1, 256, 3) + conv_params(1, 256, 12)
    head = conv_params(1, 7 * 7 * 256, 1024) + conv_params(1, 1024, 1024)
    predictor = conv_params(1, 1024, num_classes + 1) + conv_params(1, 1024, 4 * num_classes)
    return 23_508_032 + fpn + rpn + head + predictor


# ResNet-50's BatchNorm scales and shifts: 2 x 26,560 channels (stem 64; per stage, blocks x
# (width + width + 4 width) plus the 4 width of the downsample: 3, 4, 6, 3 blocks of width 64..512).
RESNET50_BN_AFFINE = 2 * (64 + sum(n * 6 * w + 4 * w
                                   for n, w in zip((3, 4, 6, 3), (64, 128, 256, 512))))


@pytest.mark.parametrize("num_classes, torchvision_count", [(90, 41_755_286)])
def test_resnet50_fpn_parameter_count_matches_the_standard_architecture(num_classes,
                                                                        torchvision_count):
    # torchvision's fasterrcnn_resnet50_fpn at 91 outputs has 41,755,286 parameters. Its
    # FrozenBatchNorm2d holds the BN scales and shifts as buffers (53,120 not counted there,
    # counted here: our BN gamma / beta are weights), and its box predictor also regresses the
    # background class (4 (1024 + 1) = 4,100 more than ours). BN statistics are left out of both.
    expected = resnet50_fpn_faster_rcnn_params(num_classes)
    assert RESNET50_BN_AFFINE == 53_120
    assert expected == torchvision_count + RESNET50_BN_AFFINE - 4 * (1024 + 1) == 41_804_306
    model = FasterRCNN(num_classes, backbone="resnet50", backbone_config={"freeze_at": 0})
    model.build((1, 64, 64, 3))
    bn_stats = sum(int(np.prod(v.shape)) for v in model.weights
                   if "moving_mean" in v.path or "moving_variance" in v.path)
    assert model.count_params() - bn_stats == expected


def test_every_setting_round_trips_through_the_config():
    # Settings live in the part configs: a changed value of any of them comes back from get_config.
    model = FasterRCNN(3, **dict(tiny_fpn_settings(), rpn_nms_iou=0.6, roi_positive_fraction=0.5,
                                 anchor_offset=0.0, score_threshold=0.1, deform_gamma=0.2))
    config = model.get_config()
    assert (config["rpn_nms_iou"], config["roi_positive_fraction"], config["anchor_offset"],
            config["score_threshold"], config["deform_gamma"]) == (0.6, 0.5, 0.0, 0.1, 0.2)
    clone = FasterRCNN.from_config(config)
    assert clone.part_configs == model.part_configs
    with pytest.raises(ValueError, match="rpn_nms_iuo"):
        FasterRCNN(3, rpn_nms_iuo=0.6, **tiny_fpn_settings())
