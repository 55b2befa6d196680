import numpy as np
import pytest
import tensorflow as tf

from kerasdet.evaluation import paste_masks as evaluation_paste_masks
from kerasdet.heads.mask_head import MaskHead, mask_targets, paste_masks, select_class_masks
from kerasdet.models.mask_rcnn import MaskRCNN
from learning import fit_and_evaluate, tiny_fpn_settings
from mask_reference import boundary_pixels, jittered_rois, resample_reference


def tiny_mask_settings(**overrides):
    settings = dict(tiny_fpn_settings(), mask_channels=32, mask_rois_per_image=16)
    settings.update(overrides)
    return settings


# -- numpy references written from the definitions (module docstring of kerasdet.heads.mask_head) --
def bilinear_or_zero(image, x, y):
    """Bilinear value of `image` [H, W] at pixel-index position (x, y); 0 beyond the outermost pixel
    centres (what tf.image.crop_and_resize's extrapolation gives)."""
    height, width = image.shape
    if x < 0 or y < 0 or x > width - 1 or y > height - 1:
        return 0.0
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    x1, y1 = min(x0 + 1, width - 1), min(y0 + 1, height - 1)
    fx, fy = x - x0, y - y0
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def reference_targets(gt_masks, gt_boxes, rois, matched, size):
    """Each RoI's cells read from its matched grid (covering its gt box), by the numpy reference."""
    batch, num_gt = gt_masks.shape[:2]
    out = np.zeros(rois.shape[:2] + (size, size), np.float64)
    for b in range(batch):
        for r, roi in enumerate(rois[b]):
            g = matched[b, r]
            if 0 <= g < num_gt:
                out[b, r] = resample_reference(gt_masks[b, g], gt_boxes[b, g], roi, size)
    return out


def reference_paste(grids, boxes, height, width):
    size_y, size_x = grids.shape[-2:]
    out = np.zeros(grids.shape[:2] + (height, width), np.float64)
    for b in range(grids.shape[0]):
        for k in range(grids.shape[1]):
            x1, y1, x2, y2 = boxes[b, k]
            for r in range(height):
                for c in range(width):
                    cx, cy = c + 0.5, r + 0.5
                    if not (x1 <= cx < x2 and y1 <= cy < y2):
                        continue
                    u = np.clip((cx - x1) / (x2 - x1) * size_x - 0.5, 0, size_x - 1)
                    v = np.clip((cy - y1) / (y2 - y1) * size_y - 0.5, 0, size_y - 1)
                    out[b, k, r, c] = bilinear_or_zero(grids[b, k].astype(np.float64), u, v)
    return out


def numpy_bce(targets, logits):
    return np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))


# -- mask targets --------------------------------------------------------------------------------
def test_mask_target_of_a_known_rectangle():
    rois = np.array([[[8, 10, 24, 30],      # exactly the object: all ones
                      [8, 10, 40, 30],      # twice as wide: left half ones
                      [30, 0, 50, 40]]],    # beside it: all zeros
                    np.float32)
    expected = [np.ones([8, 8]), np.repeat([[1] * 4 + [0] * 4], 8, axis=0), np.zeros([8, 8])]
    # The object covers x in [8, 24), y in [10, 30): as a full mask (a grid covering the canvas)
    # and as the pipeline's grid of its box (all ones).
    full = np.zeros([1, 1, 40, 50], np.uint8)
    full[0, 0, 10:30, 8:24] = 1
    for masks, covered in ((full, [0, 0, 50, 40]), (np.ones([1, 1, 5, 5], np.float16),
                                                     [8, 10, 24, 30])):
        targets = mask_targets(masks, np.array([[covered]], np.float32), rois,
                               np.zeros([1, 3], np.int32), mask_size=8).numpy()
        for target, want in zip(targets[0], expected):
            np.testing.assert_array_equal(target, want)


