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


@pytest.fixture(scope="module", autouse=True)
def _free_keras_state():
    """Each test process runs many files; without this, the models and traced functions of every
    finished file stay reachable through Keras' global state and a process grew to 14 GB (a test
    worker was killed for memory). No model outlives its file: session fixtures hold data only."""
    yield
    import gc

    import keras

    keras.backend.clear_session()
    # the pipelines' records of what this process read (to name a decoder failure) start empty for
    # each file, as in a fresh run
    from kerasdet.data import pipeline, tfrecord

    pipeline._plain_pipelines.clear()
    tfrecord._opened_files.clear()
    gc.collect()


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


@pytest.fixture(scope="session")
def shapes_with_proposals(tmp_path_factory):
    """The region detectors' learning set (R-CNN, SPP-net): 96 training and 24 held-out 96x96
    images of the shapes with their selective-search proposals (at most 300 per image) cached once:
    (train, val, {"train": cache file, "val": cache file})."""
    from kerasdet.data.proposals import write_proposal_cache
    from kerasdet.data.synthetic import make_dataset

    root = tmp_path_factory.mktemp("shapes_with_proposals")
    train = make_dataset(str(root / "train"), 96, seed=1, image_size=(96, 96), object_size=(16, 48))
    val = make_dataset(str(root / "val"), 24, seed=2, image_size=(96, 96), object_size=(16, 48),
                       split="val")
    caches = {}
    for name, data in (("train", train), ("val", val)):
        caches[name] = str(root / f"proposals_{name}.npz")
        write_proposal_cache(data, caches[name], progress=False, max_proposals=300)
    return train, val, caches


# -- torchvision references ----------------------------------------------------------------------
# torchvision segfaults when imported into a process that has already loaded TensorFlow (measured
# with torch 2.14.1 / torchvision 0.29.1), so the reference side of every parity test runs in its own
# interpreter: tests/torch_refs/<script>.py OUT_DIR [ARGS] builds the torchvision model, writes its
# state dict (.pth), inputs and outputs (.npz) to OUT_DIR; the test converts and compares in-process.
TORCH_REFS = os.path.join(os.path.dirname(__file__), "torch_refs")
_torch_state = {}


def _torchvision_status():
    if "status" not in _torch_state:
        import subprocess
        import sys

        probe = subprocess.run([sys.executable, "-c", "import torch, torchvision; print(torch.__version__, "
                                "torchvision.__version__)"], capture_output=True, text=True, timeout=600)
        _torch_state["status"] = (probe.returncode == 0, (probe.stdout or probe.stderr).strip()[-300:])
    return _torch_state["status"]


@pytest.fixture(scope="session")
def torch_reference(tmp_path_factory):
    """run(script, *args) -> output folder of tests/torch_refs/<script>.py, cached per session.

    Skips (naming the reason) when torch / torchvision cannot be imported, i.e. where the test
    extra's torch could not be installed; `make test` installs them, so there they always run.
    """
    import subprocess
    import sys

    available, detail = _torchvision_status()
    if not available:
        pytest.skip(f"torch/torchvision not importable, parity test skipped: {detail}")
    cache = {}

    def run(script, *args):
        key = (script,) + tuple(str(a) for a in args)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"torchref_{script}")
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
            done = subprocess.run([sys.executable, os.path.join(TORCH_REFS, f"{script}.py"), str(out), *key[1:]],
                                  capture_output=True, text=True, timeout=1200, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"torch reference {script} {list(key[1:])} failed "
                                   f"(exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            cache[key] = out
        return cache[key]

    return run
