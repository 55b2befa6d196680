"""The worked example of docs/ARCHITECTURE.md ("Two-stage detectors from parts") runs as written: a
cascade-like detector is a FasterRCNN subclass that only lists its second box stage."""
import keras
import numpy as np

from kerasdet.heads.box_head import BoxPredictor, TwoFCHead
from kerasdet.heads.box_stage import BoxStage
from kerasdet.models.faster_rcnn import FasterRCNN


@keras.saving.register_keras_serializable(package="kerasdet_docs_example")
class TwoStepRCNN(FasterRCNN):
    fixed_settings = {"class_agnostic": True}
    loss_names = ("rpn_cls", "rpn_box", "stage1_cls", "stage1_box", "stage2_cls", "stage2_box")

    def build_box_stages(self):
        first = super().build_box_stages()[0]
        first.loss_prefix = "stage1"
        self.box_head_stage2 = TwoFCHead(1024, name="box_head_stage2")
        self.box_predictor_stage2 = BoxPredictor(self.num_classes, class_agnostic=True,
                                                 name="box_predictor_stage2")
        return [first, BoxStage(self.roi_extractor, self.box_predictor_stage2, self.box_head_stage2,
                                (20, 20, 10, 10), 0.6, loss_prefix="stage2")]


def test_the_documented_two_step_detector_trains_and_predicts():
    model = TwoStepRCNN(3, backbone="tiny", fpn_channels=16, fc_dim=32,
                        anchor_sizes=((8,), (16,), (32,), (64,), (128,)))
    model.build((1, 64, 64, 3))
    rng = np.random.default_rng(0)
    batch = {"images": rng.uniform(0, 255, (1, 64, 64, 3)).astype(np.float32),
             "image_info": np.array([[64, 64, 1, 1, 64, 64]], np.float32),
             "bounding_boxes": {"boxes": np.array([[[4.0, 4.0, 30.0, 30.0]]], np.float32),
                                "labels": np.array([[1]], np.int32)}}
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    before = [w.numpy().copy() for w in model.box_head_stage2.weights]
    logs = model.train_on_batch(batch, return_dict=True)
    assert set(TwoStepRCNN.loss_names) <= set(logs) and np.isfinite(logs["loss"])
    assert logs["stage2_cls"] > 0.0
    # The second stage's own head is trained by its own loss.
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.box_head_stage2.weights))
    out = model.predict_on_batch(batch)
    assert out["boxes"].shape == (1, 100, 4)
