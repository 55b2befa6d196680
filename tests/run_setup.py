"""What the command-line tests share: a small synthetic run folder set-up and reading weights files."""
import json

import h5py


def write_cli_setup(root, arguments):
    """A 64x64 synthetic COCO set under `root` (8 train, 4 val images) and a Faster R-CNN config
    file with `arguments`; returns {"root", "config", "spec"} for `kerasdet train` and friends."""
    from kerasdet.data.synthetic import make_dataset

    for split, count, seed in (("train", 8, 1), ("val", 4, 2)):
        make_dataset(str(root / split), count, seed=seed, image_size=(64, 64), split=split,
                     object_size=(12, 32))
    config = root / "tiny.json"
    config.write_text(json.dumps({"class": "kerasdet.models.faster_rcnn:FasterRCNN",
                                  "arguments": arguments, "input": {"image_size": [64, 64]}}))
    spec = f"coco:{root}/{{split}}/annotations/instances_{{split}}.json:{root}/{{split}}/images"
    return {"root": root, "config": str(config), "spec": spec}


def h5_arrays(path):
    """{dataset path: array} of every array in an HDF5 file (a .weights.h5)."""
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: found.__setitem__(name, item[()])
                     if isinstance(item, h5py.Dataset) else None)
    return found
