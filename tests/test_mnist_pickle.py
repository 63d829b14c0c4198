"""scripts/mnist_from_pickle.py: the classic mnist.pkl.gz (pixels k/256) to MNIST's idx files.

The real pickle is 17 MB and MNIST's figures (class counts, pixel mean and std) cannot be faked
small, so the full conversion was run by hand (RESULTS.md says how); these tests check each piece
against an independent reference: the project's idx reader, hand-made pixels, MNIST's counts."""

import gzip
import importlib.util
import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from nsr.train.datasets import read_idx
from nsr.train.errors import UserError
from tests.helpers import ROOT, assert_one_error_line

_spec = importlib.util.spec_from_file_location("mnist_from_pickle",
                                               os.path.join(ROOT, "scripts", "mnist_from_pickle.py"))
mnist_from_pickle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mnist_from_pickle)


def test_pixels_k_over_256_become_the_bytes_k():
    k = np.array([[0, 1, 127, 128, 255] + [0] * 779], dtype=np.int64)
    images = (k / 256.0).astype(np.float32)  # how the pickle stores them
    out = mnist_from_pickle.to_bytes(images, "test")
    assert out.dtype == np.uint8 and out.shape == (1, 28, 28)
    assert out.reshape(-1)[:5].tolist() == [0, 1, 127, 128, 255]


@pytest.mark.parametrize("pixel", [1 / 255, 1.0, -1 / 256])  # k/255 scale, k = 256, a negative pixel
def test_pixels_that_are_not_k_over_256_are_refused(pixel):
    images = np.zeros((1, 784), dtype=np.float32)
    images[0, 3] = pixel
    with pytest.raises(UserError, match="not pixels k/256"):
        mnist_from_pickle.to_bytes(images, "training")


def test_the_idx_files_read_back_with_the_readers_of_the_training_scripts(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 256
    labels = np.array([3, 9])
    for name, array in (("images", images), ("labels", labels)):
        path = tmp_path / name
        path.write_bytes(mnist_from_pickle.idx_bytes(array.astype(np.uint8)))
        assert np.array_equal(read_idx(str(path)), array)
    # the header by hand: magic 0x00000803, then 2, 28, 28 as big-endian 32-bit numbers
    assert (tmp_path / "images").read_bytes()[:16] == bytes.fromhex("00000803" "00000002" "0000001c" "0000001c")


def test_other_class_counts_are_refused():
    counts = mnist_from_pickle.TRAIN_CLASS_COUNTS
    labels = np.repeat(np.arange(10), counts)
    labels[0] = 1  # one 0 becomes a 1
    images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
    test_labels = np.repeat(np.arange(10), mnist_from_pickle.TEST_CLASS_COUNTS)
    test_images = np.zeros((len(test_labels), 28, 28), dtype=np.uint8)
    with pytest.raises(UserError, match=r"training labels per class are \[5922, 6743,"):
        mnist_from_pickle.check_mnist(images, labels, test_images, test_labels)
    labels[0] = 0  # right counts, but blank images: the pixel statistics are MNIST's no more
    with pytest.raises(UserError, match="mean 0.0000 and std 0.0000; MNIST's are 0.1307 and 0.3081"):
        mnist_from_pickle.check_mnist(images, labels, test_images, test_labels)


def _tiny_pickle():
    part = (np.zeros((2, 784), dtype=np.float32), np.array([0, 1]))
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as f:
        pickle.dump((part, part, part), f, protocol=2)
    return buffer.getvalue()


@pytest.mark.parametrize("source", ["not-a-pickle", "wheel-without-pickle", "too-small"])
def test_a_wrong_source_is_one_error_line_and_writes_nothing(tmp_path, capsys, source):
    path = tmp_path / "source"
    if source == "not-a-pickle":
        path.write_bytes(b"hello")
    elif source == "wheel-without-pickle":
        with zipfile.ZipFile(path, "w") as wheel:
            wheel.writestr("mnist/__init__.py", "")
    else:
        path.write_bytes(_tiny_pickle())
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        mnist_from_pickle.main([str(path), str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert_one_error_line(err, {"not-a-pickle": "cannot read", "wheel-without-pickle": "holds no mnist/data/mnist.pkl.gz",
                       "too-small": "training part has images (4, 28, 28)"}[source])
    assert not out.exists()
