"""The drivers' `--data` argument: which data set, read by which reader.

    voc:ROOT                      Pascal VOC folder (ImageSets/Main/<split>.txt); splits from
                                  --train-split / --val-split (e.g. trainval / test).
    coco:ANN.json:IMAGE_DIR       COCO instances file; "{split}" in either part is replaced by the
                                  split names (coco:ann/instances_{split}.json:images/{split}).
    synthetic:DIR                 kerasdet's synthetic shapes (written to DIR/train and DIR/val from
                                  fixed seeds if missing).
"""
import dataclasses
import os
import warnings

__all__ = ["DataSource", "parse_data_spec", "SYNTHETIC_SETTINGS"]

# The synthetic benchmark of the learning tests: 3 shapes on 128x128 images; validation images come
# from another seed, so they are held out.
SYNTHETIC_SETTINGS = {"train_images": 256, "val_images": 64, "train_seed": 1, "val_seed": 2,
                      "image_size": [128, 128], "num_classes": 3}


@dataclasses.dataclass
class DataSource:
    train: object            # DetectionDataset or None
    val: object              # DetectionDataset
    class_names: list


def _synthetic(root, need_train):
    from kerasdet.data.coco import load_coco
    from kerasdet.data.synthetic import make_dataset

    s = SYNTHETIC_SETTINGS
    sets = {}
    for split, count, seed in (("train", s["train_images"], s["train_seed"]),
                               ("val", s["val_images"], s["val_seed"])):
        if split == "train" and not need_train:
            continue
        folder = os.path.join(root, split)
        annotation = os.path.join(folder, "annotations", f"instances_{split}.json")
        if os.path.isfile(annotation):
            sets[split] = load_coco(annotation, os.path.join(folder, "images"))
        else:
            sets[split] = make_dataset(folder, count, seed=seed, image_size=tuple(s["image_size"]),
                                       num_classes=s["num_classes"], split=split)
    return DataSource(sets.get("train"), sets["val"], list(sets["val"].class_names))


def parse_data_spec(spec, train_split="train", val_split="val", need_train=True):
    """Reads the data sets named by ``spec`` (see the module docstring) into a DataSource."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"--data must look like voc:ROOT, coco:ANN.json:IMAGE_DIR or synthetic:DIR; "
                         f"got {spec!r}")
    kind, rest = spec.split(":", 1)
    if kind == "synthetic":
        return _synthetic(rest, need_train)
    if kind == "voc":
        from kerasdet.data.voc import load_voc

        if not os.path.isdir(rest):
            raise FileNotFoundError(f"--data {spec}: VOC folder {rest!r} does not exist")
        train = load_voc(rest, train_split) if need_train else None
        val = load_voc(rest, val_split)
        return DataSource(train, val, list(val.class_names))
    if kind == "coco":
        from kerasdet.data.coco import load_coco

        parts = rest.rsplit(":", 1)
        if len(parts) != 2:
            raise ValueError(f"--data {spec}: COCO needs coco:ANN.json:IMAGE_DIR")
        annotation, image_dir = parts

        def read(split):
            ann, images = annotation.replace("{split}", split), image_dir.replace("{split}", split)
            if not os.path.isfile(ann):
                raise FileNotFoundError(f"--data {spec}: annotation file {ann!r} does not exist")
            return load_coco(ann, images)

        if "{split}" not in annotation:
            warnings.warn(f"--data {spec}: no {{split}} in the annotation path, so training and "
                          "validation use the same images", stacklevel=2)
        train = read(train_split) if need_train else None
        val = read(val_split)
        return DataSource(train, val, list(val.class_names))
    raise ValueError(f"--data {spec}: unknown kind {kind!r} (use voc, coco or synthetic)")
