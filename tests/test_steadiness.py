"""The steadiness figure (nsr/train/steadiness.py, evaluation.py): each watched layer's mean over
neurons of sum_c (n_c / N) Var_c, checked against numpy, batch by batch and as a run logs it."""

import csv
import os

import numpy as np
import pytest
import torch

from nsr.train.config import parse_args
from nsr.train.data import load_data
from nsr.train.evaluation import watched_layers
from nsr.train.steadiness import ClassMoments
from models import build_model
from tests.helpers import DIGITS, numpy_intra


def test_class_moments_over_uneven_batches_match_numpy():
    rng = np.random.default_rng(0)
    # 4 classes, class 3 never seen; batches of 1, 7 and 12 samples, classes missing from some
    y = np.array([2] + [0, 0, 1, 1, 1, 0, 2] + list(rng.integers(0, 3, 12)))
    z = rng.normal(size=(len(y), 5)) * np.array([1.0, 10.0, 0.1, 3.0, 1e3]) + y[:, None] * 7.0
    # float64 responses (python -m nsr analyze), and float32 ones (each validation pass of a run)
    for dtype, rel in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        moments = ClassMoments(num_classes=4)
        for lo, hi in ((0, 1), (1, 8), (8, 20)):
            moments.update(torch.from_numpy(z[lo:hi]).to(dtype), torch.from_numpy(y[lo:hi]))
        expected = numpy_intra(torch.from_numpy(z).to(dtype).double().numpy(), y)
        assert float(moments.intra().mean()) == pytest.approx(expected, rel=rel), dtype
        assert moments.count.tolist() == np.bincount(y, minlength=4).tolist() and moments.count[3] == 0
    # a hand case: one neuron, class 0 = {0, 2}, class 1 = {5}: (2/3)·1 + (1/3)·0
    hand = ClassMoments(2)
    hand.update(torch.tensor([[0.0], [5.0]]), torch.tensor([0, 1]))
    hand.update(torch.tensor([[2.0]]), torch.tensor([0]))
    assert float(hand.intra().mean()) == pytest.approx(2 / 3, rel=1e-15)


def test_watched_layers():
    mlp = build_model("mlp4", 10, (1, 8, 8))
    assert watched_layers(mlp, ["out"], "mlp4") == ["out", "fc1", "fc2"]
    assert watched_layers(mlp, ["relu2", "missing"], "mlp4") == ["relu2", "fc1", "fc2", "out"]
    cnn = build_model("resnet18", 10, (3, 32, 32))
    assert watched_layers(cnn, ["fc"], "resnet18") == ["fc"]


def test_run_logs_the_figure_of_its_last_validation(digits_reference):
    """history.csv's last row holds, per layer, the figure of the model in last.pt on the
    validation split: recomputed here by a float64 numpy forward pass from the saved weights."""
    folder, metrics, _ = digits_reference
    with open(os.path.join(folder, "history.csv"), newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert {"intra_var_out", "intra_var_fc1", "intra_var_fc2"} <= set(last)
    weights = {k: v.double().numpy() for k, v in torch.load(os.path.join(folder, "last.pt"), weights_only=True)["model"].items()}
    data = load_data(parse_args([*DIGITS, "--out", str(folder)]), torch.device("cpu"))
    x = np.concatenate([xb.reshape(len(xb), -1).double().numpy() for xb, _ in data.val.iterate(0)])
    y = np.concatenate([yb.numpy() for _, yb in data.val.iterate(0)])
    fc1 = x @ weights["fc1.weight"].T + weights["fc1.bias"]
    fc2 = np.maximum(fc1, 0) @ weights["fc2.weight"].T + weights["fc2.bias"]
    out = np.maximum(fc2, 0) @ weights["out.weight"].T + weights["out.bias"]
    for name, z in (("fc1", fc1), ("fc2", fc2), ("out", out)):
        assert float(last[f"intra_var_{name}"]) == pytest.approx(numpy_intra(z, y), rel=1e-5), name
    assert metrics["history"][-1]["intra_var_out"] == float(last["intra_var_out"])
