import os

# Quiet TensorFlow's start-up banner and keep the two CI cores for the tests themselves.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so a failure reproduces."""
    import keras

    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """The held-out learning benchmark every detector's "it learns" test uses: 3 shape classes on
    128x128 textured images (COCO format, with instance masks), 256 training and 64 validation
    images, generated once per test session from fixed seeds."""
    from kerasdet.data.synthetic import make_dataset

    root = tmp_path_factory.mktemp("synthetic")
    train = make_dataset(str(root / "train"), 256, seed=1, image_size=(128, 128))
    val = make_dataset(str(root / "val"), 64, seed=2, image_size=(128, 128), split="val")
    return train, val
