"""Bad data through the real script (in-process, tests/helpers.run_in_process): one `error:` line on
stderr that says what is true, exit code 2, no output folder, the data folder as it was (no
download over a damaged copy). A real process's exit code: test_entry_points.py."""

import gzip
import os
import pickle

import numpy as np
import pytest

from nsr.train.datasets import IDX_FILES
from tests.helpers import assert_error, idx_bytes, run_in_process, write_cifar_like, write_folder, write_mnist_like


def _mnist(root, n_train=50, n_test=10):
    write_mnist_like(root, n_train=n_train, n_test=n_test)
    return root


def _damaged_gzip(root):
    write_mnist_like(root, n_train=20, n_test=5)
    path = os.path.join(root, IDX_FILES["test_labels"] + ".gz")
    with gzip.open(path, "wb") as f:
        f.write(idx_bytes(np.arange(5)))
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:len(raw) - 12])  # the stream ends early
    return root


def _cifar(root, damage):
    folder, _ = write_cifar_like(root, n=4)
    path = os.path.join(folder, "data_batch_2")
    if damage == "truncated":
        raw = open(path, "rb").read()
        open(path, "wb").write(raw[:300])
    else:  # a pickle that would run code when loaded
        open(path, "wb").write(pickle.dumps({"data": _Touch(os.path.join(root, "ran")), "labels": []}, 2))
    return root


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def _imagefolder(root, layout):
    if layout == "empty-train":
        os.makedirs(os.path.join(root, "train"))
        os.makedirs(os.path.join(root, "val", "cat"))
    elif layout == "no-images":
        for name in ("cat", "dog"):
            os.makedirs(os.path.join(root, "train", name))
        os.makedirs(os.path.join(root, "val", "cat"))
    elif layout == "foreign":  # val/ has a class train/ lacks
        write_folder(root, {"a": 2, "b": 2, "c": 2}, {"b": 1, "c": 1, "zebra": 1})
    else:
        write_folder(root, {"a": 3, "b": 3}, {"a": 1})  # 6 images, 1 held out for validation
    return root


def _a_file(root):
    os.makedirs(root)
    path = os.path.join(root, "mnist.tar.gz")
    open(path, "wb").write(b"\x1f\x8b not really")
    return path


CASES = {
    # id: (dataset, make data dir, extra flags, what the line says)
    "imagenet-empty-train": ("imagenet", lambda r: _imagefolder(r, "empty-train"), [],
                             "/train holds no class folders; imagenet needs <data-dir>/train/<class>/<image>"),
    "imagenet-no-images": ("imagenet", lambda r: _imagefolder(r, "no-images"), [],
                           "/train has 2 class folders but no images (.jpg, .jpeg, .png"),
    "imagenet-val-class": ("imagenet", lambda r: _imagefolder(r, "foreign"), [],
                           "/val has 1 classes that ", "/train lacks (zebra)"),
    "imagenet-batch": ("imagenet", lambda r: _imagefolder(r, "ok"), ["--batch-size", "6"],
                       "batch_size 6 is larger than the training set (5 samples per process)"),
    "data-dir-is-a-file": ("mnist", _a_file, [], "mnist.tar.gz is a file, not a folder; point --data-dir"),
    "cifar-truncated": ("cifar10", lambda r: _cifar(r, "truncated"), [],
                        "data_batch_2 is not a CIFAR-10 batch (UnpicklingError: pickle data was truncated); "
                        "the folder is damaged: extract cifar-10-python.tar.gz into --data-dir again"),
    "cifar-code": ("cifar10", lambda r: _cifar(r, "code"), [],
                   "data_batch_2 is not a CIFAR-10 batch (UnpicklingError: refusing to load posix.system)"),
    "empty-training-set": ("mnist", lambda r: _mnist(r, n_train=0), [],
                           "the training set of mnist is empty (0 samples); add training data"),
    "val-size": ("mnist", _mnist, ["--val-size", "50"],
                 "val_size 50 leaves no training data (mnist has 50 training samples); "
                 "choose --val-size below 50"),
    "damaged-gzip": ("fashion-mnist", _damaged_gzip, [],
                     "t10k-labels-idx1-ubyte.gz: Compressed file ended before the end-of-stream marker "
                     "was reached; the file is damaged, download it again"),
}


def listing(root):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_through_the_real_script(tmp_path, case):
    dataset, make, extra, *fragments = CASES[case]
    data_dir = make(str(tmp_path / "data"))
    before = listing(tmp_path / "data")
    out = tmp_path / "out"
    assert_error(run_in_process("fdnn_nsr.py", "--dataset", dataset, "--data-dir", data_dir, "--out", str(out),
                                "--epochs", "1", "--quiet", *extra), *fragments)
    assert not out.exists(), "a run that cannot start leaves no output folder"
    assert listing(tmp_path / "data") == before, "the data folder was changed"


def test_a_damaged_image_met_in_training_is_one_line_naming_it(tmp_path):
    """Images are decoded when first read (in a worker), not checked up front: the run stops with
    one line that names the file."""
    write_folder(tmp_path / "data", {"a": 2, "b": 2}, {"a": 1})
    bad = tmp_path / "data" / "train" / "b" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    result = run_in_process("cnn_nsr.py", "--dataset", "imagenet", "--data-dir", str(tmp_path / "data"),
                            "--model", "resnet18", "--device", "cpu", "--batch-size", "3", "--val-size", "1",
                            "--workers", "2", "--out", str(tmp_path / "out"), "--epochs", "1", "--quiet")
    assert_error(result, f"cannot read image {bad} (", "replace or remove the file")
