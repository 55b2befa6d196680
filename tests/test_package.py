import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
from packaging.version import Version

import kerasdet

PACKAGE = os.path.dirname(os.path.abspath(kerasdet.__file__))


def test_version_is_canonical_and_the_installed_one():
    # setuptools reads the version from kerasdet.__version__ and would rewrite a non-canonical one
    # ("v0.2", "0.2.0-dev"), so the wheel and the module would then disagree.
    assert str(Version(kerasdet.__version__)) == kerasdet.__version__
    assert importlib.metadata.version("kerasdet") == kerasdet.__version__, "reinstall: pip install -e ."


def _run(code, env=None):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_kerasdet_loads_no_submodule_until_one_is_used():
    loaded = _run("import json, sys, kerasdet\n"
                  "def ours(): return sorted(m for m in sys.modules if m.startswith('kerasdet'))\n"
                  "before, tf = ours(), 'tensorflow' in sys.modules\n"
                  "kerasdet.evaluation.voc_ap\n"
                  "print(json.dumps([before, tf, ours()]))")
    before, tensorflow, after = loaded
    assert before == ["kerasdet"] and not tensorflow
    assert "kerasdet.evaluation" in after and not {"kerasdet.models", "kerasdet.zoo", "kerasdet.engine"} & set(after)


def test_every_subpackage_is_a_lazy_attribute():
    entry_points = {"cli", "demo"}  # run as programs, not used as a library
    names = {name.removesuffix(".py") for name in os.listdir(PACKAGE)
             if not name.startswith("_") and (name.endswith(".py") or
                                              os.path.isfile(os.path.join(PACKAGE, name, "__init__.py")))}
    assert names - entry_points <= set(dir(kerasdet)), "add them to kerasdet._SUBMODULES"


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        kerasdet.nonexistent  # noqa: B018


def test_keras_runs_on_tensorflow_without_the_test_settings(tmp_path):
    # The test suite's conftest sets KERAS_BACKEND; a user's process does not, and may have no
    # keras.json either: the package must build and run a backbone there too.
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update(KERAS_HOME=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    backend, outputs, strides = _run(
        "import json, keras, numpy as np, kerasdet\n"
        "net = kerasdet.backbones.get('tiny')\n"
        "out = net(np.zeros((1, 64, 64, 3), 'float32'))\n"
        "print(json.dumps([keras.backend.backend(), sorted(out), sorted(net.strides)]))", env=env)
    assert backend == "tensorflow" and outputs == strides


def test_top_level_shortcuts_and_model_classes():
    from kerasdet.export import export_saved_model
    from kerasdet.models.faster_rcnn import FasterRCNN

    assert kerasdet.export_saved_model is export_saved_model
    assert kerasdet.models.FasterRCNN is FasterRCNN
    assert "MaskRCNN" in dir(kerasdet.models)
    with pytest.raises(AttributeError):
        kerasdet.models.NoSuchDetector  # noqa: B018
