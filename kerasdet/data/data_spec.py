"""The drivers' `--data` argument: which data set, read by which reader.

    voc:ROOT                      Pascal VOC folder (ImageSets/Main/<split>.txt); splits from
                                  --train-split / --val-split (e.g. trainval / test).
    coco:ANN.json:IMAGE_DIR       COCO instances file; "{split}" in either part is replaced by the
                                  split names (coco:ann/instances_{split}.json:images/{split}).
    synthetic:DIR                 kerasdet's synthetic shapes (written to DIR/train and DIR/val from
                                  fixed seeds if missing).
    synthetic-single:DIR          the single-object variant (one shape per image): the
                                  localization set of the OverFeat entries.
"""
import dataclasses
import os
import warnings

import numpy as np

__all__ = ["DataSource", "parse_data_spec", "read_class_names", "align_classes", "SYNTHETIC_SETTINGS",
           "SYNTHETIC_SINGLE_SETTINGS", "SYNTHETIC_SETS", "synthetic_generator_arguments"]

# The synthetic benchmark of the learning tests: 3 shapes on 128x128 images; validation images come
# from another seed, so they are held out.
SYNTHETIC_SETTINGS = {"train_images": 256, "val_images": 64, "train_seed": 1, "val_seed": 2,
                      "image_size": [128, 128], "num_classes": 3}
# One shape of 20..64 px per image: ILSVRC-style localization (OverFeat, section 4).
SYNTHETIC_SINGLE_SETTINGS = {"train_images": 256, "val_images": 64, "train_seed": 3, "val_seed": 4,
                             "image_size": [128, 128], "num_classes": 3, "min_objects": 1,
                             "max_objects": 1, "object_size": [20, 64]}
# The zoo's `dataset` names of the synthetic sets and their --data kinds.
SYNTHETIC_SETS = {"synthetic": ("synthetic", SYNTHETIC_SETTINGS),
                  "synthetic_single": ("synthetic-single", SYNTHETIC_SINGLE_SETTINGS)}


@dataclasses.dataclass
class DataSource:
    train: object            # DetectionDataset or None
    val: object              # DetectionDataset
    class_names: list
    class_source: str = ""   # where the names come from, for the start-of-run summary


