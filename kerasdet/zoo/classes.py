"""Class-name lists of the data sets the zoo entries are trained on (0-based ids)."""

# The 80 COCO 2017 object categories in the order of their category ids (the usual 0..79 mapping).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


# COCO category ids 1..90 leave ten ids unused; torchvision's COCO detectors keep one output per id
# (label = category id), so their 90 classes include these placeholders.
_COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)


def _coco_category_names():
    names, used = [], iter(COCO_CLASSES)
    for category_id in range(1, 91):
        names.append("N/A" if category_id in _COCO_UNUSED_IDS else next(used))
    return tuple(names)


# Class k (0-based) is COCO category id k + 1: the classes of checkpoints converted from torchvision.
COCO_CATEGORY_NAMES = _coco_category_names()


def named_classes(spec):
    """Resolves a zoo file's ``class_names``: "coco", "coco_ids" (the 90 category ids, see
    COCO_CATEGORY_NAMES), "voc", "synthetic:K" or an explicit list."""
    if isinstance(spec, (list, tuple)):
        return tuple(str(name) for name in spec)
    if spec == "coco":
        return COCO_CLASSES
    if spec == "coco_ids":
        return COCO_CATEGORY_NAMES
    if spec == "voc":
        from kerasdet.data.voc import VOC_CLASSES

        return tuple(VOC_CLASSES)
    if isinstance(spec, str) and spec.startswith("synthetic:"):
        from kerasdet.data.synthetic import SHAPES

        return tuple(SHAPES[:int(spec.split(":", 1)[1])])
    raise ValueError(f"class_names must be 'coco', 'coco_ids', 'voc', 'synthetic:K' or a list, got {spec!r}")
