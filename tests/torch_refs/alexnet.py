"""torchvision AlexNet reference for tests/test_alexnet.py (run as its own process).

Usage: alexnet.py OUT_DIR SIZE. Writes OUT_DIR/model.pth (state dict of a seeded random-weight
torchvision alexnet) and OUT_DIR/outputs.npz: "input" (normalized-image-like, NHWC, SIZE x SIZE, batch 2),
"pool5" (features' output, NHWC), "fc7" (classifier.5, the ReLU after fc7) and "logits" (eval mode).
"""
import os
import sys

import numpy as np
import torch
import torchvision


def main(out_dir, size):
    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None)
    model.eval()
    torch.save(model.state_dict(), os.path.join(out_dir, "model.pth"))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    outputs = {"input": x.permute(0, 2, 3, 1).numpy()}
    with torch.no_grad():
        pool5 = model.features(x)
        outputs["pool5"] = pool5.permute(0, 2, 3, 1).numpy()
        flat = torch.flatten(model.avgpool(pool5), 1)
        outputs["fc7"] = model.classifier[:6](flat).numpy()
        outputs["logits"] = model(x).numpy()
    np.savez(os.path.join(out_dir, "outputs.npz"), **outputs)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
