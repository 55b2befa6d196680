"""Faster R-CNN on the MobileNetV2 backbone (zoo/faster_rcnn_mobilenet.json): the FPN variant learns
the synthetic shapes from the ImageNet backbone, and the single-level variant builds and predicts."""
import numpy as np
import pytest

from kerasdet import zoo
from kerasdet.zoo import pretrained
from kerasdet.engine import WarmupStepSchedule

from learning import fit_and_evaluate

BACKBONE = "mobilenet_v2_imagenet"
FPN_ENTRY = "faster_rcnn_mobilenet_v2_fpn_synthetic"
# Measured here (2 cores): mAP@0.5 0.934 and loss 0.72 -> 0.28 after 3 epochs (34 s of training);
# the bounds leave room for other machines and seeds.
EPOCHS = 3
LOSS_RATIO = 0.7
MAP_THRESHOLD = 0.7


@pytest.fixture(scope="module")
def pretrained_home(tmp_path_factory):
    """A KERASDET_HOME for this module only, so that the tests never write into the user's home; the
    checkpoint is converted into it once, by the first test that loads it.

    Availability is asked with this empty home in force, so it means "can be converted offline
    here" (package and torch installed), not "someone already has it cached in ~/.kerasdet"."""
    home = tmp_path_factory.mktemp("kerasdet_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERASDET_HOME", str(home))
        available, reason = pretrained.availability(BACKBONE)
    if not available:
        pytest.skip(f"ImageNet MobileNetV2 not available offline, pretrained variant skipped: {reason}")
    return home


@pytest.mark.slow
def test_mobilenet_v2_fpn_learns_the_synthetic_shapes_from_the_imagenet_backbone(
        synthetic_data, pretrained_home, monkeypatch):
    monkeypatch.setenv("KERASDET_HOME", str(pretrained_home))
    model = zoo.load(FPN_ENTRY, weights=None, pretrained_backbone=True)
    assert model.kerasdet_backbone_weights == BACKBONE
    # Three epochs (192 steps at batch 4) keep this test near 80 s on 2 cores;
    # benchmarks/pretrained_backbone.py measures what longer budgets give.
    # The entry's warm-up (50 steps from 0.1 x lr) at a quarter of its lr: measured at this test's
    # seed, lr 0.02 without warm-up blew the first epoch's loss up to ~50, and with it the second
    # epoch's to ~640 (the entry's recipe run in benchmarks/pretrained_backbone.py, seed 0, did not
    # diverge); either way nothing was detected afterwards. At half the lr it still sat at the edge:
    # a change of float rounding alone (frozen BNs folded into the convolutions in training) took the
    # second epoch's loss to 13 at this seed, while seed 0 reached mAP 0.99. At a quarter, seeds
    # 1234 / 1 / 7: mAP 0.934 / 0.879 / 0.921, final loss 0.27-0.28 (0.905, 0.262 unfolded).
    warmup = WarmupStepSchedule(0.005, warmup_steps=50, warmup_factor=0.1)
    history, results, seconds = fit_and_evaluate(model, synthetic_data, epochs=EPOCHS, learning_rate=warmup)
    losses = history["loss"]
    print(f"Faster R-CNN FPN MobileNetV2 (ImageNet): mAP@0.5 {results['voc']['mAP']:.3f} after "
          f"{seconds:.0f}s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < LOSS_RATIO * losses[0]
    assert results["voc"]["mAP"] >= MAP_THRESHOLD


def test_single_level_mobilenet_v2_entry_builds_and_predicts():
    # zoo.build: random weights, nothing read from or written to KERASDET_HOME. Few proposals and
    # a 96x96 image keep it to seconds; the architecture is the entry's (C4 map, one anchor level).
    model = zoo.build("faster_rcnn_mobilenet_v2", num_classes=3, rpn_pre_nms_top_k_test=100,
                      rpn_post_nms_top_k_test=20)
    assert model.backbone.__class__.__name__ == "MobileNetV2"
    out = model.predict_on_batch(np.random.default_rng(0).uniform(0, 255, (1, 96, 96, 3)).astype(np.float32))
    assert set(out) >= {"boxes", "scores", "classes", "num_detections"}
    boxes = np.asarray(out["boxes"])
    assert boxes.shape[0] == 1 and boxes.shape[-1] == 4
    n = int(np.asarray(out["num_detections"])[0])
    assert np.all(np.isfinite(boxes[0, :n]))
    assert np.all(boxes[0, :n] >= -1e-3) and np.all(boxes[0, :n] <= 96 + 1e-3)
    assert np.all((np.asarray(out["classes"])[0, :n] >= 0) & (np.asarray(out["classes"])[0, :n] < 3))
