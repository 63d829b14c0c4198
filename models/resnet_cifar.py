"""ResNet-18 for 32x32 inputs (CIFAR): 3x3 stem, no max-pool, four BasicBlock stages.

Module names read well as NSR targets: `conv1`, `bn1`, `layer1` ... `layer4` (the last stage),
`avgpool` (N x 512 x 1 x 1 features) and `fc` (the logits).
11,173,962 parameters for 10 classes.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNetCIFAR", "resnet18_cifar"]


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity shortcut, or 1x1 conv+BN when the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10,
                 in_channels: int = 3, widths: tuple[int, ...] = (64, 128, 256, 512)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        for i, (n, planes) in enumerate(zip(blocks, widths), start=1):
            stride = 1 if i == 1 else 2
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.num_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        x = self.avgpool(x)
        return self.fc(torch.flatten(x, 1))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNetCIFAR:
    return ResNetCIFAR((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)
