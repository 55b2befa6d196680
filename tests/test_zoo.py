"""kerasdet.zoo: registry, weights store (sha256 before loading), training schedule, shipped weights."""
import hashlib
import json
import os
import warnings

import keras
import numpy as np
import pytest

from kerasdet import zoo
from kerasdet import engine, weights_files
from kerasdet.zoo import weights as store

REQUIRED = ("fast_rcnn_r50", "faster_rcnn_r50_c4", "faster_rcnn_r50_fpn", "faster_rcnn_r101_fpn",
            "rfcn_r101", "mask_rcnn_r50_fpn", "mask_rcnn_r101_fpn", "cascade_rcnn_r50_fpn",
            "cascade_rcnn_r101", "cascade_mask_rcnn_r101_fpn", "faster_rcnn_r50_fpn_dcn",
            "rfcn_r101_dcn", "faster_rcnn_tiny_fpn_synthetic")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERASDET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KERASDET_WEIGHTS", raising=False)


# ----------------------------------------------------------------------------- registry
def test_list_holds_every_required_entry_and_info_describes_them():
    names = zoo.list()
    assert names == sorted(names)
    for name in REQUIRED:
        assert name in names
        description = zoo.info(name)
        assert description["name"] == name
        assert description["class_names"] and description["input"]
        assert description["status"].startswith(("trained weights", "random weights", "backbone pretrained",
                                                 "not implemented yet"))
        if description["weights"] is None:  # no invented numbers for entries without weights
            assert description["metrics"] == {}
            assert description["status"] != "trained weights"


def test_unknown_name_suggests_close_names():
    with pytest.raises(zoo.UnknownModelError) as caught:
        zoo.info("faster_rcnn_r50fpn")
    message = str(caught.value)
    assert "faster_rcnn_r50_fpn" in message and "faster_rcnn_r50fpn" in message


def _write_zoo(folder, entries):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "test_family.json"), "w") as handle:
        json.dump({"family": "test_family", "entries": entries}, handle)
    return folder


def _tiny_entry(weights=None, num_classes=2):
    return {"class": "kerasdet.models.faster_rcnn:FasterRCNN",
            "arguments": {"num_classes": num_classes, "backbone": "tiny", "fpn_channels": 16,
                          "fc_dim": 32, "anchor_sizes": [[16], [32], [64], [128], [256]],
                          "rpn_pre_nms_top_k_test": 50, "rpn_post_nms_top_k_test": 20},
            "dataset": "synthetic", "class_names": ["a", "b"], "input": {"image_size": [64, 64]},
            "weights": weights, "metrics": {}}


def test_entries_whose_class_is_missing_are_listed_as_not_implemented(tmp_path, monkeypatch):
    missing = dict(_tiny_entry(), **{"class": "kerasdet.models.not_written_yet:Nothing"})
    monkeypatch.setenv("KERASDET_ZOO_DIR", _write_zoo(str(tmp_path / "zoo"), {"ghost": missing}))
    assert zoo.list() == ["ghost"]
    assert zoo.info("ghost")["status"].startswith("not implemented yet")
    with pytest.raises(zoo.NotImplementedYetError, match="ghost"):
        zoo.load("ghost")


def test_bad_zoo_file_is_reported_with_its_path(tmp_path, monkeypatch):
    folder = _write_zoo(str(tmp_path / "zoo"), {"broken": {"class": "x:y"}})
    monkeypatch.setenv("KERASDET_ZOO_DIR", folder)
    with pytest.raises(ValueError, match="test_family.json.*broken"):
        zoo.list()


