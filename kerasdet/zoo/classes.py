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


def named_classes(spec):
    """Resolves a zoo file's ``class_names``: "coco", "voc", "synthetic:K" or an explicit list."""
    if isinstance(spec, (list, tuple)):
        return tuple(str(name) for name in spec)
    if spec == "coco":
        return COCO_CLASSES
    if spec == "voc":
        from kerasdet.data.voc import VOC_CLASSES

        return tuple(VOC_CLASSES)
    if isinstance(spec, str) and spec.startswith("synthetic:"):
        from kerasdet.data.synthetic import SHAPES

        return tuple(SHAPES[:int(spec.split(":", 1)[1])])
    raise ValueError(f"class_names must be 'coco', 'voc', 'synthetic:K' or a list, got {spec!r}")