def test_mask_targets_match_a_numpy_crop_and_resize():
    rng = np.random.default_rng(0)
    masks = rng.uniform(size=[2, 3, 20, 24]).astype(np.float16)  # soft grids, as the pipeline's
    gx1 = rng.uniform(0, 12, size=[2, 3])
    gy1 = rng.uniform(0, 12, size=[2, 3])
    gt_boxes = np.stack([gx1, gy1, gx1 + rng.uniform(4, 14, [2, 3]),
                         gy1 + rng.uniform(4, 14, [2, 3])], -1).astype(np.float32)
    x1 = rng.uniform(-4, 20, size=[2, 5])
    y1 = rng.uniform(-4, 16, size=[2, 5])
    rois = np.stack([x1, y1, x1 + rng.uniform(1, 12, [2, 5]), y1 + rng.uniform(1, 12, [2, 5])],
                    -1).astype(np.float32)
    # 3 is the padding row ground_truth() appends and -1 is unmatched: both all-zero targets.
    matched = np.array([[0, 1, 2, 3, -1], [2, 2, 0, 1, 3]], np.int32)
    soft = mask_targets(masks, gt_boxes, rois, matched, mask_size=6, threshold=None).numpy()
    expected = reference_targets(masks, gt_boxes, rois, matched, 6)
    np.testing.assert_allclose(soft, expected, atol=1e-4)
    assert (expected == 0).any() and (expected > 0).any()  # RoIs reach beyond their gt boxes
    binary = mask_targets(masks, gt_boxes, rois, matched, mask_size=6).numpy()
    clear = np.abs(expected - 0.5) > 1e-3
    np.testing.assert_array_equal(binary[clear], (expected >= 0.5)[clear])
    assert np.all(binary[0, 3:] == 0) and np.all(binary[1, 4] == 0)


def test_mask_targets_without_any_object_are_zero():
    targets = mask_targets(tf.zeros([2, 0, 16, 16], tf.float16), tf.zeros([2, 0, 4]),
                           tf.constant([[[0, 0, 8, 8]]] * 2, tf.float32),
                           tf.zeros([2, 1], tf.int32), mask_size=4)
    assert targets.shape == (2, 1, 4, 4) and float(tf.reduce_max(targets)) == 0.0


def test_mask_targets_reject_bad_shapes():
    boxes = tf.zeros([2, 1, 4])
    with pytest.raises(ValueError, match="gt_masks"):
        mask_targets(tf.zeros([2, 16, 16]), boxes, boxes, tf.zeros([2, 1], tf.int32))
    with pytest.raises(ValueError, match="gt_boxes"):
        mask_targets(tf.zeros([2, 1, 16, 16]), tf.zeros([2, 4]), boxes, tf.zeros([2, 1], tf.int32))
    with pytest.raises(ValueError, match="rois"):
        mask_targets(tf.zeros([2, 1, 16, 16]), boxes, tf.zeros([2, 1, 5]),
                     tf.zeros([2, 1], tf.int32))
    with pytest.raises(TypeError, match="matched_index"):
        mask_targets(tf.zeros([2, 1, 16, 16]), boxes, boxes, tf.zeros([2, 1]))


