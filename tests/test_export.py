"""SavedModel export: TF OD API outputs, portable graph loaded where kerasdet is not importable,
equality with model.predict, encoded-bytes signature, and the .keras round trip."""
import io
import json
import os
import site
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import kerasdet
from kerasdet.export import export_saved_model
from kerasdet.models.faster_rcnn import FasterRCNN

TINY = dict(backbone="tiny", fpn_channels=16, fc_dim=32, anchor_sizes=((16,), (32,), (64,), (128,), (256,)),
            rpn_pre_nms_top_k_test=100, rpn_post_nms_top_k_test=50, score_threshold=0.0, seed=0)
CANVAS = (64, 64)


@pytest.fixture(scope="module")
def model():
    import keras

    keras.utils.set_random_seed(7)
    detector = FasterRCNN(3, **TINY)
    detector.build((1, *CANVAS, 3))
    return detector


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("export") / "saved_model")
    export_saved_model(model, path, portable=True, image_size=CANVAS)
    return path


def _images():
    rng = np.random.default_rng(3)
    # 48 x 64: resized by 1 (fits the 64 x 64 canvas), padded at the bottom: exercises the padding.
    return rng.integers(0, 256, size=(2, 48, 64, 3), dtype=np.uint8)


def _reference(model, images):
    """model.predict on the same padded canvas, converted to the TF OD API layout with numpy."""
    batch, height, width = images.shape[:3]
    canvas = np.zeros((batch, *CANVAS, 3), np.float32)
    canvas[:, :height, :width] = images
    info = np.tile(np.array([[height, width, 1.0, 1.0, height, width]], np.float32), (batch, 1))
    out = model.predict({"images": canvas, "image_info": info}, verbose=0)
    boxes = out["boxes"]
    valid = out["classes"] >= 0
    normalized = np.stack([boxes[..., 1] / height, boxes[..., 0] / width,
                           boxes[..., 3] / height, boxes[..., 2] / width], axis=-1)
    return {"detection_boxes": np.where(valid[..., None], np.clip(normalized, 0, 1), 0),
            "detection_scores": np.where(valid, out["scores"], 0),
            "detection_classes": np.where(valid, out["classes"] + 1, 0).astype(np.float32),
            "num_detections": out["num_detections"].astype(np.float32)}


_CHILD = r"""
import json, sys
sys.path.append(sys.argv[1])  # the environment's site-packages, without its .pth files
try:
    import kerasdet
    print(json.dumps({"kerasdet_importable": True})); sys.exit(0)
except ImportError:
    pass
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[2])
images = np.load(sys.argv[3])
out = loaded.signatures["serving_default"](images=tf.constant(images))
with open(sys.argv[3] + ".png", "rb") as f:
    data = f.read()
out_bytes = loaded.signatures["serving_bytes"](encoded_images=tf.constant([data]))
result = {k: v.numpy().tolist() for k, v in out.items()}
result["bytes"] = {k: v.numpy().tolist() for k, v in out_bytes.items()}
result["kerasdet_importable"] = False
print(json.dumps(result))
"""


def test_portable_saved_model_runs_without_kerasdet_and_matches_predict(model, exported, tmp_path):
    images = _images()
    np.save(tmp_path / "images.npy", images)
    buffer = io.BytesIO()
    Image.fromarray(images[0]).save(buffer, format="PNG")
    (tmp_path / "images.npy.png").write_bytes(buffer.getvalue())
    site_packages = [p for p in site.getsitepackages() if p.endswith("site-packages")][0]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    # -I: no cwd / user site on sys.path; -S: no .pth processing (the editable install of kerasdet
    # is a .pth hook), so kerasdet cannot be imported in the child, TensorFlow can.
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", _CHILD, site_packages, exported,
                           str(tmp_path / "images.npy")], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kerasdet_importable"] is False
    expected = _reference(model, images)
    assert expected["num_detections"].min() > 0  # something to compare
    for key, value in expected.items():
        np.testing.assert_allclose(np.array(result[key]), value, atol=1e-4, err_msg=key)
    # Encoded PNG of the first image -> the same detections as the uint8 batch.
    for key, value in expected.items():
        np.testing.assert_allclose(np.array(result["bytes"][key])[0], value[0], atol=1e-4, err_msg=key)
    classes = np.array(result["detection_classes"])
    assert classes.min() >= 0 and classes.max() <= 3  # 1-based, 0 only on padded rows


def test_export_is_reachable_from_the_package_and_checks_its_arguments(model, exported, tmp_path):
    assert kerasdet.export.export_saved_model is export_saved_model
    with pytest.raises(FileExistsError, match="not empty"):
        export_saved_model(model, exported, image_size=CANVAS)
    with pytest.raises(ValueError, match="image_size"):
        export_saved_model(model, str(tmp_path / "x"))  # no zoo input settings on this model
    with pytest.raises(ValueError, match="image_size"):
        export_saved_model(model, str(tmp_path / "y"), image_size=(0, 5))


def test_keras_file_round_trip_predicts_the_same(model, tmp_path):
    import keras

    path = str(tmp_path / "model.keras")
    model.save(path)
    clone = keras.saving.load_model(path)
    images = _images().astype(np.float32)
    a = model.predict_on_batch(images)
    b = clone.predict_on_batch(images)
    for key in ("boxes", "scores", "classes", "num_detections"):
        np.testing.assert_allclose(np.asarray(b[key]), np.asarray(a[key]), atol=1e-6, err_msg=key)
    assert clone.get_config() == model.get_config()


def test_mask_model_exports_box_relative_mask_probabilities(tmp_path):
    import tensorflow as tf

    from kerasdet.models.mask_rcnn import MaskRCNN

    model = MaskRCNN(2, mask_channels=8, mask_num_convs=1, **TINY)
    model.build((1, *CANVAS, 3))
    path = str(tmp_path / "mask_model")
    export_saved_model(model, path, image_size=CANVAS)
    assert model.paste_masks  # restored after tracing
    out = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(_images()[:1]))
    masks = out["detection_masks"].numpy()
    n = int(out["num_detections"][0])
    assert masks.shape == (1, 100, model.mask_size, model.mask_size)
    assert n > 0 and 0.0 <= masks.min() and masks.max() <= 1.0
    assert np.all(masks[0, n:] == 0)
