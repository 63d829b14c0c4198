"""Data sets and batching.

Small image sets (MNIST, Fashion-MNIST, digits, CIFAR-10, fake) live in memory as tensors,
converted once, on the training device; a batch is an index slice, and CIFAR augmentation runs
as batched tensor ops. ImageNet streams through DataLoader workers. Every shuffle and augmentation
draw is a function of (seed, epoch, step), so a run resumed mid-epoch sees the same batches.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import socket
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .errors import UserError

# name -> (input shape, classes); `fake` takes the shape of the model's usual data set.
DATASETS = {
    "mnist": ((1, 28, 28), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "digits": ((1, 8, 8), 10),
    "cifar10": ((3, 32, 32), 10),
    "imagenet": ((3, 224, 224), 1000),
    "fake": None,
}
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
# Where torchvision downloads from (host, port): probed before the download so that an offline
# machine gets its answer in seconds, not after torchvision's import and per-file retries.
_MIRRORS = {
    "mnist": [("ossci-datasets.s3.amazonaws.com", 443), ("yann.lecun.com", 80)],
    "fashion-mnist": [("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80)],
    "cifar10": [("www.cs.toronto.edu", 443)],
}
PROBE_TIMEOUT_S = 8.0      # the longest the reachability probe may take
DOWNLOAD_TIMEOUT_S = 60.0  # a download that stalls this long fails instead of hanging
_PROXY_VARS = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (seed, epoch, step, rank), stable across runs."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


# ---------------------------------------------------------------------------------- idx files

def read_idx(path: str) -> np.ndarray:
    """Read an idx file (raw or .gz) as uint8, checking the magic number and the size."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}; the file is damaged, download it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise UserError(f"{path} is not an idx file of unsigned bytes (bad magic number "
                        f"{data[:4].hex() or 'empty'}); replace it with the original file")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path} is truncated (incomplete header); download it again")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise UserError(f"{path} is truncated or padded: {len(data)} bytes for shape {shape}, "
                        f"expected {expected}; download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(folder: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def load_idx_folder(dataset: str, data_dir: str) -> dict[str, np.ndarray]:
    """The four MNIST-format idx files from a flat folder or torchvision's layout, or a download."""
    folders = [data_dir, os.path.join(data_dir, _TORCHVISION_FOLDER[dataset], "raw")]
    for folder in folders:
        paths = {key: _find_idx(folder, stem) for key, stem in IDX_FILES.items()}
        if all(paths.values()):
            arrays = {key: read_idx(path) for key, path in paths.items()}
            _check_idx_shapes(arrays, folder)
            return arrays
        if any(paths.values()):
            missing = [IDX_FILES[k] for k, p in paths.items() if p is None]
            raise UserError(f"{folder} holds only part of {dataset}: missing {', '.join(missing)} "
                            "(raw or .gz); add them or point --data-dir elsewhere")
    _download_torchvision(dataset, data_dir, folders)
    return load_idx_folder(dataset, data_dir)


def _check_idx_shapes(arrays: dict[str, np.ndarray], folder: str) -> None:
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise UserError(f"idx files in {folder} do not fit together: {split} images "
                            f"{images.shape}, labels {labels.shape}; expected N x H x W and N")