def test_targets_from_pipeline_grids_match_targets_cut_from_full_masks(tmp_path):
    # The pipeline keeps each object's mask as a grid over its box; the RoI targets read from the
    # grids must be those cut from the full-resolution masks (numpy: the original mask sampled at
    # the RoI's 28 x 28 cell centres, binarized), up to the resampling's rounding at the edges.
    # Shapes with holes and notches (ring, cross), objects of 6..150 px, images scaled by ~1.8.
    from kerasdet.data.masks import masks_for_record
    from kerasdet.data.pipeline import build_dataset
    from kerasdet.data.synthetic import make_dataset

    data = make_dataset(str(tmp_path), 6, seed=4, image_size=(180, 240), num_classes=5,
                        object_size=(6, 150), max_objects=4)
    batch = next(iter(build_dataset(data, 6, min_size=320, max_size=640, with_masks=True)))
    grids, boxes = batch["masks"], batch["bounding_boxes"]["boxes"].numpy()
    assert grids.shape[2:] == (112, 112) and grids.dtype == tf.float16
    rng = np.random.default_rng(0)
    rois, matched, references = [], [], []
    for b, index in enumerate(batch["image_index"].numpy()):
        record = data.records[index]
        full = masks_for_record(record)
        scale = batch["image_info"].numpy()[b, 2:4]
        image_rois, image_matched = [], []
        for n in range(record.num_objects):
            for roi in jittered_rois(rng, boxes[b, n], 6, bounds=batch["images"].shape[1:3]):
                original = roi / np.tile(scale[::-1], 2)  # network pixels -> the record's pixels
                references.append(resample_reference(full[n], (0, 0, record.width, record.height),
                                                      original, 28) >= 0.5)
                image_rois.append(roi)
                image_matched.append(n)
        rois.append(image_rois)
        matched.append(image_matched)
    width = max(len(r) for r in rois)
    roi_array = np.zeros([len(rois), width, 4], np.float32)
    matched_array = np.full([len(rois), width], -1, np.int32)
    for b, (r, m) in enumerate(zip(rois, matched)):
        roi_array[b, :len(r)], matched_array[b, :len(m)] = r, m
    targets = mask_targets(grids, boxes, roi_array, matched_array).numpy()
    got = np.concatenate([targets[b, :len(r)] for b, r in enumerate(rois)]).astype(bool)
    expected = np.stack(references)
    edge = np.stack([boundary_pixels(t) for t in expected])
    differ = got != expected
    print(f"{len(expected)} RoIs: {differ.mean():.3%} of target pixels differ, "
          f"{differ[edge].mean():.3%} of boundary pixels, {int((differ & ~edge).sum())} elsewhere")
    assert len(expected) > 60 and expected.any()
    assert not (differ & ~edge).any()  # only pixels on the object's edge may flip
    assert differ[edge].mean() < 0.02  # measured 0.5 % at 112 x 112 grids


# -- paste ---------------------------------------------------------------------------------------
def test_paste_matches_a_numpy_reference_and_the_evaluation_paste():
    rng = np.random.default_rng(1)
    grids = rng.uniform(size=[2, 4, 7, 7]).astype(np.float32)
    boxes = np.array([[[2.3, 3.1, 15.7, 11.2], [-3, -2, 6.5, 5.5], [10, 4, 30, 19], [5, 5, 5, 9]],
                      [[0, 0, 24, 18], [7.5, 0.25, 8.4, 17.9], [1, 1, 3, 3], [20, 14, 23.5, 17]]],
                     np.float32)
    height, width = 18, 24
    pasted = paste_masks(grids, boxes, (height, width)).numpy()
    expected = reference_paste(grids, boxes.astype(np.float64), height, width)
    np.testing.assert_allclose(pasted, expected, atol=1e-4)
    for b in range(2):
        np.testing.assert_allclose(pasted[b], evaluation_paste_masks(grids[b], boxes[b],
                                                                     (height, width)), atol=1e-4)
    assert np.all(pasted[0, 3] == 0)  # a zero-width box pastes nothing


def test_paste_reproduces_a_uniform_mask_as_its_box():
    pasted = paste_masks(tf.ones([1, 1, 28, 28]), tf.constant([[[4.0, 2.0, 12.0, 9.0]]]),
                         (12, 16)).numpy()[0, 0]
    expected = np.zeros([12, 16])
    expected[2:9, 4:12] = 1
    np.testing.assert_allclose(pasted, expected, atol=1e-5)


def test_select_class_masks_takes_each_class_channel():
    logits = np.random.default_rng(2).normal(size=[2, 3, 5, 5, 4]).astype(np.float32)
    classes = np.array([[0, 3, -1], [2, 1, 1]], np.int32)
    picked = select_class_masks(tf.constant(logits), classes).numpy()
    for b in range(2):
        for r in range(3):
            np.testing.assert_allclose(picked[b, r], logits[b, r, :, :, max(classes[b, r], 0)])


# -- head ----------------------------------------------------------------------------------------
def test_mask_head_shapes_and_parameter_count():
    head = MaskHead(5, channels=16, num_convs=4)
    out = head(tf.zeros([2, 3, 14, 14, 8]))
    assert out.shape == (2, 3, 28, 28, 5)
    convs = (3 * 3 * 8 * 16 + 16) + 3 * (3 * 3 * 16 * 16 + 16)
    expected = convs + (2 * 2 * 16 * 16 + 16) + (16 * 5 + 5)
    assert head.count_params() == expected
    clone = MaskHead.from_config(head.get_config())
    assert clone(tf.zeros([1, 1, 14, 14, 8])).shape == (1, 1, 28, 28, 5)


