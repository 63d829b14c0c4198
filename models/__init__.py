"""Plain PyTorch models; nothing here imports nsr/."""

from __future__ import annotations

import math

from torch import nn

from .mlp import MLP, MLP_HIDDEN


def _resnet18_cifar(num_classes, in_shape):
    from .resnet_cifar import resnet18_cifar
    return resnet18_cifar(num_classes=num_classes, in_channels=in_shape[0])


def _vgg19_cifar(num_classes, in_shape):
    from .vgg import vgg19_bn_cifar
    return vgg19_bn_cifar(num_classes=num_classes, in_channels=in_shape[0])


def _resnet50(num_classes, in_shape):
    from torchvision.models import resnet50
    return resnet50(weights=None, num_classes=num_classes)


def _mlp(hidden):
    return lambda num_classes, in_shape: MLP(math.prod(in_shape), hidden, num_classes)


# name -> builder(num_classes, in_shape); in_shape is one sample's shape, e.g. (1, 28, 28).
MODELS = {name: _mlp(hidden) for name, hidden in MLP_HIDDEN.items()}
MODELS.update(resnet18=_resnet18_cifar, vgg19=_vgg19_cifar, resnet50=_resnet50)


def build_model(name: str, num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](num_classes, tuple(in_shape))


def is_mlp(name: str) -> bool:
    return name in MLP_HIDDEN