def offline_reason(dataset: str) -> str | None:
    """None when a download server of `dataset` accepts a connection, else why not, within
    PROBE_TIMEOUT_S (name resolution has no timeout of its own, hence the threads). With a proxy
    configured the download itself decides."""
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    errors: list[str] = []
    reached = threading.Event()

    def probe(host: str, port: int) -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S / 2).close()
            reached.set()
        except OSError as e:
            errors.append(f"{host}: {e.strerror or e}")

    threads = [threading.Thread(target=probe, args=hp, daemon=True) for hp in _MIRRORS[dataset]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PROBE_TIMEOUT_S / len(threads))
    if reached.is_set():
        return None
    return errors[0] if errors else f"no answer within {PROBE_TIMEOUT_S:.0f} s"


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """torchvision opens URLs without a timeout: bound every socket operation while it downloads."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _remove_empty_dirs(path: str, stop: str) -> None:
    """rmdir `path` and its parents up to (not including) `stop` while they are empty."""
    stop = os.path.abspath(stop)
    path = os.path.abspath(path)
    while path.startswith(stop + os.sep):
        try:
            os.rmdir(path)
        except OSError:
            return
        path = os.path.dirname(path)


def _download_torchvision(dataset: str, data_dir: str, searched: list[str]) -> None:
    advice = (f"place the four idx files ({', '.join(IDX_FILES.values())}, raw or .gz) in --data-dir, "
              "or use --dataset digits, which needs no download")
    reason = offline_reason(dataset)
    if reason is not None:
        raise UserError(f"{dataset} not found (searched {', '.join(searched)}) and it cannot be "
                        f"downloaded: no network ({reason}); {advice}")
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[dataset]
    existed = os.path.isdir(data_dir)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            for train in (True, False):
                cls(data_dir, train=train, download=True)
    except Exception as e:  # noqa: BLE001 - any download failure gets the same advice
        # leave no empty folders behind (torchvision makes <data-dir>/<Name>/raw first)
        _remove_empty_dirs(searched[-1], data_dir if existed else os.path.dirname(os.path.abspath(data_dir)))
        raise UserError(
            f"{dataset} not found (searched {', '.join(searched)}) and the download failed "
            f"({type(e).__name__}); {advice}") from None


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
        n = len(self.y)
        if not self.shuffle:
            return torch.arange(self.rank, n, self.world, device=self.y.device)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(self.seed, epoch)))
        return order[self.rank: self.per_rank * self.world: self.world].to(self.y.device)

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


class _EpochSampler(torch.utils.data.Sampler):
    def __init__(self, n: int, batches: "LoaderBatches"):
        self.n, self.owner = n, batches

    def __iter__(self):
        o = self.owner
        if o.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(_mix(o.seed, o._epoch)))
            order = order[o.rank: (self.n // o.world) * o.world: o.world]
        else:
            order = torch.arange(o.rank, self.n, o.world)
        return iter(order[o._start * o.batch_size:].tolist())

    def __len__(self):
        o = self.owner
        return max(o.per_rank - o._start * o.batch_size, 0)


class LoaderBatches:
    """DataLoader batches (ImageNet): worker processes, pinned memory, per-rank shards."""

    def __init__(self, dataset, batch_size: int, shuffle: bool, seed: int, workers: int,
                 device: torch.device, rank: int = 0, world: int = 1):
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.rank, self.world, self._epoch, self._start = rank, world, 0, 0
        n = len(dataset)
        self.per_rank = n // world if shuffle else len(range(rank, n, world))
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=_EpochSampler(n, self), num_workers=workers,
            pin_memory=device.type == "cuda", drop_last=shuffle, persistent_workers=False)
        self.device = device

    def __len__(self) -> int:
        return self.per_rank // self.batch_size if self.shuffle else -(-self.per_rank // self.batch_size)

    @property
    def num_samples(self) -> int:
        return self.per_rank

    def iterate(self, epoch: int = 0, start_step: int = 0):
        self._epoch, self._start = epoch, start_step
        for xb, yb in self.loader:
            yield (xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True))

    def __iter__(self):
        return self.iterate(0)


@dataclass
class Data:
    train: TensorBatches | LoaderBatches
    val: TensorBatches | LoaderBatches
    test: TensorBatches | LoaderBatches
    num_classes: int
    in_shape: tuple[int, ...]


# ---------------------------------------------------------------------------------- data sets

def _split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, val) index split of range(n)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, 7919)))
    return order[val_size:], order[:val_size]


def _default_val_size(n_train: int, dataset: str) -> int:
    # The paper holds out 10,000 of MNIST's 60,000; smaller sets keep a proportional 20 %.
    return 10_000 if n_train >= 50_000 else max(1, round(0.2 * n_train))


def _raw_arrays(cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y) as uint8 images N x C x H x W and int labels."""
    if cfg.dataset in ("mnist", "fashion-mnist"):
        a = load_idx_folder(cfg.dataset, cfg.data_dir)
        return (a["train_images"][:, None], a["train_labels"], a["test_images"][:, None],
                a["test_labels"])
    if cfg.dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = np.round(d.images * (255 / 16)).astype(np.uint8)[:, None]
        # A fixed test set (not the run's seed): every seed is scored on the same 360 digits.
        order = np.random.default_rng(12345).permutation(len(images))
        test, train = order[:360], order[360:]
        return images[train], d.target[train], images[test], d.target[test]
    if cfg.dataset == "cifar10":
        return _cifar10_arrays(cfg.data_dir)
    raise AssertionError(cfg.dataset)


