"""torchvision side of the detector parity tests (run as a subprocess; see tests/conftest.py).

    python tests/torch_refs/detectors.py OUT_DIR ARCH

Builds torchvision's ARCH (fasterrcnn_resnet50_fpn / maskrcnn_resnet50_fpn) with random weights
from a fixed seed, widened so the test means something: random frozen-BN statistics (so the BN
mapping is exercised) and RPN / predictor weights large enough that scores are spread far beyond
float round-off (with the default 0.01 init every objectness logit is ~0 and any order is a tie).
Writes OUT_DIR/model.pth and OUT_DIR/outputs.npz (all spatial maps NHWC) with the image, FPN
features, proposals, the box head's outputs on those proposals, final detections and, for Mask
R-CNN, the 28x28 mask logits of each detection's class.
"""
import sys

import torch
import torchvision  # noqa: F401  (import before anything that could load TensorFlow)
import numpy as np


def randomized_model(arch):
    """torchvision's ARCH with random weights widened as the module docstring says, calibrated on
    a 320 x 384 crop of the astronaut photo; returns (model in eval mode, that crop)."""
    torch.manual_seed(0)
    builder = getattr(torchvision.models.detection, arch)
    # min_size / max_size equal to the image: the transform keeps the pixels as they are.
    model = builder(weights=None, weights_backbone=None, min_size=320, max_size=384).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buffer in model.state_dict().items():  # tensors shared with the model
            if name.endswith(("bn1.weight", "bn2.weight")):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
            elif name.endswith(("bn3.weight", "downsample.1.weight")):
                # Damped residual branches keep the random net's activations O(1), as trained ones are.
                buffer.copy_(0.05 + 0.2 * torch.rand(buffer.shape, generator=generator))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
            elif "bn" in name.split(".")[-2] or "downsample.1" in name:
                if name.endswith(("running_mean", ".bias")):
                    buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
    from skimage import data

    image = data.astronaut()[60:380, 64:448]  # 320 x 384 (multiples of 64: every level's stride exact)
    tensor = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)
    with torch.no_grad():
        # Rescale the score layers so their logits have a spread of ~2 on this image.
        images, _ = model.transform([tensor])
        features = model.backbone(images.tensors)
        head = model.rpn.head
        objectness = torch.cat([head.cls_logits(head.conv(f)).flatten() for f in features.values()])
        head.cls_logits.weight.mul_(2.0 / objectness.std())
        deltas = torch.cat([head.bbox_pred(head.conv(f)).flatten() for f in features.values()])
        head.bbox_pred.weight.mul_(0.2 / deltas.std())
        proposals, _ = model.rpn(images, features)
        heads = model.roi_heads
        hidden = heads.box_head(heads.box_roi_pool(features, proposals, images.image_sizes))
        heads.box_predictor.cls_score.weight.mul_(2.0 / heads.box_predictor.cls_score(hidden).std())
        heads.box_predictor.bbox_pred.weight.mul_(0.5 / heads.box_predictor.bbox_pred(hidden).std())
        if getattr(heads, "mask_predictor", None) is not None:
            heads.mask_predictor.mask_fcn_logits.weight.mul_(10.0)
    return model, image


def main(out_dir, arch):
    model, image = randomized_model(arch)
    tensor = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)
    torch.save(model.state_dict(), f"{out_dir}/model.pth")

    out = {"image": image}
    with torch.no_grad():
        images, _ = model.transform([tensor])
        features = model.backbone(images.tensors)
        for i, (name, feature) in enumerate(features.items()):
            out[f"feature_{i}"] = feature.permute(0, 2, 3, 1).numpy()
        proposals, _ = model.rpn(images, features)
        out["proposals"] = proposals[0].numpy()
        heads = model.roi_heads
        pooled = heads.box_roi_pool(features, proposals, images.image_sizes)
        class_logits, box_regression = heads.box_predictor(heads.box_head(pooled))
        out["class_logits"] = class_logits.numpy()
        out["box_regression"] = box_regression.numpy()
        detections = model([tensor])[0]
        for key in ("boxes", "scores", "labels"):
            out[f"det_{key}"] = detections[key].numpy()
        if "masks" in detections:
            mask_pooled = heads.mask_roi_pool(features, [detections["boxes"]], images.image_sizes)
            logits = heads.mask_predictor(heads.mask_head(mask_pooled))
            index = torch.arange(logits.shape[0])
            out["det_mask_logits"] = logits[index, detections["labels"]].numpy()
    np.savez(f"{out_dir}/outputs.npz", **out)
    print(arch, {k: v.shape for k, v in out.items()}, "detections:", len(out["det_scores"]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
