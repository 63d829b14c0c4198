"""VGG-19 with batch norm for 32x32 inputs (CIFAR).

`features`: 16 conv3x3(+bias)+BN+ReLU layers with 5 max-pools, ending at N x 512 x 1 x 1
    (pools use ceil_mode, identical at 32x32, so 28x28 inputs such as MNIST also work);
`avgpool`: adaptive average pool to 1x1 (a no-op at 32x32, keeps other input sizes working);
`fc`: the single Linear 512 -> num_classes (the logits).
NSR targets: `features` (the 512-d representation, use per_channel or it is flattened) or `fc`.
20,040,522 parameters for 10 classes.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGG_CFG", "VGGCIFAR", "vgg19_bn_cifar"]

VGG_CFG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


def make_features(cfg: list, in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        else:
            layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


class VGGCIFAR(nn.Module):
    def __init__(self, cfg: list, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.features = make_features(cfg, in_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        width = [v for v in cfg if v != "M"][-1]
        self.fc = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.fc(torch.flatten(x, 1))


def vgg19_bn_cifar(num_classes: int = 10, in_channels: int = 3) -> VGGCIFAR:
    return VGGCIFAR(VGG_CFG["vgg19"], num_classes=num_classes, in_channels=in_channels)
