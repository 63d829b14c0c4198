"""idx reading, data set discovery, the validation split and batching."""

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from nsr.train.batches import TensorBatches
from nsr.train.config import parse_args
from nsr.train.data import load_data
from nsr.train.datasets import IDX_FILES, load_idx_folder, read_idx
from nsr.train.errors import UserError
from tests.helpers import idx_bytes, write_cifar_like, write_mnist_like


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    arrays = write_mnist_like(tmp_path, gz=gz)
    path = tmp_path / (IDX_FILES["train_images"] + (".gz" if gz else ""))
    got = read_idx(str(path))
    assert got.shape == (60, 28, 28) and np.array_equal(got, arrays["train_images"])
    labels = read_idx(str(tmp_path / (IDX_FILES["train_labels"] + (".gz" if gz else ""))))
    assert labels.tolist() == [i % 10 for i in range(60)]


def test_read_idx_rejects_bad_magic_truncation_and_broken_gzip(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 20)  # type 0x0d = float: not ours
    with pytest.raises(UserError, match="bad magic number 00000d03"):
        read_idx(str(bad))
    cut = tmp_path / "cut"
    cut.write_bytes(idx_bytes(np.zeros((4, 3, 3)))[:-5])
    with pytest.raises(UserError, match=r"truncated or padded: 47 bytes for shape \(4, 3, 3\), expected 52"):
        read_idx(str(cut))
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 3, 3))))[:-12])
    with pytest.raises(UserError, match="cannot read .*broken.gz.*download it again"):
        read_idx(str(broken))


def test_flat_folder_and_torchvision_layout(tmp_path):
    write_mnist_like(tmp_path / "flat")
    assert load_idx_folder("fashion-mnist", str(tmp_path / "flat"))["test_images"].shape == (20, 28, 28)
    write_mnist_like(tmp_path / "tv" / "MNIST" / "raw", gz=False)
    assert load_idx_folder("mnist", str(tmp_path / "tv"))["train_labels"].shape == (60,)


def test_incomplete_folder_names_the_missing_files(tmp_path):
    write_mnist_like(tmp_path)
    os.remove(tmp_path / (IDX_FILES["test_labels"] + ".gz"))
    with pytest.raises(UserError, match="missing t10k-labels-idx1-ubyte"):
        load_idx_folder("mnist", str(tmp_path))


def test_missing_data_without_network_gives_one_message(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tvd.MNIST, "__init__", offline)
    with pytest.raises(UserError) as err:
        load_idx_folder("mnist", str(tmp_path / "empty"))
    message = str(err.value)
    assert "searched" in message and str(tmp_path / "empty") in message
    assert "--dataset digits" in message and "train-images-idx3-ubyte" in message


def test_mnist_split_and_in_memory_batches(tmp_path):
    write_mnist_like(tmp_path, n_train=100, n_test=30)
    cfg = parse_args(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--val-size", "25",
                      "--batch-size", "10"])
    data = load_data(cfg, torch.device("cpu"))
    assert (data.train.num_samples, data.val.num_samples, data.test.num_samples) == (75, 25, 30)
    assert data.in_shape == (1, 28, 28) and data.num_classes == 10
    assert data.train.x.dtype == torch.float32 and 0 <= data.train.x.min() and data.train.x.max() <= 1
    # train and val partition the training set: no image in both
    seen = {tuple(x.flatten().tolist()[:40]) for x in data.train.x}
    assert not any(tuple(x.flatten().tolist()[:40]) in seen for x in data.val.x)
    # the split is fixed: another seed changes the shuffling, not the split
    other = load_data(parse_args(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path),
                                  "--val-size", "25", "--seed", "3", "--batch-size", "10"]),
                      torch.device("cpu"))
    assert torch.equal(other.val.x, data.val.x)


def test_default_validation_sizes(tmp_path):
    digits = load_data(parse_args(["--dataset", "digits"]), torch.device("cpu"))
    assert (digits.train.num_samples + digits.val.num_samples, digits.test.num_samples) == (1437, 360)
    assert digits.val.num_samples == round(0.2 * 1437)
    write_mnist_like(tmp_path, n_train=50_000, n_test=10, size=2)
    big = load_data(parse_args(["--dataset", "mnist", "--data-dir", str(tmp_path)]), torch.device("cpu"))
    assert big.val.num_samples == 10_000