def test_load_without_weights_warns_and_builds_a_working_model(tmp_path, monkeypatch):
    monkeypatch.setenv("KERASDET_ZOO_DIR", _write_zoo(str(tmp_path / "zoo"), {"t": _tiny_entry()}))
    with pytest.warns(zoo.RandomWeightsWarning, match="random weights"):
        model = zoo.load("t")
    # The entry's input, as the resize rule states it in full (a fixed size has no stride padding).
    assert model.built and model.input_settings == {"image_size": [64, 64], "stride": 1}
    out = model.predict_on_batch(np.zeros([1, 64, 64, 3], np.float32))
    assert out["boxes"].shape == (1, 100, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert zoo.load("t", weights=None).num_classes == 2


# ----------------------------------------------------------------------------- weights store
def _dense_model(seed):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    model.layers[0].kernel.assign(np.random.default_rng(seed).normal(size=(3, 2)).astype("float32"))
    return model


def _reference_sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


@pytest.fixture
def weights_file(tmp_path):
    path = str(tmp_path / "src" / "small.weights.h5")
    os.makedirs(os.path.dirname(path))
    source = _dense_model(1)
    source.save_weights(path)
    return path, _reference_sha256(path), source.layers[0].kernel.numpy()


def test_sha256_of_matches_hashlib_on_the_whole_file(weights_file):
    path, digest, _ = weights_file
    assert weights_files.sha256_of(path, chunk_size=7) == digest


def test_local_path_and_file_url_load_after_verification(weights_file, tmp_path):
    path, digest, kernel = weights_file
    local = store.resolve_weights_file(path, digest)
    assert local == path
    fetched = store.resolve_weights_file("file://" + path, digest, "fetched.weights.h5")
    assert fetched.startswith(str(tmp_path / "home" / "weights"))  # copied into the cache
    target = _dense_model(2)
    weights_files.load_verified_weights(target, fetched, digest)
    np.testing.assert_array_equal(target.layers[0].kernel.numpy(), kernel)


def test_corrupted_file_is_rejected_before_loading(weights_file, monkeypatch):
    path, digest, _ = weights_file
    with open(path, "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00garbage\x00")
    actual = _reference_sha256(path)
    target = _dense_model(2)
    calls = []
    monkeypatch.setattr(target, "load_weights", lambda *a, **k: calls.append(a))
    with pytest.raises(weights_files.WeightsHashError) as caught:
        weights_files.load_verified_weights(target, path, digest)
    message = str(caught.value)
    assert path in message and digest in message and actual in message
    assert calls == []  # never handed to Keras


def test_wrong_hash_on_download_deletes_the_file(weights_file, tmp_path):
    path, digest, _ = weights_file
    wrong = "0" * 64
    with pytest.raises(weights_files.WeightsHashError, match=f"expected {wrong}, got {digest}"):
        store.resolve_weights_file("file://" + path, wrong, "copy.weights.h5")
    assert not os.path.exists(tmp_path / "home" / "weights" / "copy.weights.h5")


def test_missing_file_and_offline_errors_say_how_to_place_the_file(tmp_path):
    with pytest.raises(weights_files.WeightsError, match="KERASDET_WEIGHTS"):
        store.resolve_weights_file(str(tmp_path / "absent.weights.h5"), "0" * 64)
    # Port 9 (discard) on localhost refuses connections: the offline case, without any network.
    with pytest.raises(weights_files.WeightsError, match="Offline.*KERASDET_WEIGHTS"):
        store.resolve_weights_file("http://127.0.0.1:9/model.weights.h5", "0" * 64)


def test_kerasdet_weights_override_is_used_and_still_verified(weights_file, monkeypatch):
    path, digest, _ = weights_file
    monkeypatch.setenv("KERASDET_WEIGHTS", os.path.dirname(path))
    assert store.resolve_weights_file("http://127.0.0.1:9/small.weights.h5", digest) == path
    with pytest.raises(weights_files.WeightsHashError):
        store.resolve_weights_file("http://127.0.0.1:9/small.weights.h5", "1" * 64)


def test_only_keras_weights_files_are_accepted(tmp_path):
    with pytest.raises(weights_files.WeightsError, match="weights.h5"):
        store.resolve_weights_file(str(tmp_path / "model.pkl"), "0" * 64)
    with pytest.raises(weights_files.WeightsError, match="no sha256"):
        weights_files.verify_sha256(__file__, None)


# ----------------------------------------------------------------------------- schedule
def _schedule_reference(step, lr, boundaries, factor, warmup, warmup_factor):
    rate = lr * factor ** sum(step >= b for b in boundaries)
    if warmup:
        alpha = min(step / warmup, 1.0)
        rate *= warmup_factor + (1 - warmup_factor) * alpha
    return rate


def test_warmup_step_schedule_matches_the_reference():
    schedule = engine.WarmupStepSchedule(0.02, [30, 60], 0.1, warmup_steps=10, warmup_factor=0.001)
    for step in (0, 1, 5, 10, 29, 30, 59, 60, 100):
        expected = _schedule_reference(step, 0.02, [30, 60], 0.1, 10, 0.001)
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-6)
    clone = engine.WarmupStepSchedule.from_config(schedule.get_config())
    assert float(clone(45)) == pytest.approx(float(schedule(45)))
    with pytest.raises(ValueError, match="increasing"):
        engine.WarmupStepSchedule(0.1, [5, 3])
    # Saved .keras files name the schedule by this registered name, wherever the class lives.
    assert keras.saving.get_registered_name(engine.WarmupStepSchedule) == "kerasdet>WarmupStepSchedule"


# ----------------------------------------------------------------------------- shipped weights
@pytest.mark.parametrize("name", ["faster_rcnn_tiny_fpn_synthetic", "ccnet_tiny_fpn_synthetic",
                                  "overfeat_tiny_synthetic", "overfeat_tiny_localization_synthetic",
                                  "rcnn_tiny_synthetic", "sppnet_tiny_synthetic"])
