"""The files behind the in-memory data sets: MNIST-format idx files, CIFAR-10 python batches,
scikit-learn's digits, and generated `fake` images. Each reader returns uint8 images N x C x H x W
and integer labels as numpy arrays, or raises a UserError naming the file and the fix; a
download happens only when the data is absent, never over a damaged copy."""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import pickle
import socket
import threading
import zlib

import numpy as np

from .errors import UserError, one_line

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST = ["test_batch"]
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


def check_data_dir(data_dir: str) -> None:
    """A --data-dir that is a file (or lies under one) is named as such, before any search or
    download could report it as missing."""
    path = os.path.abspath(data_dir)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        what = "is a file" if path == os.path.abspath(data_dir) else f"cannot exist: {path} is a file"
        raise UserError(f"--data-dir {data_dir} {what}, not a folder; point --data-dir at the folder "
                        "that holds the data set")


# ---------------------------------------------------------------------------------- idx files

def read_idx(path: str) -> np.ndarray:
    """Read an idx file (raw or .gz) as uint8, checking the magic number and the size."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"cannot read {path}: {one_line(e)}; the file is damaged, download it again") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or one_line(e)}; check the file and its "
                        "permissions") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise UserError(f"{path} is not an idx file of unsigned bytes (bad magic number "
                        f"{data[:4].hex() or 'empty'}); replace it with the original file")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path} is truncated (incomplete header); download it again")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape)
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


def idx_arrays(dataset: str, data_dir: str):
    a = load_idx_folder(dataset, data_dir)
    return a["train_images"][:, None], a["train_labels"], a["test_images"][:, None], a["test_labels"]


# ---------------------------------------------------------------------------------- downloads

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


def _download(dataset: str, data_dir: str, made: str, not_found: str, advice: str) -> None:
    """torchvision's download of `dataset` into data_dir; on failure, the folders it made (`made`
    and its parents, up to what existed) are removed and the message says why."""
    reason = offline_reason(dataset)
    if reason is not None:
        raise UserError(f"{not_found} and it cannot be downloaded: no network ({reason}); {advice}")
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[dataset]
    existed = os.path.isdir(data_dir)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            for train in (True, False):
                cls(data_dir, train=train, download=True)
    except Exception as e:  # noqa: BLE001 - any download failure gets the same advice
        _remove_empty_dirs(made, data_dir if existed else os.path.dirname(os.path.abspath(data_dir)))
        raise UserError(f"{not_found} and the download failed ({type(e).__name__}: {one_line(e)}); "
                        f"{advice}") from None


def _download_torchvision(dataset: str, data_dir: str, searched: list[str]) -> None:
    advice = (f"place the four idx files ({', '.join(IDX_FILES.values())}, raw or .gz) in --data-dir, "
              "or use --dataset digits, which needs no download")
    _download(dataset, data_dir, searched[-1], f"{dataset} not found (searched {', '.join(searched)})",
              advice)


# ---------------------------------------------------------------------------------- CIFAR-10

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays only: a data file cannot run code."""

    _reconstruct = np.ndarray((0,)).__reduce__()[0]
    ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        if (module, name) == ("_codecs", "encode"):
            import codecs
            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: (uint8 images N x 3 x 32 x 32, labels N)."""
    advice = "the folder is damaged: extract cifar-10-python.tar.gz into --data-dir again"
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or one_line(e)}; check the file and its "
                        "permissions") from None
    except Exception as e:  # noqa: BLE001 - whatever garbage makes pickle raise
        raise UserError(f"{path} is not a CIFAR-10 batch ({type(e).__name__}: {one_line(e)}); "
                        f"{advice}") from None
    data = batch.get("data") if isinstance(batch, dict) else None
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32 or not isinstance(labels, list) \
            or len(labels) != len(data) or not all(isinstance(v, int) for v in labels):
        raise UserError(f"{path} is not a CIFAR-10 batch (no uint8 'data' N x 3072 with N integer "
                        f"'labels'); {advice}")
    return data.reshape(-1, 3, 32, 32), np.array(labels, dtype=np.int64)


def cifar10_arrays(data_dir: str):
    """(train_x, train_y, test_x, test_y) from <data_dir>/cifar-10-batches-py, downloaded there
    first only when that folder does not exist."""
    folder = os.path.join(data_dir, CIFAR10_FOLDER)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{folder} is a file, not the folder cifar-10-python.tar.gz extracts to; "
                        "remove it and extract the archive into --data-dir")
    if not os.path.exists(folder):
        _download("cifar10", data_dir, folder, f"cifar10 not found in {folder}",
                  "extract cifar-10-python.tar.gz into --data-dir (it makes cifar-10-batches-py/), "
                  "or use --dataset fake for a smoke test")
    missing = [n for n in CIFAR10_TRAIN + CIFAR10_TEST if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise UserError(f"{folder} holds only part of CIFAR-10: missing {', '.join(missing)}; extract "
                        "cifar-10-python.tar.gz into --data-dir again")
    parts = [[read_cifar_batch(os.path.join(folder, n)) for n in names]
             for names in (CIFAR10_TRAIN, CIFAR10_TEST)]
    (train_x, train_y), (test_x, test_y) = [
        (np.concatenate([x for x, _ in p]), np.concatenate([y for _, y in p])) for p in parts]
    return train_x, train_y, test_x, test_y


# ---------------------------------------------------------------------------------- in code

def digits_arrays():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)[:, None]
    # A fixed test set (not the run's seed): every seed is scored on the same 360 digits.
    order = np.random.default_rng(12345).permutation(len(images))
    test, train = order[:360], order[360:]
    return images[train], d.target[train], images[test], d.target[test]


def fake_arrays(shape: tuple[int, ...], classes: int, n_train: int, seed: int):
    """Uniform random images and labels: n_train for training, a quarter as many for testing."""
    rng = np.random.default_rng(seed + 1)
    n_test = max(n_train // 4, 1)
    images = rng.integers(0, 256, size=(n_train + n_test, *shape), dtype=np.uint8)
    labels = rng.integers(0, classes, size=n_train + n_test)
    return images[:n_train], labels[:n_train], images[n_train:], labels[n_train:]
