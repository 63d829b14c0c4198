"""NeuronSteadiness's arguments and calls: λ set at any time, layers as a list, every constructor
error, and each call's checks of its labels (shape, dtype, range, on the CPU and on CUDA) and of
its layers' widths."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.mlp import MLP
from nsr import NeuronSteadiness

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_lambdas_set_at_any_time_change_the_loss():
    """reg.lambdas is read at every call: 0 removes a layer's term, a schedule is followed."""
    torch.manual_seed(0)
    model = MLP(6, [5], 3)
    reg = NeuronSteadiness(model, {"fc1": 0.5, "out": 2.0}, num_classes=3, queue_batches=2)
    g = torch.Generator().manual_seed(2)
    warmup = [0.0, 0.25, 0.5, 1.0, 1.0]  # a λ warm-up for "out"
    for step, scale in enumerate(warmup):
        x, y = torch.randn(9, 6, generator=g), torch.randint(0, 3, (9,), generator=g)
        model(x)
        reg.lambdas["out"] = 2.0 * scale
        if step == 4:
            reg.lambdas["fc1"] = 0
        total = reg(y)
        want = (0.0 if step == 4 else 0.5) * reg.last["fc1"].item() + 2.0 * scale * reg.last["out"].item()
        assert reg.last["out"].item() > 0 and reg.last["fc1"].item() > 0
        assert total.item() == pytest.approx(want, rel=1e-6, abs=1e-12), step
        assert f"'out': {2.0 * scale}" in repr(reg)
    # The gradient follows too: with both λ at 0 nothing flows back.
    reg.lambdas.update(fc1=0.0, out=0.0)
    model(x)
    reg(y).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_layers_as_list_with_shared_lambda_and_last_values():
    torch.manual_seed(0)
    model = MLP(4, [5, 3], 2)
    reg = NeuronSteadiness(model, ["fc1", "out"], num_classes=2, lam=0.25)
    model(torch.randn(6, 4))
    total = reg(torch.tensor([0, 1, 0, 1, 1, 0]))
    assert reg.lambdas == {"fc1": 0.25, "out": 0.25}
    assert set(reg.last) == {"fc1", "out"}
    assert all(not v.requires_grad for v in reg.last.values())
    assert total.item() == pytest.approx(0.25 * (reg.last["fc1"] + reg.last["out"]).item(), rel=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers={}), "at least one layer"),
    (dict(num_classes=0), "num_classes must be a positive integer"),
    (dict(queue_batches=0), r"queue_batches \(K\) must be a positive integer"),
    (dict(layers={"out": -1.0}), r"lambda for NSR layer 'out' must be a finite number >= 0, got -1.0"),
    (dict(layers={"out": float("nan")}), "must be a finite number >= 0, got nan"),
    (dict(layers={"out": "0.5"}), r"lambda for NSR layer 'out' must be a number \(int or float\), got '0.5' of type str"),
    (dict(layers=["out"], lam="abc"), r"must be a number \(int or float\), got 'abc' of type str"),
    (dict(layers={"out": True}), "got True of type bool"),
    (dict(layers=["out", "fc1", "out"]), "NSR layer 'out' is named twice"),
    (dict(sync="yes"), "sync must be None, True or False"),
    (dict(check_labels=1), "check_labels must be"),
    (dict(check_labels="sometimes"), "check_labels must be"),
])
def test_constructor_errors(kwargs, match):
    args = dict(layers={"out": 1.0}, num_classes=2) | kwargs
    with pytest.raises(ValueError, match=match):
        NeuronSteadiness(MLP(4, [3], 2), **args)


def test_call_errors():
    model = MLP(4, [3], 3)
    reg = NeuronSteadiness(model, {"out": 1.0}, num_classes=3)
    with pytest.raises(ValueError, match=r"no captured output for layer\(s\) \['out'\].*model.train\(\)"):
        reg(torch.tensor([0, 1]))

    def check(y, match):
        model(torch.randn(4, 4))
        with pytest.raises(ValueError, match=match):
            reg(y)

    check(torch.tensor([0, 1, 2]), r"labels must have shape \(4,\).*got \(3,\)")
    check(torch.tensor([[0, 1, 2, 0]]), r"labels must have shape \(4,\)")
    check(torch.tensor([0.0, 1.0, 2.0, 0.0]), "integer tensor of class indices, got torch.float32")
    check([0, 1, 2, 0], "labels must be a tensor, got list")
    check(torch.tensor([0, 1, 3, 0]), r"labels must lie in \[0, 3\), got values in \[0, 3\]")
    check(torch.tensor([0, -1, 2, 0]), r"labels must lie in \[0, 3\), got values in \[-1, 2\]")

    # A consumed forward cannot be used twice.
    model(torch.randn(4, 4))
    reg(torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="no captured output"):
        reg(torch.tensor([0, 1, 2, 0]))


def test_labels_of_other_integer_dtypes_are_accepted():
    model = MLP(4, [3], 3)
    reg = NeuronSteadiness(model, {"out": 1.0}, num_classes=3)
    model(torch.randn(4, 4))
    a = reg(torch.tensor([0, 1, 2, 0], dtype=torch.int32))
    assert math.isfinite(a.item())


def test_changing_width_is_a_clear_error():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    reg = NeuronSteadiness(net, ["0"], num_classes=2)
    net(torch.randn(2, 1, 6, 6))
    reg(torch.tensor([0, 1]))
    net(torch.randn(2, 1, 7, 7))
    with pytest.raises(ValueError, match="NSR layer '0' gives 50 neurons, but its memory holds 32.*per_channel=True"):
        reg(torch.tensor([0, 1]))


@needs_cuda
def test_cuda_labels_out_of_range_on_the_first_call_are_a_clear_error():
    model = MLP(4, [3], 3).cuda()
    reg = NeuronSteadiness(model, {"out": 1.0}, num_classes=3)
    model(torch.randn(4, 4, device="cuda"))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got values in \[0, 7\]"):
        reg(torch.tensor([0, 1, 7, 0], device="cuda"))
