"""torchvision VGG-16 reference for tests/test_converters_vgg.py (run as its own process).

Usage: vgg16.py OUT_DIR. Writes OUT_DIR/model.pth (state dict of a seeded random-weight
torchvision vgg16) and OUT_DIR/outputs.npz: "input" (a normalized-image-like input, NHWC, 224x224),
"conv4_3" and "conv5_3" (the ReLU outputs of features.21 / features.28, NHWC) and "logits" (the
whole network in eval mode).
"""
import os
import sys

import numpy as np
import torch
import torchvision

# Index of the ReLU that follows each compared conv in torchvision's `features`.
FEATURE_OUTPUTS = {"conv4_3": 22, "conv5_3": 29}


def main(out_dir):
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None)
    model.eval()
    torch.save(model.state_dict(), os.path.join(out_dir, "model.pth"))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    outputs = {"input": x.permute(0, 2, 3, 1).numpy()}
    with torch.no_grad():
        y = x
        for index, layer in enumerate(model.features):
            y = layer(y)
            for name, at in FEATURE_OUTPUTS.items():
                if at == index:
                    outputs[name] = y.permute(0, 2, 3, 1).numpy()
        outputs["logits"] = model(x).numpy()
    np.savez(os.path.join(out_dir, "outputs.npz"), **outputs)


if __name__ == "__main__":
    main(sys.argv[1])
