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
