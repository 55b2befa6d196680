"""torchvision's ImageNet MobileNetV2 on scikit-image's sample photos (run as its own process).

Usage: mobilenet_v2_imagenet.py OUT_DIR CHECKPOINT. Loads CHECKPOINT (torchvision's
mobilenet_v2-b0353104.pth) into `torchvision.models.mobilenet_v2()` and classifies the color photos
that ship inside the scikit-image wheel (no downloads). Preprocessing is torchvision's standard eval
transform (resize the short side to 256 with bilinear antialiased PIL resampling, center crop 224,
scale to [0, 1], normalize with ImageNet mean / std), with the resize done by PIL as torchvision does
for PIL images and the crop and normalization in numpy, so the exact uint8 224x224 crops are saved for
the Keras side. Writes OUT_DIR/imagenet.npz: "names", "pixels" uint8 [N, 224, 224, 3], "logits"
[N, 1000] and "top5" int [N, 5] (best first).
"""
import os
import sys

import numpy as np
import skimage.data
import torch
import torchvision
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def photos():
    """(name, uint8 RGB array) for each color photograph bundled with scikit-image."""
    yield "astronaut", skimage.data.astronaut()
    yield "chelsea", skimage.data.chelsea()
    yield "coffee", skimage.data.coffee()
    yield "rocket", skimage.data.rocket()
    yield "motorcycle", skimage.data.stereo_motorcycle()[0]
    yield "hubble_deep_field", skimage.data.hubble_deep_field()
    yield "retina", skimage.data.retina()


def eval_crop(image, resize=256, crop=224):
    """torchvision's Resize(256) + CenterCrop(224) on an HxWx3 uint8 array, as uint8."""
    h, w = image.shape[:2]
    # Resize(int): the short side becomes `resize`, the long side int(resize * long / short).
    if h <= w:
        new_h, new_w = resize, int(resize * w / h)
    else:
        new_h, new_w = int(resize * h / w), resize
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    return resized[top:top + crop, left:left + crop]


def main(out_dir, checkpoint):
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    model.eval()
    names, pixels = [], []
    for name, image in photos():
        names.append(name)
        pixels.append(eval_crop(np.ascontiguousarray(image[..., :3])))
    pixels = np.stack(pixels)
    x = (pixels.astype(np.float32) / 255.0 - MEAN) / STD
    with torch.no_grad():
        logits = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
    top5 = np.argsort(-logits, axis=1)[:, :5]
    for name, row, top in zip(names, logits, top5):
        print(name, "top5", top.tolist(), "logits", np.round(row[top], 3).tolist())
    np.savez(os.path.join(out_dir, "imagenet.npz"), names=np.array(names), pixels=pixels, logits=logits, top5=top5)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
