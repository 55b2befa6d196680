"""torchvision side of the command-line parity test on a photo that needs padding.

    python tests/torch_refs/detector_photo.py OUT_DIR ARCH

The randomized, calibrated model of detectors.py, run with torchvision's default transform
(shorter side 800, longer side at most 1333, padded to a multiple of 32) on scikit-image's `chelsea`
photo (300 x 451: resized to 800 x 1202, padded to 800 x 1216). Writes OUT_DIR/model.pth,
OUT_DIR/photo.png and OUT_DIR/outputs.npz with the detections in the photo's pixels (and, for Mask
R-CNN, their binary masks at the photo's size) and the resized and padded sizes torchvision used.
"""
import sys

import torch
import torchvision  # noqa: F401  (import before anything that could load TensorFlow)
import numpy as np

from detectors import randomized_model


def main(out_dir, arch):
    from PIL import Image
    from skimage import data

    model, _ = randomized_model(arch)
    model.transform.min_size = (800,)
    model.transform.max_size = 1333
    torch.save(model.state_dict(), f"{out_dir}/model.pth")
    photo = data.chelsea()
    Image.fromarray(photo).save(f"{out_dir}/photo.png")
    tensor = torch.from_numpy(photo.astype(np.float32) / 255.0).permute(2, 0, 1)
    with torch.no_grad():
        images, _ = model.transform([tensor])
        detections = model([tensor])[0]
    out = {f"det_{key}": detections[key].numpy() for key in ("boxes", "scores", "labels")}
    if "masks" in detections:  # Mask R-CNN: torchvision's masks pasted into the photo, at its 0.5 threshold
        out["det_masks"] = (detections["masks"][:, 0] >= 0.5).numpy()
    out["resized_size"] = np.array(images.image_sizes[0])
    out["padded_size"] = np.array(images.tensors.shape[-2:])
    np.savez(f"{out_dir}/outputs.npz", **out)
    print(arch, "resized", out["resized_size"], "padded", out["padded_size"],
          "detections:", len(out["det_scores"]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
