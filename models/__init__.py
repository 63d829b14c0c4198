"""Plain PyTorch models; nothing here imports nsr/."""

from __future__ import annotations

import math

from torch import nn

from .mlp import MLP, MLP_HIDDEN
from .resnet_cifar import resnet18_cifar
from .vgg import vgg19_bn_cifar


def _resnet18_cifar(num_classes, in_shape):
    return resnet18_cifar(num_classes=num_classes, in_channels=in_shape[0])


def _vgg19_cifar(num_classes, in_shape):
    return vgg19_bn_cifar(num_classes=num_classes, in_channels=in_shape[0])


def _resnet50(num_classes, in_shape):
    try:
        from torchvision.models import resnet50
    except ImportError:
        raise ValueError("model 'resnet50' needs torchvision; install it (pip install torchvision)") from None
    model = resnet50(weights=None, num_classes=num_classes)
    if in_shape[0] != 3:
        # torchvision's stem takes 3 channels; the same conv for in_shape[0], with torchvision's init.
        # For 3 channels the model is left exactly as torchvision builds it.
        stem = model.conv1
        model.conv1 = nn.Conv2d(in_shape[0], stem.out_channels, stem.kernel_size, stem.stride,
                                stem.padding, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def _mlp(hidden):
    return lambda num_classes, in_shape, dropout=0.0: MLP(math.prod(in_shape), hidden, num_classes, dropout)


# name -> builder(num_classes, in_shape), MLPs also (..., dropout); in_shape is one sample's shape,
# e.g. (1, 28, 28). CNNs take (channels, height, width), any channel count and any size >= 1 x 1.
MODELS = {name: _mlp(hidden) for name, hidden in MLP_HIDDEN.items()}
MODELS.update(resnet18=_resnet18_cifar, vgg19=_vgg19_cifar, resnet50=_resnet50)


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def build_model(name: str, num_classes: int, in_shape: tuple[int, ...], *, dropout: float = 0.0) -> nn.Module:
    """The model `name` for `num_classes` classes and samples of shape `in_shape`.

    dropout: rate p after each hidden activation of an MLP (0 = the paper's model); CNNs take 0 only.
    Anything the model cannot take raises ValueError with one line naming the problem and the fix.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if not _is_positive_int(num_classes):
        raise ValueError(f"model {name!r} needs a positive integer number of classes, got {num_classes!r}")
    shape = tuple(in_shape)
    if not shape or not all(_is_positive_int(n) for n in shape):
        raise ValueError(f"model {name!r} cannot take input shape {shape}: every size must be a "
                         "positive integer; check the data set")
    check_dropout(name, dropout)
    if is_mlp(name):
        return MODELS[name](num_classes, shape, dropout)
    if len(shape) != 3:
        raise ValueError(f"model {name!r} needs images of shape (channels, height, width), got {shape}; "
                         f"use an MLP ({', '.join(MLP_HIDDEN)}) for flat inputs")
    return MODELS[name](num_classes, shape)


def check_dropout(name: str, dropout: float) -> None:
    """ValueError unless model `name` can take dropout rate `dropout`: a rate in [0, 1), and 0 for
    the CNNs, which have no dropout layers."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a rate in [0, 1), got {dropout!r}")
    if dropout != 0 and not is_mlp(name):
        raise ValueError(f"dropout is only for MLPs ({', '.join(MLP_HIDDEN)}); model {name!r} has none: "
                         "set dropout to 0")


def is_mlp(name: str) -> bool:
    return name in MLP_HIDDEN