def test_shipped_tiny_weights_reach_the_recorded_map(name, tmp_path):
    """Loads the committed weights (sha256-verified) and re-measures VOC mAP@0.5 (and for a
    localization entry its ILSVRC-style figures) on the held-out synthetic images regenerated from
    the recorded seed. Tolerance 0.02: the files and weights are identical, only float summation
    order may differ between CPUs."""
    from kerasdet.data.data_spec import synthetic_generator_arguments
    from kerasdet.data.synthetic import make_dataset

    entry = zoo.info(name)
    assert entry["status"] == "trained weights", "run train/make_shipped_weights.py"
    recorded = entry["metrics"]["voc_map50"]
    assert recorded >= 0.5
    spec = entry["metrics"]["data"]
    val = make_dataset(str(tmp_path / "val"), spec["val_images"], seed=spec["val_seed"], split="val",
                       **synthetic_generator_arguments(spec))
    model = zoo.load(name)
    extra = {}
    if "proposals" in spec:  # R-CNN / SPP-net: the recorded proposal method on the regenerated images
        from kerasdet.data.proposals import write_proposal_cache

        settings = {k: v for k, v in spec["proposals"].items() if k != "method"}
        cache = str(tmp_path / "proposals_val.npz")
        write_proposal_cache(val, cache, method=spec["proposals"]["method"], progress=False, **settings)
        extra = {"proposals": cache, "max_proposals": settings["max_proposals"]}
    val_ds = engine.make_pipeline(val, entry["input"], 8, False, **extra)
    summary = engine.evaluate_detector(model, val_ds, val.class_names, quiet=True)
    print(f"shipped weights: VOC mAP@0.5 {summary['voc_map50']:.4f} (recorded {recorded})")
    assert summary["voc_map50"] == pytest.approx(recorded, abs=0.02)
    assert summary["coco_ap"] == pytest.approx(entry["metrics"]["coco_ap"], abs=0.02)
    if "localization" in entry["metrics"]:
        from kerasdet.evaluation.localization import evaluate_localization

        measured, recorded = evaluate_localization(model, val_ds), entry["metrics"]["localization"]
        print(f"shipped weights: localization {measured} (recorded {recorded})")
        assert measured["images"] == recorded["images"] == spec["val_images"]
        for key in ("top1", "localization_top1", "mean_iou"):
            assert measured[key] == pytest.approx(recorded[key], abs=0.02), key


def test_other_num_classes_keeps_the_shipped_backbone_and_warns():
    shipped = zoo.load("faster_rcnn_tiny_fpn_synthetic")
    with pytest.warns(zoo.RandomWeightsWarning, match="did not fit"):
        model = zoo.load("faster_rcnn_tiny_fpn_synthetic", num_classes=5)
    assert model.num_classes == 5
    for mine, theirs in zip(model.backbone.weights, shipped.backbone.weights):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    assert [tuple(w.shape) for w in model.box_predictor.weights] != \
        [tuple(w.shape) for w in shipped.box_predictor.weights]


# ----------------------------------------------------------------------------- published checkpoints
PUBLISHED = {"faster_rcnn_r50_fpn_coco": "fasterrcnn_resnet50_fpn", "mask_rcnn_r50_fpn_coco": "maskrcnn_resnet50_fpn"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_entries_name_their_checkpoint_and_the_publishers_figures_apart(name):
    """The converted checkpoint fits the entry's model (its arguments are the converter's), the URL is
    torch.hub-named with the recorded prefix, and the publisher's figures are not kerasdet's metrics."""
    from kerasdet.converters.torchvision import detector_config

    entry = zoo.registry.get_entry(name)
    assert entry.converts_checkpoint and entry.weights["arch"] == PUBLISHED[name]
    assert entry.weights["url"].startswith("https://download.pytorch.org/models/")
    assert entry.weights["url"].endswith(f"-{entry.weights['sha256_prefix']}.pth")
    normalized = json.loads(json.dumps(detector_config(PUBLISHED[name])))
    assert entry.arguments == normalized
    description = zoo.info(name)
    assert description["metrics"] == {} and "torchvision model card" in description["published_metrics"]["source"]
    assert description["weights_kind"] == "published (torchvision)"
    assert description["status"].startswith("published weights")


def test_zoo_list_shows_weights_kind_and_the_publishers_figure(capsys):
    from kerasdet import cli

    assert cli.main(["zoo", "list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "published (torchvision), fetched on first load" in rows["faster_rcnn_r50_fpn_coco"]
    assert "box AP 37.0 (torchvision model card)" in rows["faster_rcnn_r50_fpn_coco"]
    assert "box AP 37.9, mask AP 34.6 (torchvision model card)" in rows["mask_rcnn_r50_fpn_coco"]
    assert "pretrained backbone (resnet101_imagenet)" in rows["cascade_rcnn_r101"]
    assert "trained here" in rows["faster_rcnn_tiny_fpn_synthetic"]


def test_offline_published_entry_is_one_clear_error(monkeypatch, tmp_path):
    """Offline (simulated, so a machine with internet does not fetch 160 MB here): the error names the
    entry, the file, where to put it, and KERASDET_WEIGHTS; nothing is left in the cache."""
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://download.pytorch.org/models/...: None -- "
                        "[Errno -2] Name or service not known")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(zoo.WeightsError) as caught:
        zoo.load("faster_rcnn_r50_fpn_coco")
    message = str(caught.value)
    home = tmp_path / "home"
    assert "faster_rcnn_r50_fpn_coco" in message and "KERASDET_WEIGHTS" in message
    assert str(home / "checkpoints" / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth") in message
    assert not (home / "weights" / "faster_rcnn_r50_fpn_coco.weights.h5").exists()