def _cifar10_arrays(data_dir: str):
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    download = not os.path.isdir(folder)
    reason = offline_reason("cifar10") if download else None
    if reason is not None:
        raise UserError(f"cifar10 not found in {folder} and it cannot be downloaded: no network ({reason}); "
                        "extract cifar-10-python.tar.gz into --data-dir (it makes cifar-10-batches-py/), "
                        "or use --dataset fake for a smoke test")
    import torchvision.datasets as tvd

    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            train = tvd.CIFAR10(data_dir, train=True, download=download)
        test = tvd.CIFAR10(data_dir, train=False, download=False)
    except Exception as e:  # noqa: BLE001
        raise UserError(
            f"cifar10 not found in {folder} and the download failed ({type(e).__name__}: "
            f"{(str(e).strip().splitlines() or [''])[0][:200]}); "
            "extract cifar-10-python.tar.gz into --data-dir (it makes cifar-10-batches-py/), "
            "or use --dataset fake for a smoke test") from None
    to_nchw = lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2))  # noqa: E731
    return to_nchw(train.data), np.array(train.targets), to_nchw(test.data), np.array(test.targets)


def fake_shape(model: str) -> tuple[tuple[int, ...], int]:
    from models import is_mlp

    if is_mlp(model):
        return DATASETS["mnist"]
    return DATASETS["imagenet"] if model == "resnet50" else DATASETS["cifar10"]