def test_tensor_batches_cover_each_sample_once_per_epoch_and_depend_on_seed_and_epoch():
    x = torch.arange(23).float()[:, None]
    y = torch.arange(23) % 3
    b = TensorBatches(x, y, batch_size=5, shuffle=True, seed=1)
    epoch0 = [xb for xb, _ in b.iterate(0)]
    assert len(b) == 5 and [len(t) for t in epoch0] == [5, 5, 5, 5, 3]
    assert sorted(torch.cat(epoch0).flatten().tolist()) == list(range(23))
    assert not torch.equal(torch.cat(epoch0), torch.cat([xb for xb, _ in b.iterate(1)]))
    again = TensorBatches(x, y, batch_size=5, shuffle=True, seed=1)
    assert all(torch.equal(a, c) for a, (c, _) in zip(epoch0[2:], again.iterate(0, start_step=2)))
    # two ranks split the same permutation with no overlap
    r0 = TensorBatches(x, y, 4, True, seed=1, rank=0, world=2)
    r1 = TensorBatches(x, y, 4, True, seed=1, rank=1, world=2)
    s0 = set(torch.cat([xb for xb, _ in r0.iterate(0)]).flatten().tolist())
    s1 = set(torch.cat([xb for xb, _ in r1.iterate(0)]).flatten().tolist())
    assert len(s0) == len(s1) == 11 and not s0 & s1


def test_single_sample_tail_batch_is_dropped_for_training():
    b = TensorBatches(torch.zeros(21, 1), torch.zeros(21, dtype=torch.long), 5, shuffle=True)
    assert len(b) == 4
    assert len(TensorBatches(torch.zeros(21, 1), torch.zeros(21, dtype=torch.long), 5, shuffle=False)) == 5


def test_labels_outside_the_classes_and_oversized_batches_are_rejected(tmp_path):
    write_mnist_like(tmp_path, n_train=40, n_test=10)
    path = tmp_path / (IDX_FILES["train_labels"] + ".gz")
    with gzip.open(path, "wb") as f:
        f.write(idx_bytes(np.full(40, 12)))
    with pytest.raises(UserError, match=r"training labels lie in \[12, 12\] but the model has 10 classes"):
        load_data(parse_args(["--dataset", "mnist", "--data-dir", str(tmp_path), "--val-size", "5"]),
                  torch.device("cpu"))
    with pytest.raises(UserError, match="batch_size 2000 is larger than the training set"):
        load_data(parse_args(["--dataset", "digits", "--batch-size", "2000"]), torch.device("cpu"))


# ---------------------------------------------------------------------------------- CIFAR-10

def test_cifar10_batches_are_read_pixel_for_pixel(tmp_path):
    folder, batches = write_cifar_like(tmp_path, n=10)
    cfg = parse_args(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--model", "resnet18",
                      "--val-size", "10", "--batch-size", "8", "--augment", "none"])
    data = load_data(cfg, torch.device("cpu"))
    assert data.num_classes == 10 and data.in_shape == (3, 32, 32)
    assert (data.train.num_samples, data.val.num_samples, data.test.num_samples) == (40, 10, 10)
    # test image n, channel c, row h, column w is data[n, 1024 c + 32 h + w] of test_batch
    x, y = data.test.x, data.test.y
    raw = batches["test_batch"]["data"]
    for n, c, h, w in [(0, 0, 0, 0), (3, 2, 5, 31), (9, 1, 31, 7)]:
        assert int(x[n, c, h, w]) == raw[n, 1024 * c + 32 * h + w]
    assert y.tolist() == batches["test_batch"]["labels"]
    labels = sorted(batches[f"data_batch_{i}"]["labels"][k] for i in range(1, 6) for k in range(10))
    assert sorted(torch.cat([data.train.y, data.val.y]).tolist()) == labels


