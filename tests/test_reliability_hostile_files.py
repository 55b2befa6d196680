"""Hostile files (issue 18): a PyTorch checkpoint carrying a pickled object other than tensors is
refused by the weights-only loader before its code runs, and a .keras file whose config holds Python
code (a Lambda layer's bytecode) is refused by Keras' safe mode through kerasdet's loaders."""
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from kerasdet.converters.core import ConversionError, read_torch_checkpoint

# Runs in its own interpreter: torch.save of an object whose unpickling would create a marker file.
_CRAFT = textwrap.dedent("""
    import sys
    import torch

    class Payload:
        def __reduce__(self):
            # what a malicious checkpoint would do on load: run code (here: create a file)
            return (open, (sys.argv[2], "w"))

    torch.save({"conv.weight": torch.zeros(2, 2), "payload": Payload()}, sys.argv[1])
""")


def test_a_checkpoint_with_pickled_code_is_refused_and_the_code_never_runs(tmp_path):
    checkpoint, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    done = subprocess.run([sys.executable, "-c", _CRAFT, str(checkpoint), str(marker)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "No module named 'torch'" in done.stderr:
        pytest.skip("torch is not installed (the torch-weights extra)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert checkpoint.exists() and not marker.exists()
    with pytest.raises(ConversionError, match="evil.pth"):
        read_torch_checkpoint(str(checkpoint))
    assert not marker.exists(), "the checkpoint's pickled code ran"


def test_a_keras_file_with_python_code_is_refused_in_safe_mode(tmp_path):
    from kerasdet.engine.model_spec import resolve_model
    from kerasdet.models import load_model

    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2.0)(inputs)  # serialized as Python bytecode
    path = str(tmp_path / "unsafe.keras")
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(ValueError, match="safe_mode"):
        load_model(path)
    with pytest.raises(ValueError, match="safe_mode"):
        resolve_model(path, weights=None)
    # the caller can opt in explicitly for a file they trust
    model = load_model(path, safe_mode=False)
    np.testing.assert_allclose(model(np.ones((1, 4), np.float32)), 2.0)
    assert os.path.getsize(path) > 0


def test_an_entity_expansion_bomb_in_voc_xml_is_refused_naming_the_file(tmp_path):
    """"Billion laughs": nested entities that expand a few hundred bytes into gigabytes. Python's expat
    (>= 2.4) stops the amplification; the reader names the file, and under on_bad='skip' the other
    records load."""
    from kerasdet.data.records import BadInputError
    from kerasdet.data.synthetic import make_dataset
    from kerasdet.data.voc import load_voc

    make_dataset(str(tmp_path), 3, seed=1, image_size=(32, 32), format="voc", object_size=(8, 16),
                 min_objects=1)
    entities = "".join(f'<!ENTITY lol{i} "{("&lol%d;" % (i - 1)) * 10 if i > 1 else "lol" * 10}">'
                       for i in range(1, 10))
    bomb = (f'<?xml version="1.0"?><!DOCTYPE annotation [{entities}]>'
            "<annotation><filename>&lol9;</filename></annotation>")
    target = tmp_path / "Annotations" / "000001.xml"
    target.write_text(bomb)
    with pytest.raises(BadInputError, match="000001.xml"):
        load_voc(str(tmp_path), "train")
    with pytest.warns(Warning):
        survivors = load_voc(str(tmp_path), "train", on_bad="skip")
    assert len(survivors) == 2
