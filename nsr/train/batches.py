"""Batching: the seeded order of every epoch, in-memory batches (TensorBatches), DataLoader
batches (LoaderBatches), and the sizes of the train/validation split.

Every shuffle and augmentation draw is a function of (seed, epoch, step) in memory and of (seed,
epoch, sample) in workers, so a run resumed mid-epoch sees the same batches.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .errors import UserError

__all__ = ["epoch_order", "TensorBatches", "LoaderBatches", "Data", "split", "validation_size", "check_batch_size"]

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
