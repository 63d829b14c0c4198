"""What the library takes and refuses: numbers and flags (Python's and numpy's, one rule for
every argument of NeuronSteadiness, CenterLoss and ClassMeanMemory), an empty batch, a loaded
NSR memory; and the bench's plain ring form, which computes the library's loss."""

from __future__ import annotations

import copy
import importlib.util
import os

import numpy as np
import pytest
import torch

from models.mlp import MLP
from nsr import CenterLoss, ClassMeanMemory, NeuronSteadiness
from tests.helpers import ROOT, nan_first

BOTH = [pytest.param(NeuronSteadiness, "NSR", id="NSR"), pytest.param(CenterLoss, "center-loss", id="center")]


def batches(n=4, batch=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 4, generator=g, dtype=torch.float64), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def losses(model, reg, data) -> list[float]:
    out = []
    for x, y in data:
        model(x)
        out.append(reg(y).item())
    return out


# ------------------------------------------------------------------ numbers and flags

def test_numpy_numbers_and_bools_act_as_python_ones():
    model = MLP(4, [5], 3).double()
    twin = copy.deepcopy(model)
    reg = NeuronSteadiness(model, ["out", "fc1"], num_classes=np.int64(3), queue_batches=np.int32(2),
                           lam=np.float32(0.5), active_only=np.bool_(True), per_channel=np.False_,
                           sync=np.False_, check_labels=np.True_)
    ref = NeuronSteadiness(twin, ["out", "fc1"], num_classes=3, queue_batches=2, lam=0.5, active_only=True,
                           per_channel=False, sync=False, check_labels=True)
    assert [type(v) for v in (reg.num_classes, reg.queue_batches, reg.active_only, reg.sync)] == [int, int, bool, bool]
    reg.lambdas["fc1"] = np.float64(0.25)
    ref.lambdas["fc1"] = 0.25
    data = batches()
    assert losses(model, reg, data) == losses(twin, ref, data)

    model, twin = MLP(4, [5], 3).double(), None
    twin = copy.deepcopy(model)
    center = CenterLoss(model, {"out": np.float16(0.5)}, num_classes=np.uint8(3), alpha=np.float32(0.25))
    center_ref = CenterLoss(twin, {"out": 0.5}, num_classes=3, alpha=0.25)
    assert type(center.alpha) is float and type(center.num_classes) is int
    assert losses(model, center, data) == losses(twin, center_ref, data)


HUGE = 10 ** 400  # beyond float's range: float(HUGE) raises OverflowError
NSR_REFUSED = [
    (dict(num_classes=3.0), r"^num_classes must be a positive integer, got 3.0$"),
    (dict(num_classes=np.float64(3)), r"^num_classes must be a positive integer, got np.float64\(3.0\)$"),
    (dict(num_classes=True), r"^num_classes must be a positive integer, got True$"),
    (dict(num_classes=np.int64(0)), r"^num_classes must be a positive integer, got np.int64\(0\)$"),
    (dict(num_classes="3"), r"^num_classes must be a positive integer, got '3'$"),
    (dict(queue_batches=2.5), r"^queue_batches \(K\) must be a positive integer, got 2.5$"),
    (dict(queue_batches=np.int64(-1)), r"^queue_batches \(K\) must be a positive integer, got np.int64\(-1\)$"),
    (dict(lam=HUGE), r"^lambda for NSR layer 'out' must be a finite number >= 0, got 1000000000"),
    (dict(lam=10 ** 5000), r"must be a finite number >= 0, got an integer too large to print$"),
    (dict(lam=-np.float32(1)), r"must be a finite number >= 0, got np.float32\(-1.0\)$"),
    (dict(lam=np.True_), r"must be a number \(int or float\), got np.True_ of type bool"),
    (dict(active_only="no"), r"^active_only must be True or False, got 'no' of type str$"),
    (dict(active_only=1), r"^active_only must be True or False, got 1 of type int$"),
    (dict(per_channel="False"), r"^per_channel must be True or False, got 'False' of type str$"),
    (dict(per_channel=None), r"^per_channel must be True or False, got None of type NoneType$"),
    (dict(sync="no"), r"^sync must be None, True or False, got 'no' of type str$"),
    (dict(sync=0), r"^sync must be None, True or False, got 0 of type int$"),
    (dict(check_labels="no"), r"^check_labels must be 'auto', True or False, got 'no' of type str$"),
    (dict(check_labels=1), r"^check_labels must be 'auto', True or False, got 1 of type int$"),
]
CENTER_REFUSED = [
    (dict(alpha=np.float32(1.5)), r"^center-loss alpha must be a finite number in \[0, 1\], got np.float32\(1.5\)$"),
    (dict(alpha=HUGE), r"^center-loss alpha must be a finite number in \[0, 1\], got 1000000000"),
    (dict(alpha=float("nan")), r"^center-loss alpha must be a finite number in \[0, 1\], got nan$"),
    (dict(alpha="0.5"), r"^center-loss alpha must be a number \(int or float\), got '0.5' of type str$"),
    (dict(alpha=False), r"^center-loss alpha must be a number \(int or float\), got False of type bool$"),
    (dict(lam=HUGE), r"^lambda for center-loss layer 'out' must be a finite number >= 0"),
    (dict(num_classes=np.float32(2)), r"^num_classes must be a positive integer"),
    (dict(sync="yes"), r"^sync must be None, True or False, got 'yes'"),
]


