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


@pytest.mark.parametrize("num_classes, expected", [(90, 41_755_286)])
def test_resnet50_fpn_parameter_count_matches_the_standard_architecture(num_classes, expected):
    # torchvision's fasterrcnn_resnet50_fpn at 91 outputs: 41,755,286 trainable + frozen parameters
    # (BatchNorm statistics are buffers there, so they are left out of our count too).
    model = FasterRCNN(num_classes, backbone="resnet50", backbone_config={"freeze_at": 0})
    model.build((1, 64, 64, 3))
    bn_stats = sum(int(np.prod(v.shape)) for v in model.weights
                   if "moving_mean" in v.path or "moving_variance" in v.path)
    count = model.count_params() - bn_stats
    assert abs(count - expected) / expected < 0.01, count


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
