import numpy as np
import tensorflow as tf

from kerasdet.heads.box_head import TwoFCHead, truncated_svd_factors
from kerasdet.models.base import batch_image_shapes, ground_truth
from kerasdet.models.fast_rcnn import FastRCNN, jittered_proposals
from learning import fit_and_evaluate


def tiny_fast_rcnn(**kwargs):
    settings = dict(backbone="tiny", feature="C4", fc_dim=256, seed=0)
    settings.update(kwargs)
    return FastRCNN(3, **settings)



def add_proposals(batch):
    gt_boxes, gt_labels = ground_truth(batch)
    shapes = batch_image_shapes(batch, batch["images"])
    return dict(batch, proposals=jittered_proposals(gt_boxes, gt_labels, shapes, 128, seed=5))


def test_jittered_proposals_cover_the_ground_truth():
    gt = tf.constant([[[10.0, 10.0, 50.0, 40.0], [0, 0, 0, 0]]])
    labels = tf.constant([[1, -1]])
    props = jittered_proposals(gt, labels, tf.constant([[64.0, 80.0]]), num_proposals=20,
                               num_near=8, seed=1).numpy()[0]
    assert props.shape == (20, 4)
    assert np.all(props[:, [0, 2]] <= 80) and np.all(props[:, [1, 3]] <= 64) and props.min() >= 0
    w, h = 40.0, 30.0
    near = props[:8]
    assert np.all(np.abs(near[:, 0] - 10) <= 0.25 * w + 1e-4)
    assert np.all(np.abs(near[:, 3] - 40) <= 0.25 * h + 1e-4)


def test_truncated_svd_matches_numpy_and_is_optimal():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(40, 30)).astype(np.float32)
    a, b, error = truncated_svd_factors(kernel, 10)
    u, s, vt = np.linalg.svd(kernel.astype(np.float64), full_matrices=False)
    best = (u[:, :10] * s[:10]) @ vt[:10]
    np.testing.assert_allclose(a @ b, best, atol=1e-4)
    np.testing.assert_allclose(error, np.linalg.norm(kernel - best) / np.linalg.norm(kernel),
                               rtol=1e-4)


def test_compressed_model_approximates_the_original():
    model = tiny_fast_rcnn()
    model.build()
    # Full rank reproduces the head exactly; a lower rank changes the outputs a little.
    inputs = {"images": tf.random.uniform([1, 64, 64, 3], 0, 255, seed=1),
              "proposals": tf.constant([[[0, 0, 30, 30], [10, 10, 60, 50], [5, 20, 40, 62]]],
                                       tf.float32)}
    feature = model.backbone(inputs["images"])["C4"]
    pooled = model.roi_extractor(feature, inputs["proposals"])
    full, report = model.compress([256, 256])
    np.testing.assert_allclose(full.box_head(pooled).numpy(), model.box_head(pooled).numpy(),
                               atol=1e-4)
    small, report = model.compress([32, None])
    # fc6 reads the 7 x 7 pooled C4 map; rank 32 replaces its in x 256 kernel by in x 32 and
    # 32 x 256 factors (the bias stays), fc7 is left as it is.
    fc6_in = 7 * 7 * model.backbone.output["C4"].shape[-1]
    assert report[0]["params_before"] == fc6_in * 256
    assert report[0]["params_after"] == 32 * (fc6_in + 256) < fc6_in * 256
    assert 0 < report[0]["relative_error"] < 1 and report[1]["rank"] is None
    assert isinstance(small.box_head, TwoFCHead)
    assert small.count_params() == model.count_params() - fc6_in * 256 + 32 * (fc6_in + 256)


def test_fast_rcnn_learns_with_external_proposals(synthetic_data):
    # The proposals are jittered ground truth plus random boxes, on the held-out images too: this
    # measures the detector given proposals of good recall, as selective search gives on VOC.
    model = tiny_fast_rcnn()
    history, results, seconds = fit_and_evaluate(model, synthetic_data, epochs=4,
                                                 map_batches=add_proposals)
    losses = history["loss"]
    print(f"Fast R-CNN tiny: mAP@0.5 {results['voc']['mAP']:.3f} after {seconds:.0f}s, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.7 * losses[0]
    assert results["voc"]["mAP"] >= 0.5


def test_fast_rcnn_requires_proposals():
    model = tiny_fast_rcnn()
    try:
        model.predict_on_batch(np.zeros([1, 64, 64, 3], np.float32))
    except ValueError as err:
        assert "proposals" in str(err)
    else:
        raise AssertionError("expected a ValueError naming the proposals")


def test_old_argument_name_rois_per_image_still_sets_the_roi_batch():
    import pytest

    with pytest.warns(DeprecationWarning, match="roi_batch_size"):
        model = tiny_fast_rcnn(rois_per_image=32)
    assert model.roi_config.batch_size == 32
    assert model.get_config()["roi_batch_size"] == 32 and "rois_per_image" not in model.get_config()
    with pytest.raises(ValueError, match="roi_batch_size"):
        tiny_fast_rcnn(rois_per_image=32, roi_batch_size=16)
