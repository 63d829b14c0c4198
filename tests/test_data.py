"""idx reading, data set discovery, the validation split and batching."""

import gzip
import os

import numpy as np
import pytest
import torch

from nsr.config import parse_args
from nsr.data import IDX_FILES, TensorBatches, load_data, load_idx_folder, read_idx
from nsr.errors import UserError


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx format written by hand: 0, 0, type 0x08 (ubyte), ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist_like(folder, n_train=60, n_test=20, gz=True, size=28):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, size, size)),
        "train_labels": np.arange(n_train) % 10,
        "test_images": rng.integers(0, 256, (n_test, size, size)),
        "test_labels": np.arange(n_test) % 10,
    }
    os.makedirs(folder, exist_ok=True)
    for key, array in arrays.items():
        data = idx_bytes(array)
        path = os.path.join(folder, IDX_FILES[key] + (".gz" if gz else ""))
        with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
            f.write(data)
    return arrays


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