@pytest.mark.parametrize("cls,kwargs,match", [(NeuronSteadiness, *case) for case in NSR_REFUSED] +
                         [(CenterLoss, *case) for case in CENTER_REFUSED])
def test_every_numeric_and_boolean_argument_follows_one_rule(cls, kwargs, match):
    model = MLP(4, [3], 2)
    with pytest.raises(ValueError, match=match) as info:
        cls(model, **({"layers": ["out"], "num_classes": 2} | kwargs))
    assert "\n" not in str(info.value)
    assert not any(m._forward_hooks for m in model.modules())  # refused before a hook was set


@pytest.mark.parametrize("cls,what", BOTH)
def test_a_huge_or_numpy_lambda_set_later_follows_the_same_rule(cls, what):
    model = MLP(4, [3], 2)
    reg = cls(model, {"out": 1.0}, num_classes=2)
    with pytest.raises(ValueError, match=rf"^lambda for {what} layer 'out' must be a finite number >= 0, got 1000"):
        reg.lambdas["out"] = HUGE
    reg.lambdas["out"] = np.int64(3)
    assert reg.lambdas["out"] == 3.0 and type(reg.lambdas["out"]) is float


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_classes=3, queue_batches=2, active_only="yes"), "^active_only must be True or False"),
    (dict(num_classes=3, queue_batches=0), r"^queue_batches \(K\) must be a positive integer, got 0$"),
    (dict(num_classes=np.float64(3), queue_batches=2), "^num_classes must be a positive integer"),
])
def test_the_memory_on_its_own_follows_the_same_rule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassMeanMemory(**kwargs)
    memory = ClassMeanMemory(num_classes=np.int64(3), queue_batches=np.int16(2), active_only=np.True_)
    assert (memory.num_classes, memory.queue_batches, memory.active_only) == (3, 2, True)


# ------------------------------------------------------------------ an empty batch