# -- model ---------------------------------------------------------------------------------------
def _one_object_batch(height=64, width=64):
    # The pipeline's layout: per-object grids over the boxes; an L-shaped object in image 0.
    masks = np.zeros([2, 2, 14, 14], np.float16)
    masks[0, 0] = 1
    masks[0, 0, :7, 7:] = 0
    masks[1, 1] = 1
    boxes = np.array([[[8, 12, 36, 40], [0, 0, 0, 0]], [[0, 0, 0, 0], [30, 20, 60, 50]]],
                     np.float32)
    labels = np.array([[2, -1], [-1, 0]], np.int32)
    rng = np.random.default_rng(3)
    return {"images": tf.constant(rng.uniform(0, 255, [2, height, width, 3]), tf.float32),
            "bounding_boxes": {"boxes": tf.constant(boxes), "labels": tf.constant(labels)},
            "masks": tf.constant(masks)}


def _sample(batch):
    """A hand-made RoI sample: per image 3 RoIs, the first foreground, then background / unused."""
    rois = np.array([[[10, 10, 38, 42], [0, 0, 20, 20], [0, 0, 0, 0]],
                     [[28, 22, 58, 52], [40, 0, 64, 20], [0, 0, 0, 0]]], np.float32)
    return {"rois": tf.constant(rois), "labels": tf.constant([[3, 0, -1], [1, 0, -1]]),
            "matched_index": tf.constant([[0, 0, 0], [1, 2, 0]])}


def _mask_loss_case():
    """A tiny Mask R-CNN (3 leading mask slots) with the RoI features and sample of a one-object batch."""
    model = MaskRCNN(3, **tiny_mask_settings(roi_batch_size=12))
    batch = _one_object_batch()
    model.build()
    _, roi_features = model.features(batch["images"])
    return model, batch, roi_features, _sample(batch), batch["bounding_boxes"]["boxes"]


def test_mask_loss_uses_foreground_rois_and_the_ground_truth_class_channel_only():
    model, batch, roi_features, sampled, gt_boxes = _mask_loss_case()
    loss = float(model.mask_loss(roi_features, sampled, batch["masks"], gt_boxes))

    logits = model.mask_logits(roi_features, sampled["rois"]).numpy()
    targets = reference_targets(batch["masks"].numpy(), gt_boxes.numpy(), sampled["rois"].numpy(),
                                sampled["matched_index"].numpy(), 28) >= 0.5
    per_roi = [numpy_bce(targets[0, 0], logits[0, 0, :, :, 2]).mean(),   # label 3 -> class 2
               numpy_bce(targets[1, 0], logits[1, 0, :, :, 0]).mean()]   # label 1 -> class 0
    assert loss == pytest.approx(np.mean(per_roi), rel=1e-4)

    # Other classes' channels do not matter: move their predictor weights, the loss stays.
    kernel, bias = model.mask_head.predictor.get_weights()
    moved = bias.copy()
    moved[1] += 5.0
    model.mask_head.predictor.set_weights([kernel, moved])
    assert float(model.mask_loss(roi_features, sampled, batch["masks"], gt_boxes)) == \
        pytest.approx(loss, rel=1e-6)
    moved[0] += 5.0  # the channel of image 1's object: now it changes
    model.mask_head.predictor.set_weights([kernel, moved])
    assert abs(float(model.mask_loss(roi_features, sampled, batch["masks"], gt_boxes)) - loss) > 1e-3


