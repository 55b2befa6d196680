"""kerasdet.converters: PyTorch (torchvision-format) checkpoints -> kerasdet models.

    model = kerasdet.converters.convert_detector("maskrcnn_resnet50_fpn_coco.pth", "maskrcnn_resnet50_fpn")
    sha256 = kerasdet.converters.save_converted(model, "maskrcnn_r50_fpn_coco.weights.h5")

torch is needed only to read `.pth` files (`pip install 'kerasdet[torch-weights]'`); state dicts of
numpy arrays convert without it. Each converter maps every weight 1:1 and loads all or nothing.
"""
from kerasdet.converters.alexnet import alexnet_key_map, convert_alexnet
from kerasdet.converters.core import ConversionError, Target, assign, read_torch_checkpoint, save_converted
from kerasdet.converters.torchvision import (convert_detector, convert_resnet, detector_config,
                                            fpn_detector_key_map, normalize_keys, resnet_key_map)

__all__ = ["ConversionError", "Target", "assign", "read_torch_checkpoint", "save_converted", "convert_detector",
           "convert_resnet", "detector_config", "fpn_detector_key_map", "normalize_keys", "resnet_key_map",
           "alexnet_key_map", "convert_alexnet"]
