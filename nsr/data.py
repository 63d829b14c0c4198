"""Data sets and batching.

Small image sets (MNIST, Fashion-MNIST, digits, CIFAR-10, fake) live in memory as tensors,
converted once, on the training device; a batch is an index slice, and CIFAR augmentation runs
as batched tensor ops. ImageNet streams through DataLoader workers (nsr/imagefolder.py). Every
shuffle and augmentation draw is a function of (seed, epoch, step) in memory and of (seed, epoch,
sample) in workers, so a run resumed mid-epoch sees the same batches. The files themselves are
read by nsr/datasets.py.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .augment import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from .datasets import (IDX_FILES, check_data_dir, cifar10_arrays, digits_arrays, fake_arrays,  # noqa: F401
                       idx_arrays, load_idx_folder, offline_reason, read_idx)
from .errors import UserError

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
__all__ = ["DATASETS", "CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD", "Data",
           "TensorBatches", "LoaderBatches", "load_data", "channels_last", "check_labels"]


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (seed, epoch, step, rank), stable across runs."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's sample indices for one epoch: its share of a seeded permutation (every rank
    gets n // world), or of range(n) in order when not shuffling."""
    if not shuffle:
        return torch.arange(rank, n, world)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch)))
    return order[rank: (n // world) * world: world]


# ---------------------------------------------------------------------------------- batching

class TensorBatches:
    """Batches of in-memory tensors: a seeded permutation per epoch, sliced per rank.

    `transform(x_batch, generator)` runs on each training batch (e.g. CIFAR crop/flip/cutout).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool,
                 seed: int = 0, transform: Callable | None = None, rank: int = 0, world: int = 1):
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.transform, self.rank, self.world = transform, rank, world
        self.per_rank = len(y) // world if shuffle else len(range(rank, len(y), world))
        self.generator = (torch.Generator(device=x.device) if transform is not None else None)

    def __len__(self) -> int:
        n, b = self.per_rank, self.batch_size
        steps = -(-n // b)
        if self.shuffle and steps > 1 and n % b == 1:
            steps -= 1  # a trailing batch of one sample cannot train BatchNorm
        return steps

    @property
    def num_samples(self) -> int:
        return self.per_rank

    def indices(self, epoch: int) -> torch.Tensor:
        return epoch_order(len(self.y), self.shuffle, self.seed, epoch, self.rank, self.world).to(self.y.device)

    def iterate(self, epoch: int = 0, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices(epoch)
        for step in range(start_step, len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            xb, yb = self.x[idx], self.y[idx]
            if self.transform is not None:
                self.generator.manual_seed(_mix(self.seed, epoch, step, self.rank, 1))
                xb = self.transform(xb, self.generator)
            yield xb, yb

    def __iter__(self):
        return self.iterate(0)


@contextlib.contextmanager
def _global_rngs_seeded(seed: int):
    """torch's (CPU), numpy's and Python's global generators seeded for the body: what a transform
    draws (torchvision draws from torch's) depends on `seed` alone. In the main process (workers=0)
    the run's own states are put back afterwards; a worker's are nobody else's, and saving numpy's
    would cost ~70 us a sample."""
    in_worker = torch.utils.data.get_worker_info() is not None
    saved = None if in_worker else (torch.get_rng_state(), np.random.get_state(), random.getstate())
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it would reseed CUDA too
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


class _SeededSamples(torch.utils.data.Dataset):
    """dataset[i] read under generators seeded from (seed, epoch, i).

    Seeds per sample, not per worker: a worker's stream would depend on which batches it was
    dealt, and that changes with the step an epoch resumes from and with the worker count."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with _global_rngs_seeded(_mix(self.seed, epoch, index, 2)):
            return self.dataset[index]


class _EpochKeys(torch.utils.data.Sampler):
    """(epoch, index) keys for _SeededSamples, in the epoch's order."""

    def __init__(self, epoch: int, order: torch.Tensor):
        self.epoch, self.order = epoch, order

    def __iter__(self):
        return ((self.epoch, i) for i in self.order.tolist())

    def __len__(self) -> int:
        return len(self.order)


def _worker_message(error: UserError) -> str:
    """A UserError raised in a DataLoader worker arrives wrapped in the worker's traceback: its
    own message is the last line, after 'UserError: '."""
    last = (str(error).strip().splitlines() or [""])[-1]
    return last.split("UserError: ", 1)[-1]


class LoaderBatches:
    """DataLoader batches (ImageNet): worker processes, pinned memory, per-rank shards."""

    def __init__(self, dataset, batch_size: int, shuffle: bool, seed: int, workers: int,
                 device: torch.device, rank: int = 0, world: int = 1):
        self.samples = _SeededSamples(dataset, seed)
        self.batch_size, self.shuffle, self.seed, self.workers = batch_size, shuffle, seed, workers
        self.rank, self.world, self.device = rank, world, device
        n = len(dataset)
        self.per_rank = n // world if shuffle else len(range(rank, n, world))

    def __len__(self) -> int:
        return self.per_rank // self.batch_size if self.shuffle else -(-self.per_rank // self.batch_size)

    @property
    def num_samples(self) -> int:
        return self.per_rank

    def iterate(self, epoch: int = 0, start_step: int = 0):
        order = epoch_order(len(self.samples), self.shuffle, self.seed, epoch, self.rank, self.world)
        # generator: the loader's base seed comes from it, not from the global generator, whose
        # state would then depend on how many loaders a run (or a resumed run) has started.
        loader = torch.utils.data.DataLoader(
            self.samples, self.batch_size, sampler=_EpochKeys(epoch, order[start_step * self.batch_size:]),
            num_workers=self.workers, pin_memory=self.device.type == "cuda", drop_last=self.shuffle,
            generator=torch.Generator().manual_seed(_mix(self.seed, epoch, 3)))
        batches, message = iter(loader), None
        try:
            for xb, yb in batches:
                yield xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
        except UserError as e:
            message = _worker_message(e)
            e.__traceback__ = None  # its frames hold the loader's iterator in a reference cycle
        finally:
            del batches  # the workers stop here and now, not in a later fork or at exit
        if message is not None:
            raise UserError(message)

    def __iter__(self):
        return self.iterate(0)


@dataclass
class Data:
    train: TensorBatches | LoaderBatches
    val: TensorBatches | LoaderBatches
    test: TensorBatches | LoaderBatches
    num_classes: int
    in_shape: tuple[int, ...]


# ---------------------------------------------------------------------------------- sizes

def split(n: int, val_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (train, val) index split of range(n), the same for every run seed."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(0, 7919)))
    return order[val_size:], order[:val_size]


def validation_size(cfg, n_train: int, n_test: int, source: str) -> int:
    """cfg.val_size, or the default: the paper holds out 10,000 of MNIST's 60,000; smaller sets
    keep a proportional 20 %. Every size problem gets a message that says which it is."""
    if n_train == 0:
        raise UserError(f"the training set of {source} is empty (0 samples); add training data")
    if n_test == 0:
        raise UserError(f"the test set of {source} is empty (0 samples); add test data")
    if n_train < 2:
        raise UserError(f"the training set of {source} has 1 sample: too few to hold out a "
                        "validation set (at least 2 needed); add training data")
    val_size = cfg.val_size or (10_000 if n_train >= 50_000 else max(1, round(0.2 * n_train)))
    if val_size >= n_train:
        raise UserError(f"val_size {val_size} leaves no training data ({source} has {n_train} training "
                        f"samples); choose --val-size below {n_train}")
    return val_size


def check_batch_size(cfg, n_train: int, world: int) -> None:
    if cfg.batch_size > n_train // world:
        raise UserError(f"batch_size {cfg.batch_size} is larger than the training set "
                        f"({n_train // world} samples per process); lower --batch-size")


def check_labels(y: np.ndarray | torch.Tensor, num_classes: int, what: str) -> None:
    y = np.asarray(y)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"{what} labels lie in [{y.min()}, {y.max()}] but the model has {num_classes} "
                        f"classes (valid labels 0..{num_classes - 1}); check the data set")


# ---------------------------------------------------------------------------------- data sets

def fake_shape(model: str) -> tuple[tuple[int, ...], int]:
    from models import is_mlp

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
    from models import is_mlp

    return (not is_mlp(cfg.model)) and (
        cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda"))


def load_data(cfg, device: torch.device, rank: int = 0, world: int = 1) -> Data:
    """Train/val/test batches for cfg.dataset on `device` (val cut from train with a fixed seed)."""
    if cfg.dataset in ("mnist", "fashion-mnist", "cifar10", "imagenet"):
        check_data_dir(cfg.data_dir)
    if cfg.dataset == "imagenet" or (cfg.dataset == "fake" and cfg.model == "resnet50"):
        from .imagefolder import load_imagefolder

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
    from models import is_mlp

    if is_mlp(cfg.model):
        # MLPs read [0, 1] floats, converted once: a batch is then a plain index slice.
        return None, None, lambda x: x.float().div_(255)
    from . import augment

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
        return IMAGENET_MEAN, IMAGENET_STD
    return CIFAR10_MEAN, CIFAR10_STD
