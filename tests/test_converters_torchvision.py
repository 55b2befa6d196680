"""torchvision -> kerasdet detector conversion: stage-by-stage parity with torchvision's own models.

The torchvision side runs in a subprocess (tests/torch_refs/detectors.py, see conftest.py); here the
checkpoint it wrote is converted and every stage compared: FPN features, proposals, the box head on
torchvision's proposals, and the final detections (and mask logits) after the same post-processing.
"""
import numpy as np
import pytest
import tensorflow as tf

from kerasdet import converters
from kerasdet.converters import torchvision as tv

ARCHS = ("fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn")
_converted = {}


def _converted_model(torch_reference, arch):
    if arch not in _converted:
        out = torch_reference("detectors", arch)
        model = converters.convert_detector(str(out / "model.pth"), arch)
        _converted[arch] = (model, dict(np.load(out / "outputs.npz")))
    return _converted[arch]


def _set_distance(a, b):
    """Max over rows of ``a`` of the distance (max abs) to the nearest row of ``b``, and vice versa."""
    distance = np.abs(a[:, None, :] - b[None, :, :]).max(-1)
    return max(distance.min(1).max(), distance.min(0).max())


def _report(name, value):
    print(f"{name}: {value:.3g}")
    return value


@pytest.mark.parametrize("arch", ARCHS)
def test_detector_stages_match_torchvision(torch_reference, arch):
    model, ref = _converted_model(torch_reference, arch)
    images = tf.constant(ref["image"][np.newaxis].astype(np.float32))
    shapes = tf.constant([[320.0, 384.0]])

    rpn_features, roi_features = model.features(images)
    for i, feature in enumerate(rpn_features):
        assert feature.shape == ref[f"feature_{i}"].shape
        diff = _report(f"{arch} P{i + 2} max abs diff", np.abs(feature.numpy() - ref[f"feature_{i}"]).max())
        assert diff <= 1e-4

    logits, deltas, anchors = model.rpn(rpn_features)
    proposals, _, valid = model.proposals(logits, deltas, anchors, shapes, training=False)
    proposals = proposals[0].numpy()[valid[0].numpy()]
    assert proposals.shape == ref["proposals"].shape
    # The same set; the order may differ only where two scores tie (torchvision sorts float32
    # sigmoid probabilities, which round distinct logits to one value near 1). Features that agree
    # to ~3e-6 can still swap a box whose logit ties the 1000th of its level before NMS (seen once
    # in 1000 for Mask R-CNN once kerasdet folded the frozen BNs into the convs; the box head and
    # the detections below stay exact), so at most 2 in 1000 may be unmatched.
    distance = np.abs(proposals[:, None, :] - ref["proposals"][None, :, :]).max(-1)
    unmatched = max(int((distance.min(1) > 1e-3).sum()), int((distance.min(0) > 1e-3).sum()))
    _report(f"{arch} proposals without a counterpart within 1e-3 px", unmatched)
    assert unmatched <= 2

    # The second stage on torchvision's own proposals: logits and per-class deltas.
    cls_logits, box_deltas = model.box_branch(roi_features, tf.constant(ref["proposals"][np.newaxis]))
    diff = _report(f"{arch} class logits max abs diff", np.abs(cls_logits[0].numpy() - ref["class_logits"]).max())
    assert diff <= 1e-4
    ref_deltas = ref["box_regression"].reshape(len(ref["proposals"]), -1, 4)[:, 1:]  # background dropped
    diff = _report(f"{arch} box deltas max abs diff", np.abs(box_deltas[0].numpy() - ref_deltas).max())
    assert diff <= 1e-4

    detections = model.detect(images, shapes)
    count = int(detections["num_detections"][0])
    assert count == len(ref["det_scores"])
    # Each detection as (label, score, box) rows, compared as sets (ties may swap places).
    ours = np.concatenate([detections["classes"][0, :count].numpy()[:, None] + 1,
                           detections["scores"][0, :count].numpy()[:, None],
                           detections["boxes"][0, :count].numpy()], axis=1)
    theirs = np.concatenate([ref["det_labels"][:, None], ref["det_scores"][:, None], ref["det_boxes"]], axis=1)
    diff = _report(f"{arch} detections (label, score, box) max abs diff, as sets", _set_distance(ours, theirs))
    assert diff <= 1e-3
    # Reported, not asserted: only ties could reorder them.
    _report(f"{arch} detections in the same order", float(np.abs(ours[:, :2] - theirs[:, :2]).max() <= 1e-5))
    if "det_mask_logits" in ref:
        logits = model.mask_logits(roi_features, detections["boxes"])  # [1, M, 28, 28, K]
        classes = detections["classes"][0, :count].numpy()
        ours = logits[0].numpy()[np.arange(count), :, :, classes]
        diff = _report(f"{arch} mask logits max abs diff", np.abs(ours - ref["det_mask_logits"]).max())
        assert diff <= 1e-4