def read_class_names(classes=None, classes_file=None):
    """The names of --classes "a,b,c" or --classes-file F (one name a line, blank lines and
    #-comments ignored), or None when neither is given."""
    if classes is not None and classes_file is not None:
        raise ValueError("give --classes or --classes-file, not both")
    if classes is not None:
        names, where = [n.strip() for n in classes.split(",")], f"--classes {classes!r}"
    elif classes_file is not None:
        if not os.path.isfile(classes_file):
            raise FileNotFoundError(f"--classes-file {classes_file!r} does not exist")
        with open(classes_file, encoding="utf-8") as handle:
            names = [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
        where = f"--classes-file {classes_file}"
    else:
        return None
    if not names or "" in names:
        raise ValueError(f"{where}: class names must be non-empty (got {names})")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{where}: repeated class names {repeated}")
    return names


def _put_in_order(dataset, names, where, what="the class names given"):
    """Relabels a data set so that its label k is ``names[k]``. A COCO-format set (category ids)
    needs exactly its own categories; a VOC set may use only some of the names (a validation split
    without a class)."""
    if list(dataset.class_names) == list(names):
        return dataset
    fits = (sorted(dataset.class_names) == sorted(names) if dataset.category_ids is not None
            else set(dataset.class_names) <= set(names))
    if not fits:
        raise ValueError(f"{where}: {what} {list(names)} do not match the data set's classes "
                         f"{list(dataset.class_names)}")
    new_label = np.array([list(names).index(n) for n in dataset.class_names], np.int32)
    for record in dataset.records:
        record.labels = new_label[record.labels] if record.num_objects else record.labels
    if dataset.category_ids is not None:
        category_of = dict(zip(dataset.class_names, dataset.category_ids))
        dataset.category_ids = [category_of[n] for n in names]
        dataset.__dict__.pop("_label_of", None)  # the id -> label lookup is rebuilt on demand
    dataset.class_names = list(names)
    return dataset


def synthetic_generator_arguments(settings):
    """make_dataset's keyword arguments (besides count and seed) of a synthetic set's settings."""
    extra = {k: (tuple(v) if isinstance(v, list) else v) for k, v in settings.items()
             if k in ("min_objects", "max_objects", "object_size")}
    return dict(image_size=tuple(settings["image_size"]), num_classes=settings["num_classes"], **extra)


def _synthetic(root, need_train, class_names, kind="synthetic", on_bad="error"):
    from kerasdet.data.coco import load_coco
    from kerasdet.data.synthetic import make_dataset

    s = SYNTHETIC_SETTINGS if kind == "synthetic" else SYNTHETIC_SINGLE_SETTINGS
    sets = {}
    for split, count, seed in (("train", s["train_images"], s["train_seed"]),
                               ("val", s["val_images"], s["val_seed"])):
        if split == "train" and not need_train:
            continue
        folder = os.path.join(root, split)
        annotation = os.path.join(folder, "annotations", f"instances_{split}.json")
        if os.path.isfile(annotation):
            sets[split] = load_coco(annotation, os.path.join(folder, "images"), on_bad=on_bad)
        else:
            sets[split] = make_dataset(folder, count, seed=seed, split=split,
                                       **synthetic_generator_arguments(s))
    return _coco_source(sets.get("train"), sets["val"], class_names, f"--data {kind}:{root}",
                        "the synthetic shapes")


def _read_splits(read, train_split, val_split, need_train):
    """(training set or None, validation set): both splits are read even when the first has bad
    records, so that one error lists the bad records of both."""
    from kerasdet.data.records import BadInputError, FatalInputError

    sets, errors = {}, []
    for split in ([train_split] if need_train else []) + [val_split]:
        try:
            sets[split] = read(split)
        except FatalInputError:
            raise
        except BadInputError as error:
            errors.append(str(error))
    if errors:
        raise BadInputError("\n".join(errors))
    return sets.get(train_split) if need_train else None, sets[val_split]


def align_classes(data, names, where, what):
    """Relabels ``data`` (a DataSource) to the label order of ``names`` (e.g. a model's classes);
    a data set with classes outside them is a ValueError naming both lists."""
    for dataset in (data.train, data.val):
        if dataset is not None:
            _put_in_order(dataset, names, where, what)
    data.class_names = list(names)
    return data


def _coco_source(train, val, class_names, where, what):
    if train is not None and list(train.class_names) != list(val.class_names):
        raise ValueError(f"{where}: the training split's categories {train.class_names} differ from the "
                         f"validation split's {val.class_names}")
    if class_names is None:
        return DataSource(train, val, list(val.class_names), what)
    for dataset in (train, val):
        if dataset is not None:
            _put_in_order(dataset, class_names, where)
    return DataSource(train, val, list(class_names), "given")


def _voc(root, spec, train_split, val_split, need_train, class_names, on_bad="error"):
    from kerasdet.data.voc import VOC_CLASSES, discover_class_names, load_voc

    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data {spec}: VOC folder {root!r} does not exist")
    if class_names is None:
        # Both splits' names before either set is read: training and validation share one order.
        splits = [train_split, val_split] if need_train else [val_split]
        class_names = discover_class_names(root, splits)
        source = "Pascal VOC's 20" if class_names == list(VOC_CLASSES) else "found in the annotations"
    else:
        source = "given"
    train, val = _read_splits(lambda split: load_voc(root, split, class_names=class_names, on_bad=on_bad),
                              train_split, val_split, need_train)
    return DataSource(train, val, list(class_names), source)


def parse_data_spec(spec, train_split="train", val_split="val", need_train=True, class_names=None,
                    on_bad="error"):
    """Reads the data sets named by ``spec`` (see the module docstring) into a DataSource.

    ``class_names`` (e.g. from --classes) fixes the names and their order (label k = name k); by
    default they come from the data (VOC: `kerasdet.data.voc.discover_class_names` over both
    splits; COCO: the categories in id order; synthetic: its shapes). ``on_bad`` is the readers'
    policy (--on-bad): "error" lists every bad record of a split in one error, "skip" drops them
    and counts them in each data set's ``report``."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"--data must look like voc:ROOT, coco:ANN.json:IMAGE_DIR or synthetic:DIR; "
                         f"got {spec!r}")
    kind, rest = spec.split(":", 1)
    if kind in ("synthetic", "synthetic-single"):
        return _synthetic(rest, need_train, class_names, kind, on_bad)
    if kind == "voc":
        return _voc(rest, spec, train_split, val_split, need_train, class_names, on_bad)
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
            return load_coco(ann, images, on_bad=on_bad)

        if "{split}" not in annotation:
            warnings.warn(f"--data {spec}: no {{split}} in the annotation path, so training and "
                          "validation use the same images", stacklevel=2)
        train, val = _read_splits(read, train_split, val_split, need_train)
        return _coco_source(train, val, class_names, f"--data {spec}", "the annotation file's categories")
    raise ValueError(f"--data {spec}: unknown kind {kind!r} (use voc, coco, synthetic or synthetic-single)")