def test_mask_loss_gradient_matches_the_sigmoid_cross_entropy_derivative():
    model, batch, roi_features, sampled, gt_boxes = _mask_loss_case()
    bias = model.mask_head.predictor.bias
    with tf.GradientTape() as tape:
        loss = model.mask_loss(roi_features, sampled, batch["masks"], gt_boxes)
    grad = tape.gradient(loss, bias).numpy()
    # d loss / d bias_k = sum over the foreground RoIs of class k of mean(sigmoid(z) - t) / #fg.
    logits = model.mask_logits(roi_features, sampled["rois"]).numpy()
    targets = reference_targets(batch["masks"].numpy(), gt_boxes.numpy(), sampled["rois"].numpy(),
                                sampled["matched_index"].numpy(), 28) >= 0.5
    expected = np.zeros(3)
    for (b, k) in ((0, 2), (1, 0)):
        expected[k] += np.mean(1 / (1 + np.exp(-logits[b, 0, :, :, k])) - targets[b, 0]) / 2
    np.testing.assert_allclose(grad, expected, atol=1e-5)


def test_train_step_with_masks_and_without_objects():
    model = MaskRCNN(3, **tiny_mask_settings())
    model.compile(optimizer="sgd")
    logs = model.train_on_batch(_one_object_batch(), return_dict=True)
    assert set(logs) == {"loss", "rpn_cls", "rpn_box", "roi_cls", "roi_box", "mask"}
    assert np.isfinite(logs["mask"]) and logs["mask"] > 0.1  # log(2) at initialisation
    evaluated = model.test_on_batch(_one_object_batch(), return_dict=True)  # model.evaluate's step
    assert evaluated["mask"] > 0.1 and np.isfinite(evaluated["loss"])
    empty = {"images": tf.random.uniform([2, 64, 64, 3], 0, 255),
             "bounding_boxes": {"boxes": tf.zeros([2, 0, 4]), "labels": tf.zeros([2, 0], tf.int32)},
             "masks": tf.zeros([2, 0, 14, 14], tf.float16)}
    logs = model.train_on_batch(empty, return_dict=True)
    assert all(np.isfinite(v) for v in logs.values())
    # train_on_batch reports running means over both batches: the empty one added a zero mask loss.
    model.reset_metrics()
    logs = model.train_on_batch(empty, return_dict=True)
    assert logs["mask"] == 0.0 and logs["roi_box"] == 0.0


def test_training_without_masks_is_a_clear_error():
    model = MaskRCNN(3, **tiny_mask_settings())
    batch = _one_object_batch()
    del batch["masks"]
    with pytest.raises(ValueError, match="masks"):
        model.compute_detection_losses(batch, training=True)
    batch["masks"] = tf.zeros([2, 3, 14, 14], tf.float16)  # 3 grids for 2 boxes per image
    with pytest.raises(ValueError, match="grids"):
        model.compute_detection_losses(batch, training=True)


def test_predict_on_mixed_sizes_and_empty_images():
    model = MaskRCNN(3, **tiny_mask_settings(score_threshold=0.0))
    images = np.zeros([2, 96, 160, 3], np.float32)
    images[0, 20:60, 30:90] = 200.0
    info = np.array([[96, 160, 1, 1, 96, 160], [64, 100, 1, 1, 64, 100]], np.float32)
    out = model.predict_on_batch({"images": images, "image_info": info})
    assert out["boxes"].shape == (2, 100, 4)
    assert out["masks"].shape == (2, 100, 96, 160) and out["masks"].dtype == np.uint8
    assert set(np.unique(out["masks"])) <= {0, 1}
    n = out["num_detections"]
    assert n[0] > 0  # score_threshold 0: there are detections to give masks to
    for b, (h, w) in enumerate([(96, 160), (64, 100)]):
        assert np.all(out["masks"][b, n[b]:] == 0)
        # Masks lie inside their boxes, hence inside the image's valid region.
        for k in range(n[b]):
            x1, y1, x2, y2 = out["boxes"][b, k]
            rows, cols = np.nonzero(out["masks"][b, k])
            if rows.size:
                assert cols.min() + 0.5 >= x1 and cols.max() + 0.5 < x2
                assert rows.min() + 0.5 >= y1 and rows.max() + 0.5 < y2
        assert np.all(out["masks"][b, :, h:, :] == 0) and np.all(out["masks"][b, :, :, w:] == 0)


