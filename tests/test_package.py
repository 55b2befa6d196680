import importlib

import pytest

import kerasdet


def test_version_is_pep440():
    from packaging.version import Version

    assert Version(kerasdet.__version__) >= Version("0.1.0")


def test_submodules_load_lazily():
    ops = kerasdet.ops
    assert ops is importlib.import_module("kerasdet.ops")


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        kerasdet.nonexistent  # noqa: B018


def test_keras_runs_on_tensorflow():
    import keras

    assert keras.backend.backend() == "tensorflow"


def test_top_level_shortcuts_and_model_classes():
    from kerasdet.export import export_saved_model
    from kerasdet.models.faster_rcnn import FasterRCNN

    assert kerasdet.export_saved_model is export_saved_model
    assert kerasdet.models.FasterRCNN is FasterRCNN
    assert "MaskRCNN" in dir(kerasdet.models)
    with pytest.raises(AttributeError):
        kerasdet.models.NoSuchDetector  # noqa: B018
