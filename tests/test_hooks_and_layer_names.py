"""The forward hooks and the layer names: what is captured (nothing in eval mode, nothing after
`remove`), that a captured output is freed once used and nothing grows over 1,000 steps, no host
sync on CUDA; and names under DistributedDataParallel's `module.` and torch.compile's `_orig_mod.`,
the closest valid names for a wrong one, and one module under two spellings (NSR and CenterLoss)."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.mlp import MLP
from nsr import CenterLoss, NeuronSteadiness

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_eval_mode_captures_nothing_and_remove_detaches_hooks():
    model = MLP(4, [3], 2)
    reg = NeuronSteadiness(model, {"out": 1.0, "fc1": 0.5}, num_classes=2)
    model.eval()
    model(torch.randn(3, 4))
    assert reg.outputs._captured == {}
    with pytest.raises(ValueError, match="no captured output"):
        reg(torch.tensor([0, 1, 0]))
    model.train()
    model(torch.randn(3, 4))
    assert set(reg.outputs._captured) == {"out", "fc1"}
    reg.remove()
    assert reg.outputs._captured == {}
    assert not model.out._forward_hooks and not model.fc1._forward_hooks
    model(torch.randn(3, 4))
    assert reg.outputs._captured == {}


def test_captured_output_is_freed_after_reg_consumes_it():
    model = MLP(4, [3], 2)
    reg = NeuronSteadiness(model, {"out": 1.0}, num_classes=2, queue_batches=2)
    logits = model(torch.randn(6, 4))
    ref = weakref.ref(reg.outputs._captured["out"])
    assert ref() is logits
    loss = F.cross_entropy(logits, torch.tensor([0, 1, 0, 1, 1, 0])) + reg(torch.tensor([0, 1, 0, 1, 1, 0]))
    assert reg.outputs._captured == {}
    loss.backward()
    del logits, loss
    gc.collect()
    assert ref() is None


def _live_tensors():
    gc.collect()
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


def test_memory_flat_over_1000_steps():
    torch.manual_seed(0)
    model = MLP(8, [6], 3)
    reg = NeuronSteadiness(model, {"out": 1.0, "fc1": 0.1}, num_classes=3, queue_batches=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xs, ys = torch.randn(10, 8), torch.arange(10) % 3

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(model(xs), ys) + reg(ys)
        loss.backward()
        opt.step()

    for _ in range(20):
        step()
    before = _live_tensors()
    for _ in range(1000):
        step()
    assert reg.outputs._captured == {}
    assert _live_tensors() == before
    assert [tuple(m.sums.shape) for m in reg.memories] == [(4, 3, 3), (4, 3, 6)]  # K x C x D
    assert [tuple(m.counts.shape) for m in reg.memories] == [(4, 3, 1), (4, 3, 1)]


@needs_cuda
def test_cuda_step_never_syncs_the_host():
    torch.manual_seed(0)
    model = MLP(8, [6], 4).cuda()
    reg = NeuronSteadiness(model, {"out": 1.0, "fc1": 0.5}, num_classes=4, queue_batches=3)
    x, y = torch.randn(12, 8, device="cuda"), torch.arange(12, device="cuda") % 4
    model(x)
    reg(y).backward()  # the first call range-checks the labels ("auto"): one sync, allowed
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):  # wraps around the ring of K + 1 = 4 slots
            model(x)
            reg(y).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ---------------------------------------------------------------- layer names


class FakeDDP(nn.Module):
    """What DistributedDataParallel looks like to named_modules(): the model under `module.`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


@pytest.mark.parametrize("name", ["out", "module.out"])
def test_wrapped_model_accepts_names_with_or_without_module_prefix(name):
    model = FakeDDP(MLP(4, [3], 2))
    reg = NeuronSteadiness(model, {name: 1.0}, num_classes=2)
    model(torch.randn(3, 4))
    assert reg(torch.tensor([0, 1, 1])).item() >= 0
    plain = MLP(4, [3], 2)
    NeuronSteadiness(plain, {"module.out": 1.0}, num_classes=2)  # prefix also tolerated unwrapped


@pytest.mark.parametrize("name", ["out", "_orig_mod.out", "module._orig_mod.out"])
def test_compiled_model_matches_eager_twin(name):
    # Registered on the torch.compile wrapper (names with or without `_orig_mod.`), the hooks are
    # traced into the compiled graph: same NSR losses and gradients as an eager twin.
    torch.manual_seed(0)
    eager = MLP(6, [5], 3)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend="eager")  # dynamo tracing, no C++ build
    reg = NeuronSteadiness(eager, {"out": 1.5}, num_classes=3, queue_batches=2)
    reg_c = NeuronSteadiness(compiled, {name: 1.5}, num_classes=3, queue_batches=2)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        want = F.cross_entropy(eager(x), y) + reg(y)
        got = F.cross_entropy(compiled(x), y) + reg_c(y)
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        assert reg_c.last[name].item() == pytest.approx(reg.last["out"].item(), rel=1e-6)
        want.backward()
        got.backward()
    for p, q in zip(eager.parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_unknown_layer_name_lists_closest_valid_names():
    with pytest.raises(ValueError, match=r"'fc' is not a module of the model; closest valid names: .*fc1"):
        NeuronSteadiness(MLP(4, [3, 3], 2), {"fc": 1.0}, num_classes=2)
    with pytest.raises(ValueError, match=r"'rleu2'.*relu2"):
        NeuronSteadiness(MLP(4, [3, 3], 2), ["rleu2"], num_classes=2)
    # a wrapped model suggests names as they read unwrapped, and never the wrapper itself
    with pytest.raises(ValueError, match=r"closest valid names: fc2, fc1$"):
        NeuronSteadiness(FakeDDP(MLP(4, [3, 3], 2)), ["fc"], num_classes=2)


BOTH = [pytest.param(NeuronSteadiness, "NSR", id="NSR"), pytest.param(CenterLoss, "center-loss", id="center")]


@pytest.mark.parametrize("cls,what", BOTH)
@pytest.mark.parametrize("wrapped,names", [
    (False, ["out", "module.out"]), (True, ["out", "module.out"]), (False, {"fc1": 1.0, "_orig_mod.fc1": 2.0}),
    (True, ["module._orig_mod.fc1", "fc1"])])
def test_one_layer_under_two_spellings_is_refused(cls, what, wrapped, names):
    model = MLP(4, [3], 2)
    first, second = list(names)
    with pytest.raises(ValueError, match=rf"^{what} layers {first!r} and {second!r} are the same module of the "
                                         r"model; name each layer once$"):
        cls(FakeDDP(model) if wrapped else model, names, num_classes=2)
    assert not any(m._forward_hooks for m in model.modules())  # refused before any hook was set
