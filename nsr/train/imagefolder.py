"""ImageNet-style data streamed from image files by DataLoader workers.

Layout: <data_dir>/train/<class>/<image> and <data_dir>/val/<class>/<image>. The classes are
train/'s sub-folders in sorted order, and that one class-to-index map labels val/ too (val/ may
hold a subset of the classes, never a class train/ lacks); the model's head has one output per
class of train/. Validation samples are cut from train/ with a fixed seed; val/ is the test set.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .augment import IMAGENET_MEAN, IMAGENET_STD
from .batches import Data, LoaderBatches, check_batch_size, split, validation_size
from .errors import UserError, one_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT = "<data-dir>/train/<class>/<image> and <data-dir>/val/<class>/<image>"


def _listdir(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError as e:
        raise UserError(f"cannot list {folder}: {e.strerror or one_line(e)}; check the folder and its "
                        "permissions") from None


def class_names(folder: str) -> list[str]:
    """The sorted class sub-folders of `folder` (hidden ones, such as .ipynb_checkpoints, skipped)."""
    return [e.name for e in _listdir(folder) if e.is_dir() and not e.name.startswith(".")]


def image_files(folder: str) -> list[str]:
    """Image files under `folder` (sub-folders included), in sorted order."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def scan(data_dir: str) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """(classes, train samples, test samples); samples are (path, label) with train/'s labels."""
    train_dir, val_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
    if not os.path.isdir(data_dir):
        raise UserError(f"--data-dir {data_dir} does not exist; imagenet needs {LAYOUT} (it is never "
                        "downloaded)")
    for folder in (train_dir, val_dir):
        if not os.path.isdir(folder):
            what = "is not a folder" if os.path.exists(folder) else "does not exist"
            raise UserError(f"{folder} {what}; imagenet needs an ImageFolder layout, {LAYOUT}")
    classes = class_names(train_dir)
    if not classes:
        raise UserError(f"{train_dir} holds no class folders; imagenet needs {LAYOUT}")
    index = {name: i for i, name in enumerate(classes)}
    train = [(path, index[name]) for name in classes for path in image_files(os.path.join(train_dir, name))]
    if not train:
        raise UserError(f"{train_dir} has {len(classes)} class folders but no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}); add images to them")
    empty = sorted(set(classes) - {classes[label] for _, label in train})
    if empty:
        raise UserError(f"{len(empty)} class folders of {train_dir} hold no images ({_first(empty)}); "
                        "add images or remove those folders (each class of train/ is a model output)")
    foreign = [name for name in class_names(val_dir) if name not in index]
    if foreign:
        raise UserError(f"{val_dir} has {len(foreign)} classes that {train_dir} lacks ({_first(foreign)}); "
                        "val/ is labelled with train/'s classes: add them to train/ or remove them from val/")
    test = [(path, index[name]) for name in class_names(val_dir)
            for path in image_files(os.path.join(val_dir, name))]
    if not test:
        loose = [e for e in _listdir(val_dir) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
        if loose:  # ImageNet's validation archive unpacks flat
            raise UserError(f"{val_dir} holds {len(loose)} images but no class folders; sort them into "
                            "val/<class>/ (e.g. with pytorch/examples' imagenet valprep.sh)")
        raise UserError(f"{val_dir} holds no images; imagenet needs {LAYOUT}")
    return classes, train, test


def _first(names: list[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def read_image(path: str):
    """The image at `path` as an RGB PIL image; a file PIL cannot decode is a UserError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        why = ("not an image PIL can decode" if isinstance(e, UnidentifiedImageError)
               else f"{type(e).__name__}: {one_line(e)}")
        raise UserError(f"cannot read image {path} ({why}); replace or remove the file") from None


class ImageFiles(torch.utils.data.Dataset):
    """(transform(image), label) for a list of (path, label)."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(read_image(path)), label


class FakeImages(torch.utils.data.Dataset):
    """n random 256 x 256 RGB images with random labels; image i is a function of (offset + i)."""

    def __init__(self, n: int, classes: int, offset: int, transform):
        self.n, self.classes, self.offset, self.transform = n, classes, offset, transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        from PIL import Image

        rng = np.random.default_rng(self.offset + i)
        image = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
        return self.transform(image), int(rng.integers(self.classes))


def load_imagefolder(cfg, device, rank, world) -> Data:
    """ImageNet from cfg.data_dir (or `fake` images for ResNet-50) as DataLoader batches."""
    if cfg.dataset == "fake":
        classes, train_samples, test_samples, source = None, [], [], "fake"
    else:  # before torchvision's import: a wrong layout is reported in a second
        classes, train_samples, test_samples = scan(cfg.data_dir)
        source = f"the ImageFolder {cfg.data_dir}"
    import torchvision.transforms as T

    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
    if classes is None:
        num_classes, n = 1000, cfg.fake_size
        train_all, val_all = FakeImages(n, 1000, cfg.seed, train_tf), FakeImages(n, 1000, cfg.seed, eval_tf)
        test = FakeImages(max(n // 4, 1), 1000, cfg.seed + n, eval_tf)
    else:
        num_classes = len(classes)
        train_all, val_all = ImageFiles(train_samples, train_tf), ImageFiles(train_samples, eval_tf)
        test = ImageFiles(test_samples, eval_tf)
    val_size = validation_size(cfg, len(train_all), len(test), source)
    train_idx, val_idx = split(len(train_all), val_size)
    check_batch_size(cfg, len(train_idx), world)
    sub = torch.utils.data.Subset
    make = lambda ds, shuffle, bs: LoaderBatches(ds, bs, shuffle, cfg.seed, cfg.workers, device,  # noqa: E731
                                                 rank, world)
    return Data(make(sub(train_all, train_idx.tolist()), True, cfg.batch_size),
                make(sub(val_all, val_idx.tolist()), False, cfg.eval_batch_size),
                make(test, False, cfg.eval_batch_size), num_classes, (3, 224, 224))