def test_c4_variant_with_per_box_mask_output():
    # One model checks two cheap options: the C4 trunk and the unpasted per-box grids.
    model = MaskRCNN(2, backbone="tiny", fpn=False, fc_dim=64, mask_channels=16,
                     anchor_sizes=((32, 64, 128),), rpn_pre_nms_top_k_test=50,
                     rpn_post_nms_top_k_test=20, paste_masks=False, score_threshold=0.0)
    assert model.mask_roi_extractor.strides == (16,)
    out = model.predict_on_batch(np.zeros([1, 64, 64, 3], np.float32))
    assert out["masks"].shape == (1, 100, 28, 28) and out["masks"].dtype == np.float32
    n = out["num_detections"][0]
    assert n > 0 and np.all(out["masks"][0, n:] == 0)
    assert np.all((out["masks"][0, :n] > 0) & (out["masks"][0, :n] < 1))


def test_pasted_masks_are_the_binarized_paste_of_the_per_box_masks():
    model = MaskRCNN(3, **tiny_mask_settings(score_threshold=0.0))
    images = tf.constant(np.random.default_rng(4).uniform(0, 255, [1, 48, 80, 3]), tf.float32)
    pasted = model(images)  # eager call: the attribute switch below takes effect
    model.paste_masks = False
    grids = model(images)
    n = int(pasted["num_detections"][0])
    assert n > 0
    np.testing.assert_allclose(grids["boxes"], pasted["boxes"])
    expected = reference_paste(grids["masks"][:, :5].numpy(), grids["boxes"][:, :5].numpy(),
                               48, 80) >= 0.5
    near_half = np.abs(reference_paste(grids["masks"][:, :5].numpy(),
                                       grids["boxes"][:, :5].numpy(), 48, 80) - 0.5) < 1e-4
    agree = (pasted["masks"][:, :5].numpy() == expected) | near_half
    assert agree.all()


