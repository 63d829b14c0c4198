"""ImageNet-style folders: labels from train/'s class map, classes from the data, workers seeded
per sample so a mid-epoch resume reads exactly the batches of a straight run."""

import os
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import nsr.train.batches
from nsr.train.augment import IMAGENET_MEAN, IMAGENET_STD
from nsr.train.config import parse_args
from nsr.train.data import load_data
from nsr.train.errors import UserError
from tests.helpers import save_image, write_folder

CPU = torch.device("cpu")


def solid(value: int, size: int = 8) -> np.ndarray:
    return np.full((size, size, 3), value)


def imagenet(root, *extra):
    return parse_args(["--dataset", "imagenet", "--data-dir", str(root), "--model", "resnet50", *extra])


def pixel_value(x: torch.Tensor) -> int:
    """The 0..255 grey level of a solid image after Normalize(IMAGENET_MEAN, IMAGENET_STD)."""
    return round((float(x[0, 0, 0]) * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255)


def test_val_images_take_the_class_index_of_train_and_classes_come_from_the_data(tmp_path):
    # 100 classes n000..n099 in train/ (class k: one solid image of grey 50 + k); val/ holds three
    # of them, each image a grey level that names its class.
    for k in range(100):
        save_image(str(tmp_path / "train" / f"n{k:03d}" / "0.png"), solid(50 + k))
    test_images = {10: "n007", 11: "n007", 20: "n050", 21: "n050", 30: "n099", 31: "n099"}
    for value, name in test_images.items():
        save_image(str(tmp_path / "val" / name / f"{value}.png"), solid(value))
    data = load_data(imagenet(tmp_path, "--workers", "0", "--batch-size", "8", "--eval-batch-size", "4"), CPU)
    assert data.num_classes == 100 and data.in_shape == (3, 224, 224)
    assert (data.train.num_samples, data.val.num_samples, data.test.num_samples) == (80, 20, 6)
    seen = {}
    for xb, yb in data.test.iterate(0):
        seen.update({pixel_value(x): int(y) for x, y in zip(xb, yb)})
    # n007 is class 7 of train/, not class 0 of val/'s own three folders
    assert seen == {10: 7, 11: 7, 20: 50, 21: 50, 30: 99, 31: 99}
    for xb, yb in data.val.iterate(0):
        assert [pixel_value(x) - 50 for x in xb] == yb.tolist()


def test_a_val_class_that_train_lacks_and_empty_folders_are_named(tmp_path):
    write_folder(tmp_path / "a", {"cat": 3, "dog": 3}, {"dog": 1, "emu": 1, "yak": 1})
    with pytest.raises(UserError, match=r"/a/val has 2 classes that .*/a/train lacks \(emu, yak\)"):
        load_data(imagenet(tmp_path / "a"), CPU)
    os.makedirs(tmp_path / "b" / "train")
    os.makedirs(tmp_path / "b" / "val")
    with pytest.raises(UserError, match=r"/b/train holds no class folders"):
        load_data(imagenet(tmp_path / "b"), CPU)
    for name in ("cat", "dog"):
        os.makedirs(tmp_path / "c" / "train" / name)
    os.makedirs(tmp_path / "c" / "val")
    (tmp_path / "c" / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=r"/c/train has 2 class folders but no images"):
        load_data(imagenet(tmp_path / "c"), CPU)
    write_folder(tmp_path / "d", {"cat": 3, "dog": 3}, {"cat": 1})
    os.makedirs(tmp_path / "d" / "train" / "eel")
    with pytest.raises(UserError, match=r"1 class folders of .*/d/train hold no images \(eel\)"):
        load_data(imagenet(tmp_path / "d"), CPU)
    write_folder(tmp_path / "e", {"cat": 3}, {})
    with pytest.raises(UserError, match=r"/e/val does not exist"):
        load_data(imagenet(tmp_path / "e"), CPU)
    for i in range(3):  # as ImageNet's validation archive unpacks: no class folders
        save_image(str(tmp_path / "e" / "val" / f"ILSVRC2012_val_{i:08d}.JPEG"), solid(9))
    with pytest.raises(UserError, match=r"/e/val holds 3 images but no class folders; sort them into val/"):
        load_data(imagenet(tmp_path / "e"), CPU)


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    write_folder(root, {"a": 9, "b": 9, "c": 9}, {"a": 2, "b": 2}, size=40)
    return root


def batches(data, epoch, start=0):
    return [(x.clone(), y.clone()) for x, y in data.train.iterate(epoch, start)]


def test_mid_epoch_resume_reads_the_batches_of_a_straight_run_with_workers(textured):
    # 27 images, 5 held out: 22 training samples, batches of 4 -> 5 steps; RandomResizedCrop + flip
    data = load_data(imagenet(textured, "--workers", "2", "--batch-size", "4", "--seed", "3"), CPU)
    assert len(data.train) == 5
    rng_before = torch.get_rng_state()
    straight = batches(data, 2)
    assert torch.equal(torch.get_rng_state(), rng_before), "the run's global generator was drawn from"
    for start in (1, 3):
        resumed = batches(data, 2, start)
        assert len(resumed) == 5 - start
        for (x, y), (rx, ry) in zip(straight[start:], resumed):
            assert torch.equal(y, ry) and torch.equal(x, rx)
    # the draws are random (another epoch crops differently) yet do not depend on the workers
    assert not torch.equal(torch.cat([x for x, _ in batches(data, 3)]), torch.cat([x for x, _ in straight]))
    serial = load_data(imagenet(textured, "--workers", "0", "--batch-size", "4", "--seed", "3"), CPU)
    assert all(torch.equal(x, sx) for (x, _), (sx, _) in zip(straight, batches(serial, 2)))


def test_without_per_sample_seeds_a_resumed_epoch_would_differ(textured, monkeypatch):
    """The check above can fail: workers drawing from their own streams break resume."""
    monkeypatch.setattr(nsr.train.batches, "_global_rngs_seeded", lambda seed: nullcontext())
    data = load_data(imagenet(textured, "--workers", "2", "--batch-size", "4", "--seed", "3"), CPU)
    straight, resumed = batches(data, 2), batches(data, 2, 1)
    assert not all(torch.equal(x, rx) for (x, _), (rx, _) in zip(straight[1:], resumed))


def test_a_damaged_image_is_named_from_a_worker_in_one_line(textured, tmp_path):
    write_folder(tmp_path, {"a": 4, "b": 4}, {"a": 1})
    (tmp_path / "train" / "b" / "2.JPEG").write_bytes(b"\xff\xd8 not really a JPEG")
    data = load_data(imagenet(tmp_path, "--workers", "2", "--batch-size", "2"), CPU)
    with pytest.raises(UserError) as error:
        batches(data, 0)
    assert str(error.value) == (f"cannot read image {tmp_path}/train/b/2.JPEG (not an image PIL can "
                                "decode); replace or remove the file")
