"""The library survives the ways a model is copied and saved after a regularizer is attached:
copy.deepcopy (an EMA or mean-teacher model, as timm's ModelEmaV2 makes one), pickle and
torch.save of the whole model, and loading it in another process."""

from __future__ import annotations

import copy
import gc
import io
import os
import pickle
import subprocess
import sys
import weakref

import pytest
import torch

from models.mlp import MLP
from nsr import CenterLoss, NeuronSteadiness
from tests.helpers import ROOT

BOTH = [pytest.param(NeuronSteadiness, id="NSR"), pytest.param(CenterLoss, id="center")]


def naive_nsr_k1(z: torch.Tensor, y: list[int]) -> float:
    """NSR with K = 1 by hand: each response against its class's mean over this batch."""
    rows, cols = z.shape
    total = 0.0
    for i in range(rows):
        mates = [k for k in range(rows) if y[k] == y[i]]
        for j in range(cols):
            mean = sum(z[k, j].item() for k in mates) / len(mates)
            total += (z[i, j].item() - mean) ** 2
    return total / (rows * cols)


def test_a_deep_copied_teacher_never_feeds_the_students_regularizer():
    torch.manual_seed(0)
    student = MLP(4, [5], 3).double()
    reg = NeuronSteadiness(student, {"out": 1.0}, num_classes=3, queue_batches=1)
    teacher = copy.deepcopy(student)  # after the regularizer is attached, as ModelEmaV2 copies it
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(3.0).add_(1.0)  # the teacher answers differently
    x, y = torch.randn(6, 4, dtype=torch.float64), [0, 1, 2, 0, 1, 2]
    z = student(x)
    teacher(x)  # in training mode, between the student's forward and reg(y)
    loss = reg(torch.tensor(y))
    assert loss.item() == pytest.approx(naive_nsr_k1(z.detach(), y), rel=1e-12)
    # the memory holds the student's class sums, not the teacher's
    sums = [sum(z[i, j].item() for i in range(6) if y[i] == c) for c in range(3) for j in range(3)]
    assert reg.memories[0].sums[0].flatten().tolist() == pytest.approx(sums, rel=1e-12)
    loss.backward()
    assert student.out.weight.grad.abs().sum() > 0 and teacher.out.weight.grad is None
    # the teacher alone leaves nothing for the student's regularizer
    teacher(x)
    with pytest.raises(ValueError, match=r"found no captured output for layer\(s\) \['out'\]"):
        reg(torch.tensor(y))


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_model_with_a_regularizer_saves_whole_and_its_copy_captures_nothing(cls, how):
    torch.manual_seed(1)
    model = MLP(4, [5], 3)
    plain = copy.deepcopy(model)  # the same model, never regularized
    reg = cls(model, {"out": 0.5, "fc1": 0.1}, num_classes=3)
    model(torch.randn(8, 4))
    reg(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    model(torch.randn(1000, 4))  # an output captured and not yet taken: it must not be saved
    if how == "pickle":
        data, plain_size = pickle.dumps(model), len(pickle.dumps(plain))
        loaded = pickle.loads(data)
    else:
        buffer, plain_buffer = io.BytesIO(), io.BytesIO()
        torch.save(model, buffer)
        torch.save(plain, plain_buffer)
        data, plain_size = buffer.getvalue(), len(plain_buffer.getvalue())
        loaded = torch.load(io.BytesIO(data), weights_only=False)
    # 1000 x 3 captured floats would add 12,000 bytes; the hooks' names add a few hundred
    assert len(data) - plain_size < 1000
    reg(torch.zeros(1000, dtype=torch.long))  # the original's pending output, taken
    x = torch.randn(5, 4)
    assert torch.equal(loaded(x), plain(x))  # the same weights
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match="found no captured output"):
        reg(y)  # the loaded copy's forward captured nothing for reg
    out = loaded(torch.randn(8, 4))  # the copy's output is not held by any hook
    ref = weakref.ref(out)
    del out
    gc.collect()
    assert ref() is None
    model(torch.randn(8, 4))
    assert torch.isfinite(reg(y))  # the original goes on


def test_a_model_saved_whole_loads_in_another_process_without_a_live_hook(tmp_path):
    torch.manual_seed(2)
    model = MLP(4, [5], 3)
    reg = NeuronSteadiness(model, ["out", "fc1"], num_classes=3, queue_batches=2)
    model(torch.randn(6, 4))
    reg(torch.tensor([0, 1, 2, 0, 1, 2]))
    x = torch.randn(5, 4)
    path = str(tmp_path / "model.pt")
    torch.save({"model": model, "x": x, "expected": model(x).detach()}, path)
    code = f"""
import gc, weakref, torch
saved = torch.load({path!r}, weights_only=False)
model = saved["model"]
assert torch.equal(model(saved["x"]), saved["expected"])
out = model(saved["x"])  # training mode
ref = weakref.ref(out)
out.sum().backward()
del out
gc.collect()
assert ref() is None, "a hook kept the output"
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