@pytest.mark.parametrize("cls,what", BOTH)
@pytest.mark.parametrize("first", [True, False], ids=["first-call", "after-steps"])
def test_an_empty_batch_adds_zero_and_leaves_the_state_as_it_was(cls, what, first):
    model = MLP(4, [3], 3).double()
    twin = copy.deepcopy(model)
    kwargs = dict(queue_batches=2) if cls is NeuronSteadiness else dict(alpha=0.5)
    reg, ref = (cls(m, {"out": 1.0, "fc1": 0.5}, num_classes=3, **kwargs) for m in (model, twin))
    data = batches(3)
    if not first:
        losses(model, reg, data[:2])
        losses(twin, ref, data[:2])
    before = {k: v.clone() for k, v in reg.state_dict().items()}
    model(torch.zeros(0, 4, dtype=torch.float64))
    loss = reg(torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and loss.dtype == torch.float64
    loss.backward()  # a term like any other
    assert {k: v.item() for k, v in reg.last.items()} == {"out": 0.0, "fc1": 0.0}
    after = reg.state_dict()
    if cls is CenterLoss and first:  # the centres are made, at their initial value 0
        after = {k: v for k, v in after.items() if not torch.equal(v, torch.zeros_like(v))}
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    # the next step is the one the regularizer would have made without the empty batch
    start = 0 if first else 2
    assert losses(model, reg, data[start:]) == losses(twin, ref, data[start:])


# ------------------------------------------------------------------ a loaded memory

def _stepped(active_only=False):
    model = MLP(4, [3], 2).double()
    reg = NeuronSteadiness(model, {"out": 1.0}, num_classes=2, queue_batches=3, active_only=active_only)
    losses(model, reg, batches(2, classes=2))
    return model, reg


def _with(key, value):
    def mutate(state):
        state[key] = value(state[key]) if callable(value) else value
    return mutate



DAMAGED = {
    "counts-int32": (_with("memories.0.counts", lambda t: t.int()),
                     r"saved sums and counts are torch.float64 and torch.int32; the memory holds floating-point"),
    "sums-bool": (_with("memories.0.sums", lambda t: t != 0), r"saved sums and counts are torch.bool and torch.float64"),
    "sums-nan": (_with("memories.0.sums", nan_first), r"its saved sums hold NaN or infinite values$"),
    "sums-inf": (_with("memories.0.sums", lambda t: t / 0), r"its saved sums hold NaN or infinite values$"),
    "counts-negative": (_with("memories.0.counts", lambda t: -t), r"its saved counts must be whole numbers >= 0$"),
    "counts-fractional": (_with("memories.0.counts", lambda t: t + 0.5), r"its saved counts must be whole numbers >= 0$"),
    "counts-nan": (_with("memories.0.counts", nan_first), r"its saved counts must be whole numbers >= 0$"),
    "sums-without-counts": (_with("memories.0.counts", lambda t: t * 0), r"its saved sums are not 0 where nothing was"),
    "pointer-without-memory": (lambda s: (s.pop("memories.0.sums"), s.pop("memories.0.counts")),
                               r"its saved pointer is 2 but it has no sums and counts; a memory saved after a step"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
@pytest.mark.parametrize("into", ["fresh", "stepped"])
def test_a_damaged_memory_is_refused_at_the_load_in_one_line(case, into):
    _, reg = _stepped()
    state = {k: v.clone() for k, v in reg.state_dict().items()}
    assert state["memories.0._extra_state"].item() == 2
    mutate, match = DAMAGED[case]
    mutate(state)
    target = _stepped()[1] if into == "stepped" else NeuronSteadiness(MLP(4, [3], 2).double(), {"out": 1.0},
                                                                      num_classes=2, queue_batches=3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"^NSR memory 'memories.0.' of layer 'out': " + match) as info:
        target.load_state_dict(state)
    assert "\n" not in str(info.value)
    after = target.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)  # nothing changed


def test_a_sound_memory_of_another_float_dtype_loads_and_a_pre_step_state_resets():
    _, reg = _stepped(active_only=True)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in reg.state_dict().items()}
    model, target = _stepped(active_only=True)
    target.load_state_dict(state)  # float32 into a float64 memory: torch copies it in
    assert torch.allclose(target.class_means(), reg.class_means().float().double())
    empty = NeuronSteadiness(MLP(4, [3], 2), {"out": 1.0}, num_classes=2, queue_batches=3, active_only=True)
    target.load_state_dict(empty.state_dict())  # saved before the first step: nothing seen yet
    assert not target.started and target.memories[0].ptr == 0


# ------------------------------------------------------------------ the bench's plain form

def _plain_form():
    spec = importlib.util.spec_from_file_location("nsr_overhead", os.path.join(ROOT, "bench", "nsr_overhead.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PlainNSR


def naive_nsr(history: list[tuple[torch.Tensor, list[int]]], z: torch.Tensor, y: list[int], K: int) -> float:
    """Class means over the last K batches (this one included), by loops; then the mean square."""
    window = history[-K:]
    rows, cols = z.shape
    total = 0.0
    for i in range(rows):
        for j in range(cols):
            seen = [zk[r, j].item() for zk, yk in window for r in range(len(yk)) if yk[r] == y[i]]
            total += (z[i, j].item() - sum(seen) / len(seen)) ** 2
    return total / (rows * cols)


@pytest.mark.parametrize("K", [1, 3])
def test_the_bench_plain_form_computes_the_library_loss(K):
    PlainNSR = _plain_form()
    model = MLP(4, [5], 4).double()
    reg = NeuronSteadiness(model, {"out": 1.0}, num_classes=4, queue_batches=K)
    plain, history = PlainNSR(4, K), []
    for x, y in batches(6, batch=7, classes=4, seed=3):  # 7 samples of 4 classes: some absent in a batch
        z = model(x)
        history.append((z.detach(), y.tolist()))
        expected = naive_nsr(history, z.detach(), y.tolist(), K)
        assert reg(y).item() == pytest.approx(expected, rel=1e-10)
        assert plain(z, y).item() == pytest.approx(expected, rel=1e-10)
