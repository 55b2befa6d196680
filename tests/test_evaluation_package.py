"""The evaluation package's public names, and that scoring saved detections does not load TensorFlow."""
import subprocess
import sys

import kerasdet.evaluation as evaluation


def test_public_names_resolve():
    for name in evaluation.__all__:
        assert getattr(evaluation, name) is not None, name


def test_metrics_without_tensorflow():
    code = ("import sys, kerasdet.evaluation as e; e.coco_evaluate; e.format_metrics_table; "
            "e.paste_masks; print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
