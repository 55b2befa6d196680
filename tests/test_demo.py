"""`make demo` end to end with the shipped weights (training itself is covered by test_cli.py)."""
import json

import numpy as np
import pytest
from PIL import Image


@pytest.mark.slow
def test_demo_with_shipped_weights_writes_metrics_savedmodel_and_picture(tmp_path, capsys):
    from kerasdet import demo, zoo

    out = tmp_path / "demo_out"
    assert demo.main(["--out", str(out), "--use-shipped-weights", "--num-pictures", "2"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "detections.png") in printed and "VOC mAP@0.5" in printed
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    recorded = zoo.info(demo.ENTRY)["metrics"]["voc_map50"]
    assert metrics["voc_map50"] == pytest.approx(recorded, abs=0.02)
    assert (out / "saved_model" / "saved_model.pb").is_file()
    picture = np.asarray(Image.open(out / "detections.png"))
    # Two rows of (ground truth | detections), each image enlarged 3x from 128 px.
    assert picture.shape[1] > 2 * 3 * 128 and picture.shape[0] > 2 * 3 * 128


def test_demo_picks_the_pretrained_backbone_only_when_available(monkeypatch):
    from types import SimpleNamespace

    from kerasdet import demo
    from kerasdet.zoo import pretrained

    args = SimpleNamespace(use_shipped_weights=False, no_pretrained=False)
    monkeypatch.setattr(pretrained, "availability", lambda name: (True, ""))
    name, note = demo._choose_entry(args)
    assert name == demo.PRETRAINED_ENTRY and "ImageNet" in note
    monkeypatch.setattr(pretrained, "availability", lambda name: (False, "package not installed"))
    name, note = demo._choose_entry(args)
    assert name == demo.ENTRY and "package not installed" in note
    name, note = demo._choose_entry(SimpleNamespace(use_shipped_weights=False, no_pretrained=True))
    assert name == demo.ENTRY and "--no-pretrained" in note
