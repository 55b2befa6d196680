"""Issue 18: the serving signatures of an exported SavedModel answer bad requests (wrong dtype, wrong
rank, empty batch, 1x1 image, bytes that are not an image, a decompression bomb) with an error, and
the serving process (tf.saved_model.load in a subprocess) keeps answering good requests."""
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from kerasdet.export import export_saved_model
from kerasdet.models.faster_rcnn import FasterRCNN
from test_reliability_data import _bomb_png

TINY = dict(backbone="tiny", fpn_channels=16, fc_dim=32, anchor_sizes=((16,), (32,), (64,), (128,), (256,)),
            rpn_pre_nms_top_k_test=100, rpn_post_nms_top_k_test=50, score_threshold=0.0, seed=0)

SERVER = textwrap.dedent('''
    import json, sys
    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(sys.argv[1])
    images, as_bytes = loaded.signatures["serving_default"], loaded.signatures["serving_bytes"]
    png, bomb = open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
    cases = {
        "wrong dtype": lambda: images(images=tf.zeros([1, 32, 32, 3], tf.float32)),
        "wrong rank": lambda: images(images=tf.zeros([32, 32, 3], tf.uint8)),
        "empty batch": lambda: images(images=tf.zeros([0, 32, 32, 3], tf.uint8)),
        "zero-sized image": lambda: images(images=tf.zeros([1, 0, 32, 3], tf.uint8)),
        "1x1 image": lambda: images(images=tf.zeros([1, 1, 1, 3], tf.uint8)),
        "bytes that are not an image": lambda: as_bytes(encoded_images=tf.constant([png, b"hello"])),
        "empty bytes batch": lambda: as_bytes(encoded_images=tf.zeros([0], tf.string)),
        "decompression bomb": lambda: as_bytes(encoded_images=tf.constant([bomb])),
        "good bytes": lambda: as_bytes(encoded_images=tf.constant([png])),
        "good batch": lambda: images(images=tf.zeros([2, 40, 64, 3], tf.uint8)),
    }
    answers = {}
    for name, call in cases.items():
        try:
            out = call()
            answers[name] = {"ok": [int(v) for v in out["num_detections"].shape]}
        except Exception as error:
            answers[name] = {"error": type(error).__name__, "message": str(error)[-800:]}
    print("ANSWERS " + json.dumps(answers), flush=True)
''')


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import keras

    keras.utils.set_random_seed(7)
    model = FasterRCNN(3, **TINY)
    model.build((1, 64, 64, 3))
    folder = tmp_path_factory.mktemp("serve")
    export_saved_model(model, str(folder / "saved_model"), portable=True, image_size=(64, 64))
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(png, "PNG")
    (folder / "a.png").write_bytes(png.getvalue())
    _bomb_png(str(folder / "bomb.png"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    process = subprocess.run([sys.executable, "-c", SERVER, str(folder / "saved_model"), str(folder / "a.png"),
                              str(folder / "bomb.png")], capture_output=True, text=True, env=env,
                             timeout=600)
    assert process.returncode == 0, (process.returncode, process.stderr[-3000:])  # no crash
    line = [l for l in process.stdout.splitlines() if l.startswith("ANSWERS ")][-1]
    return json.loads(line[len("ANSWERS "):])


@pytest.mark.parametrize("case, words", [
    ("wrong dtype", "expected to be a uint8 tensor"), ("wrong rank", ""),
    ("empty batch", "serving_default: empty batch"), ("zero-sized image", "height or width 0"),
    ("bytes that are not an image", "serving_bytes: input 1] [is not a JPEG"),
    ("empty bytes batch", "serving_bytes: empty batch"),
    ("decompression bomb", "more pixels than the limit of 100000000")])
def test_bad_requests_get_errors(served, case, words):
    answer = served[case]
    assert "error" in answer, answer
    assert words in answer["message"], answer


def test_good_requests_still_answered_after_the_bad_ones(served):
    assert served["1x1 image"] == {"ok": [1]}  # tiny but valid: resized up, answered
    assert served["good bytes"] == {"ok": [1]}
    assert served["good batch"] == {"ok": [2]}