def _fake_arrays(cfg):
    shape, classes = fake_shape(cfg.model)
    rng = np.random.default_rng(cfg.seed + 1)
    n_train, n_test = cfg.fake_size, max(cfg.fake_size // 4, 1)
    images = rng.integers(0, 256, size=(n_train + n_test, *shape), dtype=np.uint8)
    labels = rng.integers(0, classes, size=n_train + n_test)
    return images[:n_train], labels[:n_train], images[n_train:], labels[n_train:], classes


def channels_last(cfg, device: torch.device) -> bool:
    """CNN batches and weights in NHWC: faster convolutions on CUDA (cfg.channels_last=auto)."""
    from models import is_mlp

    return (not is_mlp(cfg.model)) and (
        cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda"))


def check_labels(y: np.ndarray | torch.Tensor, num_classes: int, what: str) -> None:
    y = np.asarray(y)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"{what} labels lie in [{y.min()}, {y.max()}] but the model has {num_classes} "
                        f"classes (valid labels 0..{num_classes - 1}); check the data set")


def load_data(cfg, device: torch.device, rank: int = 0, world: int = 1) -> Data:
    """Train/val/test batches for cfg.dataset on `device` (val cut from train with a fixed seed)."""
    if cfg.dataset == "imagenet" or (cfg.dataset == "fake" and cfg.model == "resnet50"):
        return _load_imagefolder(cfg, device, rank, world)
    if cfg.dataset == "fake":
        train_x, train_y, test_x, test_y, num_classes = _fake_arrays(cfg)
    else:
        train_x, train_y, test_x, test_y = _raw_arrays(cfg)
        num_classes = DATASETS[cfg.dataset][1]
    for y, what in ((train_y, "training"), (test_y, "test")):
        check_labels(y, num_classes, what)
    in_shape = tuple(train_x.shape[1:])

    val_size = cfg.val_size or _default_val_size(len(train_y), cfg.dataset)
    if val_size >= len(train_y):
        raise UserError(f"val_size {val_size} leaves no training data ({len(train_y)} samples); "
                        "choose a smaller --val-size")
    train_idx, val_idx = _split(len(train_y), val_size, seed=0)
    if cfg.batch_size > len(train_idx) // world:
        raise UserError(f"batch_size {cfg.batch_size} is larger than the training set "
                        f"({len(train_idx) // world} samples per process); lower --batch-size")

    from models import is_mlp

    mean, std = _normalisation(cfg)
    if not is_mlp(cfg.model) and len(mean) != in_shape[0]:
        mean, std = _channel_stats(train_x)  # e.g. a CNN on 1-channel MNIST: the set's own statistics
    to_x = lambda a: torch.from_numpy(np.array(a, copy=True)).to(device)  # noqa: E731
    to_y = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64)).to(device)  # noqa: E731
    x_all, y_all = to_x(train_x), to_y(train_y)
    x_test, y_test = to_x(test_x), to_y(test_y)

    if is_mlp(cfg.model):
        # MLPs read [0, 1] floats, converted once: a batch is then a plain index slice.
        prep = lambda x: x.float().div_(255)  # noqa: E731
        x_all, x_test = prep(x_all), prep(x_test)
        train_tf = eval_tf = None
    else:
        from . import augment

        dtype = torch.float32
        layout = torch.channels_last if channels_last(cfg, device) else torch.contiguous_format
        flip = cfg.augment in ("crop_flip", "crop_flip_cutout")
        cutout = cfg.cutout if cfg.augment == "crop_flip_cutout" else 0
        crop = 4 if flip else 0

        mean_t = torch.tensor(mean, device=device)
        std_t = torch.tensor(std, device=device)

        def train_tf(xb, gen):
            return augment.augment_batch(xb, gen, crop_padding=crop, flip=flip, cutout_size=cutout,
                                         mean=mean_t, std=std_t, dtype=dtype, memory_format=layout)

        def eval_tf(xb, gen):
            return augment.normalize(xb, mean_t, std_t, dtype=dtype, memory_format=layout)

    make = lambda x, y, shuffle, tf, bs: TensorBatches(  # noqa: E731
        x, y, bs, shuffle, seed=cfg.seed, transform=tf, rank=rank, world=world)
    train_idx, val_idx = train_idx.to(device), val_idx.to(device)
    train = make(x_all[train_idx], y_all[train_idx], True, train_tf, cfg.batch_size)
    val = make(x_all[val_idx], y_all[val_idx], False, eval_tf, cfg.eval_batch_size)
    test = make(x_test, y_test, False, eval_tf, cfg.eval_batch_size)
    return Data(train, val, test, num_classes, in_shape)


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of (up to 10,000 of) uint8 N x C x H x W images."""
    sample = images[:10_000].astype(np.float64) / 255
    mean, std = sample.mean(axis=(0, 2, 3)), sample.std(axis=(0, 2, 3))
    return tuple(float(m) for m in mean), tuple(float(max(s, 1e-3)) for s in std)


def _normalisation(cfg):
    if cfg.dataset == "imagenet" or cfg.model == "resnet50":
        return IMAGENET_MEAN, IMAGENET_STD
    return CIFAR10_MEAN, CIFAR10_STD


def _load_imagefolder(cfg, device, rank, world) -> Data:
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
    if cfg.dataset == "fake":
        n = cfg.fake_size
        make = lambda size, tf, off: tvd.FakeData(size, (3, 256, 256), 1000, tf,  # noqa: E731
                                                  random_offset=cfg.seed + off)
        train_all, val_all, test = make(n, train_tf, 0), make(n, eval_tf, 0), make(max(n // 4, 1), eval_tf, n)
    else:
        train_dir, val_dir = os.path.join(cfg.data_dir, "train"), os.path.join(cfg.data_dir, "val")
        if not (os.path.isdir(train_dir) and os.path.isdir(val_dir)):
            raise UserError(f"imagenet needs an ImageFolder layout: {train_dir}/<class>/*.JPEG and "
                            f"{val_dir}/<class>/*.JPEG; neither download nor other layouts are "
                            "supported")
        train_all, val_all = tvd.ImageFolder(train_dir, train_tf), tvd.ImageFolder(train_dir, eval_tf)
        test = tvd.ImageFolder(val_dir, eval_tf)
    n = len(train_all)
    val_size = cfg.val_size or min(10_000, max(1, n // 10))
    if val_size >= n:
        raise UserError(f"val_size {val_size} leaves no training data ({n} samples); choose a smaller "
                        "--val-size")
    train_idx, val_idx = _split(n, val_size, seed=0)
    sub = torch.utils.data.Subset
    mk = lambda ds, shuffle, bs: LoaderBatches(ds, bs, shuffle, cfg.seed, cfg.workers, device,  # noqa: E731
                                               rank, world)
    train = mk(sub(train_all, train_idx.tolist()), True, cfg.batch_size)
    if len(train) == 0:
        raise UserError(f"batch_size {cfg.batch_size} is larger than the training set "
                        f"({train.num_samples} samples per process); lower --batch-size")
    val = mk(sub(val_all, val_idx.tolist()), False, cfg.eval_batch_size)
    return Data(train, val, mk(test, False, cfg.eval_batch_size), 1000, (3, 224, 224))
