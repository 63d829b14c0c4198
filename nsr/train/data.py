"""Data sets: which ones exist, and each one's train/val/test batches on the training device.

Small image sets (MNIST, Fashion-MNIST, digits, CIFAR-10, fake) live in memory as tensors,
converted once, on the training device; a batch is an index slice, and CIFAR augmentation runs
as batched tensor ops. ImageNet streams through DataLoader workers (imagefolder.py). The
seeded batching is in batches.py, the files themselves are read by datasets.py.
"""

from __future__ import annotations

import numpy as np
import torch

from models import is_mlp

from . import augment
from .batches import Data, TensorBatches, check_batch_size, split, validation_size
from .datasets import (
    check_data_dir,
    cifar10_arrays,
    digits_arrays,
    fake_arrays,
    idx_arrays,
)
from .errors import UserError
from .imagefolder import load_imagefolder

# name -> (input shape, classes); `fake` takes the shape of the model's usual data set, and an
# ImageFolder (imagenet) as many classes as train/ has class folders.
DATASETS = {
    "mnist": ((1, 28, 28), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "digits": ((1, 8, 8), 10),
    "cifar10": ((3, 32, 32), 10),
    "imagenet": ((3, 224, 224), 1000),
    "fake": None,
}
__all__ = ["DATASETS", "load_data", "channels_last", "check_labels"]


def check_labels(y: np.ndarray | torch.Tensor, num_classes: int, what: str) -> None:
    y = np.asarray(y)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"{what} labels lie in [{y.min()}, {y.max()}] but the model has {num_classes} "
                        f"classes (valid labels 0..{num_classes - 1}); check the data set")


# ---------------------------------------------------------------------------------- data sets

def fake_shape(model: str) -> tuple[tuple[int, ...], int]:
    if is_mlp(model):
        return DATASETS["mnist"]
    return DATASETS["imagenet"] if model == "resnet50" else DATASETS["cifar10"]


def _arrays(cfg):
    """(train_x, train_y, test_x, test_y, classes): uint8 images N x C x H x W, integer labels."""
    if cfg.dataset == "fake":
        shape, classes = fake_shape(cfg.model)
        return (*fake_arrays(shape, classes, cfg.fake_size, cfg.seed), classes)
    if cfg.dataset in ("mnist", "fashion-mnist"):
        arrays = idx_arrays(cfg.dataset, cfg.data_dir)
    elif cfg.dataset == "digits":
        arrays = digits_arrays()
    else:
        arrays = cifar10_arrays(cfg.data_dir)
    return (*arrays, DATASETS[cfg.dataset][1])


def channels_last(cfg, device: torch.device) -> bool:
    """CNN batches and weights in NHWC: faster convolutions on CUDA (cfg.channels_last=auto)."""
    return (not is_mlp(cfg.model)) and (
        cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda"))


def load_data(cfg, device: torch.device, rank: int = 0, world: int = 1) -> Data:
    """Train/val/test batches for cfg.dataset on `device` (val cut from train with a fixed seed)."""
    if cfg.dataset in ("mnist", "fashion-mnist", "cifar10", "imagenet"):
        check_data_dir(cfg.data_dir)
    if cfg.dataset == "imagenet" or (cfg.dataset == "fake" and cfg.model == "resnet50"):
        return load_imagefolder(cfg, device, rank, world)
    train_x, train_y, test_x, test_y, num_classes = _arrays(cfg)
    for y, what in ((train_y, "training"), (test_y, "test")):
        check_labels(y, num_classes, what)
    in_shape = tuple(train_x.shape[1:])
    if min(in_shape) < 1:
        raise UserError(f"the images of {cfg.dataset} have no pixels (shape {in_shape}); check the data files")
    if len(test_y) and tuple(test_x.shape[1:]) != in_shape:
        raise UserError(f"the images of {cfg.dataset} do not fit together: training {in_shape}, test "
                        f"{tuple(test_x.shape[1:])} (channels x height x width); check the data files")
    val_size = validation_size(cfg, len(train_y), len(test_y), cfg.dataset)
    train_idx, val_idx = split(len(train_y), val_size)
    check_batch_size(cfg, len(train_idx), world)

    train_tf, eval_tf, prep = _transforms(cfg, device, train_x, in_shape)
    to_x = lambda a: prep(torch.from_numpy(np.array(a, copy=True)).to(device))  # noqa: E731
    to_y = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64)).to(device)  # noqa: E731
    x_all, y_all = to_x(train_x), to_y(train_y)
    make = lambda x, y, shuffle, tf, bs: TensorBatches(  # noqa: E731
        x, y, bs, shuffle, seed=cfg.seed, transform=tf, rank=rank, world=world)
    train_idx, val_idx = train_idx.to(device), val_idx.to(device)
    train = make(x_all[train_idx], y_all[train_idx], True, train_tf, cfg.batch_size)
    val = make(x_all[val_idx], y_all[val_idx], False, eval_tf, cfg.eval_batch_size)
    test = make(to_x(test_x), to_y(test_y), False, eval_tf, cfg.eval_batch_size)
    return Data(train, val, test, num_classes, in_shape)


def _transforms(cfg, device, train_x: np.ndarray, in_shape):
    """(train transform, eval transform, one-off conversion of the uint8 images)."""
    if is_mlp(cfg.model):
        # MLPs read [0, 1] floats, converted once: a batch is then a plain index slice.
        return None, None, lambda x: x.float().div_(255)
    mean, std = _normalisation(cfg)
    if len(mean) != in_shape[0]:
        mean, std = _channel_stats(train_x)  # e.g. a CNN on 1-channel MNIST: the set's own statistics
    layout = torch.channels_last if channels_last(cfg, device) else torch.contiguous_format
    flip = cfg.augment in ("crop_flip", "crop_flip_cutout")
    cutout = cfg.cutout if cfg.augment == "crop_flip_cutout" else 0
    mean_t, std_t = torch.tensor(mean, device=device), torch.tensor(std, device=device)

    def train_tf(xb, gen):
        return augment.augment_batch(xb, gen, crop_padding=4 if flip else 0, flip=flip, cutout_size=cutout,
                                     mean=mean_t, std=std_t, dtype=torch.float32, memory_format=layout)

    def eval_tf(xb, gen):
        return augment.normalize(xb, mean_t, std_t, dtype=torch.float32, memory_format=layout)

    return train_tf, eval_tf, lambda x: x


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of (up to 10,000 of) uint8 N x C x H x W images."""
    sample = images[:10_000].astype(np.float64) / 255
    mean, std = sample.mean(axis=(0, 2, 3)), sample.std(axis=(0, 2, 3))
    return tuple(float(m) for m in mean), tuple(float(max(s, 1e-3)) for s in std)


def _normalisation(cfg):
    if cfg.dataset == "imagenet" or cfg.model == "resnet50":
        return augment.IMAGENET_MEAN, augment.IMAGENET_STD
    return augment.CIFAR10_MEAN, augment.CIFAR10_STD