def test_legacy_key_names_are_rewritten():
    legacy = {"backbone.fpn.inner_blocks.2.weight": 1, "rpn.head.conv.bias": 2,
              "roi_heads.mask_head.mask_fcn3.weight": 3, "backbone.body.layer1.0.conv1.weight": 4}
    assert tv.normalize_keys(legacy) == {
        "backbone.fpn.inner_blocks.2.0.weight": 1, "rpn.head.conv.0.0.bias": 2,
        "roi_heads.mask_head.2.0.weight": 3, "backbone.body.layer1.0.conv1.weight": 4}


def _small_state(model):
    """A state dict that fits ``model`` exactly, made from the key map itself (no torch needed)."""
    rng = np.random.default_rng(0)
    state = {}
    for key, target in tv.fpn_detector_key_map(model).items():
        want = tuple(target.variable.shape)
        # Invert the layout change by trying the transform on a probe of each candidate shape.
        for shape in _candidate_shapes(key, want):
            probe = rng.standard_normal(shape).astype(np.float32)
            if tuple(np.asarray(target.transform(probe)).shape) == want:
                state[key] = probe
                break
        else:
            raise AssertionError(f"no source shape for {key} -> {want}")
    return state


def _candidate_shapes(key, want):
    if len(want) == 4:  # [kh, kw, a, b] from [b, a, kh, kw] or [a, b, kh, kw]; 1x1 logits gain a row
        kh, kw, a, b = want
        return [(b, a, kh, kw), (a, b, kh, kw), (b + 1, a, kh, kw)]
    if len(want) == 2:
        i, o = want
        return [(o, i), (o + 4, i), (o + 1, i)]
    return [want, (want[0] + 4,), (want[0] + 1,)]


@pytest.fixture(scope="module")
def tiny_torchvision_layout_model():
    # The torchvision layout with ResNet-50 is needed for the key map; 1 class keeps it small.
    return tv.build_detector("fasterrcnn_resnet50_fpn", num_classes=1)


def test_problems_are_listed_and_nothing_is_loaded(tiny_torchvision_layout_model):
    model = tiny_torchvision_layout_model
    state = _small_state(model)
    weight = model.rpn_head.conv.kernel
    before = weight.numpy().copy()
    broken = dict(state)
    del broken["roi_heads.box_head.fc7.bias"]
    broken["roi_heads.extra.weight"] = np.zeros(3, np.float32)
    broken["backbone.fpn.layer_blocks.1.0.weight"] = np.zeros((256, 256, 1, 1), np.float32)
    with pytest.raises(converters.ConversionError) as error:
        converters.assign(tv.fpn_detector_key_map(model), broken, source="broken.pth", ignore=tv.IGNORED_KEYS)
    message = str(error.value)
    for fragment in ("broken.pth", "roi_heads.box_head.fc7.bias", "roi_heads.extra.weight",
                     "backbone.fpn.layer_blocks.1.0.weight", "nothing was loaded"):
        assert fragment in message
    np.testing.assert_array_equal(weight.numpy(), before)
    nan_state = dict(state)
    nan_state["rpn.head.conv.0.0.weight"] = np.full_like(state["rpn.head.conv.0.0.weight"], np.nan)
    with pytest.raises(converters.ConversionError, match="NaN"):
        converters.assign(tv.fpn_detector_key_map(model), nan_state, ignore=tv.IGNORED_KEYS)
    np.testing.assert_array_equal(weight.numpy(), before)


