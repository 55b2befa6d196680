"""torchvision MobileNetV2 reference for tests/test_mobilenet_v2.py (run as its own process).

Usage: mobilenet_v2.py OUT_DIR. Writes OUT_DIR/model.pth (state dict of a seeded random model whose
BatchNorm statistics and affine parameters are also randomized, so the BN mapping is really exercised)
and OUT_DIR/outputs.npz: "input" (the normalized network input, NHWC, odd size 97x131), the outputs
of features.3 / 6 / 13 / 18 as "C2".."C5" (NHWC) and "logits", all from eval mode.
"""
import os
import sys

import numpy as np
import torch
import torchvision

FEATURE_OUTPUTS = {"C2": 3, "C3": 6, "C4": 13, "C5": 18}


def main(out_dir):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                # Positive variances of varied size, non-trivial means and affine parameters. The
                # ranges keep activations in a sane band through 17 blocks (no ReLU6 saturation
                # everywhere, no vanishing signal).
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.weight.copy_(0.8 + 0.4 * torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
        # torchvision initializes the classifier with std 0.01; larger weights make logit errors visible.
        model.classifier[1].weight.normal_(0.0, 0.05, generator=generator)
        model.classifier[1].bias.normal_(0.0, 0.1, generator=generator)
    model.eval()
    torch.save(model.state_dict(), os.path.join(out_dir, "model.pth"))

    # A normalized-image-like input of odd size, so the symmetric padding is checked too.
    x = torch.randn(1, 3, 97, 131, generator=generator)
    outputs = {}
    with torch.no_grad():
        y = x
        for index, block in enumerate(model.features):
            y = block(y)
            for name, at in FEATURE_OUTPUTS.items():
                if at == index:
                    outputs[name] = y.permute(0, 2, 3, 1).numpy()
        logits = model(x)
    outputs["logits"] = logits.numpy()
    for name, value in outputs.items():
        print(name, value.shape, "mean abs", float(np.abs(value).mean()))
    np.savez(os.path.join(out_dir, "outputs.npz"), input=x.permute(0, 2, 3, 1).numpy(), **outputs)


if __name__ == "__main__":
    main(sys.argv[1])
