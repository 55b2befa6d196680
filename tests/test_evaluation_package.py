"""The evaluation package's public names, and that scoring saved detections does not load TensorFlow."""
import subprocess
import sys
import types

import kerasdet.evaluation as evaluation


def test_public_names_are_the_evaluation_code_they_name():
    for name in evaluation.__all__:
        value = getattr(evaluation, name)
        if name.isupper():  # a constant: the COCO metric names, in pycocotools' stats order
            assert value[:3] == ("AP", "AP50", "AP75") and len(value) == 12, name
        else:  # not an alias of another package's function, nor a name bound to something else
            assert (value.__name__, value.__module__.rpartition(".")[0]) == (name, "kerasdet.evaluation"), name


def test_every_public_name_is_listed():
    public = {name for name in dir(evaluation) if not name.startswith("_")
              and not isinstance(getattr(evaluation, name), types.ModuleType)}
    assert public == set(evaluation.__all__)


def test_metrics_without_tensorflow():
    code = ("import sys, kerasdet.evaluation as e; e.coco_evaluate; e.format_metrics_table; "
            "e.paste_masks; print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