@pytest.mark.parametrize("damage, message", [
    ("truncated", r"data_batch_3 is not a CIFAR-10 batch \(UnpicklingError: pickle data was truncated\)"),
    ("empty", r"data_batch_3 is not a CIFAR-10 batch \(EOFError: Ran out of input\)"),
    ("garbage", r"data_batch_3 is not a CIFAR-10 batch \(UnpicklingError: invalid load key"),
    ("wrong-shape", r"data_batch_3 is not a CIFAR-10 batch \(no uint8 'data' N x 3072 with N integer 'labels'\)"),
    ("code", r"data_batch_3 is not a CIFAR-10 batch \(UnpicklingError: refusing to load posix.system\)"),
    ("missing", r"cifar-10-batches-py holds only part of CIFAR-10: missing data_batch_3;"),
])
def test_damaged_cifar10_folder_names_the_file_and_never_downloads_or_runs_code(tmp_path, damage, message):
    folder, _ = write_cifar_like(tmp_path, n=4)
    path = os.path.join(folder, "data_batch_3")
    raw = open(path, "rb").read()
    marker = tmp_path / "ran"
    replacement = {
        "truncated": raw[:len(raw) // 2], "empty": b"", "garbage": bytes(range(7, 250)),
        "wrong-shape": pickle.dumps({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}),
        "code": pickle.dumps({"data": _RunsCode(str(marker)), "labels": []}, protocol=2),
    }
    if damage == "missing":
        os.remove(path)
    else:
        open(path, "wb").write(replacement[damage])
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UserError, match=message):
        load_data(parse_args(["--dataset", "cifar10", "--data-dir", str(tmp_path)]), torch.device("cpu"))
    assert sorted(os.listdir(tmp_path)) == before and not marker.exists()


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("n_train, n_test, argv, message", [
    (0, 5, [], r"the training set of mnist is empty \(0 samples\); add training data"),
    (50, 0, [], r"the test set of mnist is empty \(0 samples\); add test data"),
    (1, 5, ["--val-size", "1"], r"has 1 sample: too few to hold out a validation set \(at least 2 needed\)"),
    (50, 5, ["--val-size", "50"], r"val_size 50 leaves no training data \(mnist has 50 training samples\); "
                                  r"choose --val-size below 50"),
    (50, 5, ["--batch-size", "41"], r"batch_size 41 is larger than the training set \(40 samples per process\)"),
])
def test_empty_and_too_small_sets_say_which(tmp_path, n_train, n_test, argv, message):
    write_mnist_like(tmp_path, n_train=n_train, n_test=n_test)
    with pytest.raises(UserError, match=message):
        load_data(parse_args(["--dataset", "mnist", "--data-dir", str(tmp_path), *argv]), torch.device("cpu"))


def test_images_of_other_sizes_or_no_pixels_are_refused(tmp_path):
    write_mnist_like(tmp_path / "a", n_train=20, n_test=5)
    with gzip.open(tmp_path / "a" / (IDX_FILES["test_images"] + ".gz"), "wb") as f:
        f.write(idx_bytes(np.zeros((5, 20, 20))))
    with pytest.raises(UserError, match=r"training \(1, 28, 28\), test \(1, 20, 20\)"):
        load_data(parse_args(["--dataset", "mnist", "--data-dir", str(tmp_path / "a"), "--batch-size", "4"]),
                  torch.device("cpu"))
    write_mnist_like(tmp_path / "b", n_train=20, n_test=5, size=0)
    with pytest.raises(UserError, match=r"the images of mnist have no pixels \(shape \(1, 0, 0\)\)"):
        load_data(parse_args(["--dataset", "mnist", "--data-dir", str(tmp_path / "b"), "--batch-size", "4"]),
                  torch.device("cpu"))


def test_a_data_dir_that_is_a_file_is_named_before_any_search_or_download(tmp_path):
    a_file = tmp_path / "data.tar"
    a_file.write_bytes(b"x")
    for dataset in ("mnist", "fashion-mnist", "cifar10", "imagenet"):
        with pytest.raises(UserError, match=rf"--data-dir {a_file} is a file, not a folder"):
            load_data(parse_args(["--dataset", dataset, "--data-dir", str(a_file)]), torch.device("cpu"))
    with pytest.raises(UserError, match=rf"--data-dir {a_file}/sub cannot exist: {a_file} is a file"):
        load_data(parse_args(["--dataset", "mnist", "--data-dir", str(a_file / "sub")]), torch.device("cpu"))
    assert os.listdir(tmp_path) == ["data.tar"]


def test_damaged_gzip_streams_are_named(tmp_path):
    write_mnist_like(tmp_path, n_train=20, n_test=5)
    path = tmp_path / (IDX_FILES["train_images"] + ".gz")
    raw = bytearray(path.read_bytes())
    raw[20:60] = bytes(b ^ 0x5A for b in raw[20:60])  # inside the deflate stream: zlib.error
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"cannot read .*train-images-idx3-ubyte.gz: Error -3 while "
                                        r"decompressing data.*the file is damaged, download it again"):
        read_idx(str(path))
    path.write_bytes(b"plain text")
    with pytest.raises(UserError, match=r"Not a gzipped file .*the file is damaged"):
        read_idx(str(path))