def test_saved_model_carries_the_pasted_masks(tmp_path):
    # The pasted, binarized masks are graph ops, so a plain SavedModel of predict returns them.
    # (kerasdet.export's TF OD API signatures return the per-box grids instead.)
    model = MaskRCNN(3, **tiny_mask_settings(score_threshold=0.0, rpn_post_nms_top_k_test=50))
    model.build((1, 64, 64, 3))
    module = tf.Module()
    module.model = model
    module.serve = tf.function(lambda images: model(images),
                               input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    path = str(tmp_path / "mask_rcnn")
    tf.saved_model.save(module, path)
    images = tf.constant(np.random.default_rng(5).uniform(0, 255, [1, 64, 64, 3]), tf.float32)
    loaded = tf.saved_model.load(path)  # keep a reference: it owns the restored variables
    out = loaded.serve(images)
    reference = model(images)
    n = int(out["num_detections"][0])
    assert n == int(reference["num_detections"][0]) > 0
    assert out["masks"].dtype == tf.uint8 and out["masks"].shape == (1, 100, 64, 64)
    np.testing.assert_array_equal(out["masks"].numpy(), reference["masks"].numpy())


def test_config_and_keras_file_round_trips(tmp_path):
    import keras

    model = MaskRCNN(3, **tiny_mask_settings(mask_num_convs=2, mask_threshold=0.4,
                                             score_threshold=0.0))
    model.build()
    config = model.get_config()
    clone = MaskRCNN.from_config(config)
    clone.build()
    assert clone.get_config() == config
    assert clone.count_params() == model.count_params()
    assert clone.mask_head.num_convs == 2 and clone.mask_threshold == 0.4

    path = str(tmp_path / "mask_rcnn.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    images = np.random.default_rng(6).uniform(0, 255, [1, 64, 64, 3]).astype(np.float32)
    before, after = model(images), loaded(images)
    assert isinstance(loaded, MaskRCNN)
    np.testing.assert_allclose(after["scores"], before["scores"], atol=1e-6)
    np.testing.assert_array_equal(after["masks"], before["masks"])


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="mask_threshold"):
        MaskRCNN(3, mask_threshold=1.5, **tiny_fpn_settings())
    with pytest.raises(ValueError, match="mask_rois_per_image"):
        MaskRCNN(3, mask_rois_per_image=0, **tiny_fpn_settings())
    with pytest.raises(ValueError, match="MaskHead"):
        MaskHead(0)


def test_mask_rcnn_learns_boxes_and_masks(synthetic_data):
    model = MaskRCNN(3, **tiny_mask_settings())
    history, results, seconds = fit_and_evaluate(model, synthetic_data, epochs=6, with_masks=True,
                                                 metrics=("voc", "coco"))
    losses, mask_losses = history["loss"], history["mask"]
    box_map = results["voc"]["mAP"]
    segm = results["coco"]["segm"]
    print(f"Mask R-CNN FPN tiny: box mAP@0.5 {box_map:.3f}, mask AP {segm['AP']:.3f} "
          f"(AP50 {segm['AP50']:.3f}), box AP {results['coco']['bbox']['AP']:.3f} after "
          f"{seconds:.0f}s; loss {losses[0]:.3f} -> {losses[-1]:.3f}, mask loss "
          f"{mask_losses[0]:.3f} -> {mask_losses[-1]:.3f}")
    assert losses[-1] < 0.6 * losses[0]
    assert mask_losses[-1] < 0.8 * mask_losses[0]
    assert box_map >= 0.5
    assert segm["AP50"] >= 0.3


@pytest.mark.parametrize("num_classes, torchvision_count", [(90, 44_401_393)])
def test_resnet50_fpn_parameter_count_matches_the_standard_architecture(num_classes,
                                                                        torchvision_count):
    # Faster R-CNN R50-FPN (its arithmetic in tests/test_faster_rcnn.py) plus the mask head: four
    # 3x3 convs of 256, a 2x2 stride-2 deconvolution of 256, a 1x1 conv to K masks.
    from test_faster_rcnn import (RESNET50_BN_AFFINE, conv_params,
                                  resnet50_fpn_faster_rcnn_params)

    mask_head = 4 * conv_params(3, 256, 256) + conv_params(2, 256, 256) \
        + conv_params(1, 256, num_classes)
    expected = resnet50_fpn_faster_rcnn_params(num_classes) + mask_head
    # torchvision's maskrcnn_resnet50_fpn at 91 outputs: 44,401,393 parameters, without the
    # frozen BN scales and shifts (buffers there); it also regresses the background box
    # (4 (1024 + 1)) and predicts a background mask (256 + 1). BN statistics excluded from both.
    from_torchvision = torchvision_count + RESNET50_BN_AFFINE - 4 * (1024 + 1) - (256 + 1)
    assert expected == from_torchvision == 44_450_156
    model = MaskRCNN(num_classes, backbone="resnet50", backbone_config={"freeze_at": 0})
    model.build((1, 64, 64, 3))
    bn_stats = sum(int(np.prod(v.shape)) for v in model.weights
                   if "moving_mean" in v.path or "moving_variance" in v.path)
    count = model.count_params() - bn_stats
    print(f"Mask R-CNN R50-FPN, {num_classes} classes: {count:,} parameters")
    assert count == expected


def test_mask_loss_on_the_foreground_count_equals_the_fixed_quota(monkeypatch):
    """Outside XLA the mask head runs on the batch's largest foreground count only; under XLA on the
    whole quota (16 here, 1 foreground RoI per image): same loss and gradients."""
    import kerasdet.heads.mask_head as mask_head_module

    model, batch, roi_features, sampled, gt_boxes = _mask_loss_case()
    weights = model.mask_head.trainable_weights

    def loss_and_grads():
        @tf.function  # the choice is made while tracing, as in train_step
        def run():
            with tf.GradientTape() as tape:
                loss = model.mask_loss(roi_features, sampled, batch["masks"], gt_boxes)
            return loss, tape.gradient(loss, weights)
        return run()

    calls = []
    real = mask_head_module.in_xla_context
    monkeypatch.setattr(mask_head_module, "in_xla_context", lambda: calls.append(1) or real())
    trimmed = loss_and_grads()
    monkeypatch.setattr(mask_head_module, "in_xla_context", lambda: True)
    fixed = loss_and_grads()
    assert calls, "the mask loss no longer asks whether it is compiled by XLA"
    assert float(trimmed[0]) == pytest.approx(float(fixed[0]), rel=1e-6) and float(fixed[0]) > 0.1
    for a, b in zip(trimmed[1], fixed[1]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