def test_new_class_count_needs_skip_mismatch(tiny_torchvision_layout_model):
    model = tiny_torchvision_layout_model
    state = _small_state(model)
    # A checkpoint with 3 classes (+ background) into the 1-class model.
    state["roi_heads.box_predictor.cls_score.weight"] = np.ones((4, 1024), np.float32)
    state["roi_heads.box_predictor.cls_score.bias"] = np.ones(4, np.float32)
    with pytest.raises(converters.ConversionError, match="cls_score"):
        converters.assign(tv.fpn_detector_key_map(model), state, ignore=tv.IGNORED_KEYS)
    before = model.box_predictor.cls.kernel.numpy().copy()
    result = converters.assign(tv.fpn_detector_key_map(model), state, ignore=tv.IGNORED_KEYS, skip_mismatch=True)
    assert sorted(result["skipped"]) == ["roi_heads.box_predictor.cls_score.bias",
                                         "roi_heads.box_predictor.cls_score.weight"]
    np.testing.assert_array_equal(model.box_predictor.cls.kernel.numpy(), before)
    np.testing.assert_array_equal(model.rpn_head.conv.kernel.numpy(),
                                  state["rpn.head.conv.0.0.weight"].transpose(2, 3, 1, 0))


def test_unsupported_layouts_are_refused():
    from kerasdet.models.faster_rcnn import FasterRCNN

    model = FasterRCNN(2, backbone="tiny", fpn=False, box_head="2fc")
    with pytest.raises(ValueError, match="FPN detector"):
        tv.fpn_detector_key_map(model)
    with pytest.raises(ValueError, match="unknown torchvision detector"):
        tv.detector_config("retinanet_resnet50_fpn")


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        converters.read_torch_checkpoint(tmp_path / "nothing.pth")


@pytest.mark.parametrize("depth", [50])
def test_resnet_checkpoint_matches_torchvision(torch_reference, depth):
    out = torch_reference("resnet", depth)
    ref = dict(np.load(out / "outputs.npz"))
    model = converters.convert_resnet(str(out / "model.pth"), depth=depth, input_normalization=None)
    outputs = model(ref["image"], training=False)
    for name in ("C2", "C3", "C4", "C5", "logits"):
        diff = _report(f"resnet{depth} {name} max abs diff", np.abs(outputs[name].numpy() - ref[name]).max())
        assert diff <= 1e-4
    # Without the top, the checkpoint's fc.* keys are ignored rather than reported as unexpected.
    converters.convert_resnet(str(out / "model.pth"), depth=depth, include_top=False)


@pytest.mark.parametrize("arch,entry", [("fasterrcnn_resnet50_fpn", "faster_rcnn_r50_fpn_torchvision"),
                                        ("maskrcnn_resnet50_fpn", "mask_rcnn_r50_fpn_torchvision")])
def test_zoo_entries_use_the_converter_configuration(arch, entry):
    import json

    from kerasdet import zoo

    info = zoo.info(entry)
    assert info["arguments"] == json.loads(json.dumps(tv.detector_config(arch)))
    assert len(info["class_names"]) == 90 and info["class_names"][0] == "person"
    assert info["class_names"][11] == "N/A" and info["class_names"][12] == "stop sign"  # COCO ids 12, 13


def test_cli_convert_writes_weights_the_zoo_entry_loads(torch_reference, tmp_path, capsys):
    from kerasdet import cli, zoo

    out = torch_reference("detectors", "fasterrcnn_resnet50_fpn")
    target = tmp_path / "frcnn.weights.h5"
    assert cli.main(["convert", str(out / "model.pth"), "--arch", "fasterrcnn_resnet50_fpn",
                     "--out", str(target)]) == 0
    printed = capsys.readouterr().out
    digest = zoo.sha256_of(target)
    assert f"sha256 {digest}" in printed and "faster_rcnn_r50_fpn_torchvision" in printed
    model = zoo.load("faster_rcnn_r50_fpn_torchvision", weights=str(target))
    reference, _ = _converted_model(torch_reference, "fasterrcnn_resnet50_fpn")
    np.testing.assert_array_equal(model.box_predictor.box.kernel.numpy(), reference.box_predictor.box.kernel.numpy())
    np.testing.assert_array_equal(model.backbone.get_layer("layer3_5_bn2").moving_variance.numpy(),
                                  reference.backbone.get_layer("layer3_5_bn2").moving_variance.numpy())
    # A checkpoint for another architecture is refused with the offending keys named.
    assert cli.main(["convert", str(out / "model.pth"), "--arch", "resnet50", "--out", str(tmp_path / "r.weights.h5")]) == 2
    assert "unexpected keys" in capsys.readouterr().err
