"""NeuronSteadiness against an independent, deliberately naive reference.

The reference (`naive_*` below) is written from the definition, not from nsr/regularizer.py:
explicit Python loops over classes, samples and neurons in float64, a plain list as the memory.
"""

from __future__ import annotations

import copy
import gc
import io
import math
import pickle
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.mlp import MLP
from nsr import CenterLoss, ClassMeanMemory, NeuronSteadiness, steadiness_loss

C = 5


# ---------------------------------------------------------------- the naive reference


def naive_class_means(memory, num_classes, dim, active_only):
    """memory: list of (z rows as lists of floats, labels as ints) for the last K batches."""
    means = [[0.0] * dim for _ in range(num_classes)]
    for c in range(num_classes):
        for j in range(dim):
            total, count = 0.0, 0
            for rows, labels in memory:
                for row, label in zip(rows, labels):
                    if label != c:
                        continue
                    if active_only and not row[j] > 0:
                        continue
                    total += row[j]
                    count += 1
            means[c][j] = total / count if count else 0.0
    return means


def naive_loss(z, labels, means, active_only):
    """z: B x D float64 tensor (with grad); the loss as a sum of scalar terms, built by loops."""
    B, D = z.shape
    terms, n = [], 0
    for i in range(B):
        for j in range(D):
            if active_only and not z[i, j].item() > 0:
                continue
            terms.append((z[i, j] - means[labels[i]][j]) ** 2)
            n += 1
    if not terms:
        return z.sum() * 0.0
    return sum(terms) / (n if active_only else B * D)


def naive_responses(output, per_channel):
    """B x D rows; per_channel: each channel's mean over its H x W positions, by a loop over samples."""
    if per_channel and output.dim() > 2:
        rows = []
        for i in range(output.shape[0]):
            rows.append(torch.stack([output[i, c].sum() / output[i, c].numel()
                                     for c in range(output.shape[1])]))
        return torch.stack(rows)
    return output.reshape(output.shape[0], -1)


class SmallNet(nn.Module):
    """conv -> relu (named 'act', a B x 3 x 6 x 6 map) -> conv -> linear 'head' (B x C)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(3, 2, 3)
        self.head = nn.Linear(2 * 4 * 4, C)

    def forward(self, x):
        return self.head(self.conv2(self.act(self.conv1(x))).flatten(1))


def capture(model, names):
    box = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: box.__setitem__(n, o)) for n in names]
    return box, handles


# Batches of varying size, each with only some classes: the memory must handle absent classes.
BATCH_CLASSES = [[0, 1], [1, 2, 3], [0, 3, 4], [2], [0, 1, 2, 3, 4], [4, 1]]
BATCH_SIZES = [6, 5, 7, 3, 8, 4]


def batches(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    out = []
    for classes, size in zip(BATCH_CLASSES, BATCH_SIZES):
        x = torch.randn(size, 2, 8, 8, generator=g, dtype=dtype)
        pick = torch.randint(0, len(classes), (size,), generator=g)
        out.append((x, torch.tensor(classes)[pick]))
    return out


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("K,active_only,per_channel", [
    (1, False, False), (3, False, False), (3, True, False), (3, False, True), (1, True, True),
    (3, True, True), (10, False, True)])
def test_matches_naive_reference(K, active_only, per_channel):
    check_against_naive_reference(K, active_only, per_channel, "cpu")


@needs_cuda
@pytest.mark.parametrize("K,active_only,per_channel", [(3, False, False), (3, True, True)])
def test_matches_naive_reference_on_cuda(K, active_only, per_channel):
    check_against_naive_reference(K, active_only, per_channel, "cuda")


def check_against_naive_reference(K, active_only, per_channel, device):
    torch.manual_seed(0)
    model = SmallNet().double().to(device)
    lams = {"act": 0.7, "head": 2.5}
    reg = NeuronSteadiness(model, lams, num_classes=C, queue_batches=K, active_only=active_only,
                           per_channel=per_channel)
    box, _ = capture(model, list(lams))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    history = {name: [] for name in lams}
    params = list(model.parameters())
    for x, y in batches():
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss = F.cross_entropy(out, y) * 0.1 + reg(y)

        ref_total = F.cross_entropy(out, y) * 0.1
        labels = y.tolist()
        for name, lam in lams.items():
            z = naive_responses(box[name], per_channel)
            history[name].append((z.detach().tolist(), labels))
            memory = history[name][-K:]
            means = naive_class_means(memory, C, z.shape[1], active_only)
            ref = naive_loss(z, labels, means, active_only)
            assert reg.last[name].item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12)
            got_means = reg.class_means(name)
            assert torch.allclose(got_means.cpu(), torch.tensor(means, dtype=got_means.dtype), atol=1e-9)
            ref_total = ref_total + lam * ref
        assert loss.item() == pytest.approx(ref_total.item(), rel=1e-9, abs=1e-12)
        got = torch.autograd.grad(loss, params, retain_graph=True)
        want = torch.autograd.grad(ref_total, params, retain_graph=True)
        for g, w in zip(got, want):
            assert torch.allclose(g, w, rtol=1e-6, atol=1e-9), (g - w).abs().max()
        opt.zero_grad()
        loss.backward()
        opt.step()  # responses change from step to step


def test_float32_model_matches_float64_reference():
    torch.manual_seed(1)
    model = MLP(6, [5], 4)
    reg = NeuronSteadiness(model, ["fc1", "out"], num_classes=4, queue_batches=2, lam=0.3)
    box, _ = capture(model, ["fc1", "out"])
    hist = {"fc1": [], "out": []}
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        x, y = torch.randn(9, 6, generator=g), torch.randint(0, 4, (9,), generator=g)
        model(x)
        total = reg(y)
        assert total.dtype == torch.float32
        ref = 0.0
        for name in hist:
            z = box[name].detach().double()
            hist[name].append((z.tolist(), y.tolist()))
            ref += 0.3 * naive_loss(z, y.tolist(), naive_class_means(hist[name][-2:], 4, z.shape[1], False),
                                    False).item()
        assert total.item() == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_steadiness_loss(masked):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.tensor([0, 2, 2, 1, 0, 2, 1])
    means = torch.randn(3, 4, dtype=torch.float64, generator=g)
    active = (z.detach() > 0) if masked else None
    assert torch.autograd.gradcheck(lambda t: steadiness_loss(t, y, means, active), (z,))

    # The value, against the definition.
    value = steadiness_loss(z, y, means, active).item()
    terms = [(z[i, j].item() - means[y[i], j].item()) ** 2 for i in range(7) for j in range(4)
             if not masked or z[i, j].item() > 0]
    assert value == pytest.approx(sum(terms) / (len(terms) if masked else 28), rel=1e-12)


def test_steadiness_loss_means_are_constants_and_no_active_entry_gives_zero():
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    means = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 1, 0])
    steadiness_loss(z, y, means).backward()
    assert means.grad is None and z.grad is not None

    none_active = torch.zeros(4, 3, dtype=torch.bool)
    z.grad = None
    loss = steadiness_loss(z, y, means, none_active)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))

    # Same through the regularizer: all responses <= 0 with active_only gives 0, not NaN.
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    reg = NeuronSteadiness(model, {"1": 1.0}, num_classes=2, active_only=True)
    model(torch.randn(5, 3))
    out = reg(torch.tensor([0, 1, 0, 1, 1]))
    assert out.item() == 0.0 and not torch.isnan(reg.class_means("1")).any()


def test_nsr_term_alone_trains_the_layers_below():
    """CE weight 0: only the NSR term on `out` can move fc1/fc2 (the original code's bug: it never did)."""
    torch.manual_seed(0)
    model = MLP(12, [8, 6], 3)
    reg = NeuronSteadiness(model, {"out": 1.0}, num_classes=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 12), torch.arange(16) % 3
    loss = 0.0 * F.cross_entropy(model(x), y) + reg(y)
    assert loss.item() > 0
    loss.backward()
    for name in ("fc1.weight", "fc2.weight", "out.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    opt.step()
    for name in ("fc1.weight", "fc1.bias", "fc2.weight"):
        assert not torch.equal(before[name], model.get_parameter(name).detach()), name
    # And it does what it says: the responses move towards their class means.
    model(x)
    assert reg(y).item() < loss.item()


def test_bf16_autocast_gives_float32_finite_term():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    reg = NeuronSteadiness(model, {"0": 0.5, "3": 1.0}, num_classes=10, queue_batches=2,
                           per_channel=True)
    for _ in range(3):
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            assert logits.dtype == torch.bfloat16  # autocast really is on
            term = reg(y)
            loss = F.cross_entropy(logits, y) + term
        assert term.dtype == torch.float32 and torch.isfinite(term)
        assert all(v.dtype == torch.float32 for v in reg.last.values())
        assert all(b.dtype == torch.float32 for n, b in reg.named_buffers() if not n.endswith(("ptr", "widths")))
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------- state


def _train_steps(model, reg, data):
    losses = []
    for x, y in data:
        model(x)
        out = reg(y)
        losses.append((out.item(), {k: v.item() for k, v in reg.last.items()}))
    return losses


@pytest.mark.parametrize("active_only", [False, True])
def test_memory_by_hand(active_only):
    """K = 2 slots, 3 classes, 2 neurons: sums, counts, pointer and means written out by hand."""
    memory = ClassMeanMemory(num_classes=3, queue_batches=2, active_only=active_only, layer="h")
    f64 = dict(dtype=torch.float64)
    b1 = torch.tensor([[1.0, -2.0], [3.0, 4.0], [5.0, 6.0]], **f64), torch.tensor([0, 0, 2])
    b2 = torch.tensor([[7.0, 8.0], [-1.0, 2.0]], **f64), torch.tensor([0, 1])
    b3 = torch.tensor([[2.0, 2.0]], **f64), torch.tensor([2])
    memory.push(*b1)
    assert memory.ptr == 1
    if active_only:  # only entries > 0 are summed and counted
        assert memory.sums[0].tolist() == [[4.0, 4.0], [0.0, 0.0], [5.0, 6.0]]
        assert memory.counts[0].tolist() == [[2.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
        assert memory.means().tolist() == [[2.0, 4.0], [0.0, 0.0], [5.0, 6.0]]
    else:
        assert memory.sums[0].tolist() == [[4.0, 2.0], [0.0, 0.0], [5.0, 6.0]]
        assert memory.counts[0].tolist() == [[2.0], [0.0], [1.0]]
        assert memory.means().tolist() == [[2.0, 1.0], [0.0, 0.0], [5.0, 6.0]]
    memory.push(*b2)
    assert memory.ptr == 0  # wrapped: the next batch overwrites b1
    if active_only:  # class 0: (1 + 3 + 7) / 3 and (4 + 8) / 2; class 1: only its 2.0 counts
        assert memory.means().tolist() == [[11 / 3, 6.0], [0.0, 2.0], [5.0, 6.0]]
    else:  # class 0: (1 + 3 + 7) / 3 and (-2 + 4 + 8) / 3
        assert memory.means().tolist() == [[11 / 3, 10 / 3], [-1.0, 2.0], [5.0, 6.0]]
    memory.push(*b3)  # b1 leaves the window
    assert memory.ptr == 1
    if active_only:
        assert memory.means().tolist() == [[7.0, 8.0], [0.0, 2.0], [2.0, 2.0]]
    else:
        assert memory.means().tolist() == [[7.0, 8.0], [-1.0, 2.0], [2.0, 2.0]]
    assert memory.sums.shape == (2, 3, 2) and memory.counts.shape == (2, 3, 2 if active_only else 1)


@pytest.mark.parametrize("steps_before", [0, 1, 4, 6])
def test_state_dict_round_trip_continues_exactly(steps_before):
    torch.manual_seed(0)
    model = SmallNet().double()
    kwargs = dict(num_classes=C, queue_batches=3, per_channel=True, active_only=True)
    reg = NeuronSteadiness(model, {"act": 0.5, "head": 1.5}, **kwargs)
    data = batches(seed=5)
    _train_steps(model, reg, data[:steps_before])

    buf = io.BytesIO()
    torch.save(reg.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    model2 = copy.deepcopy(model)
    reg2 = NeuronSteadiness(model2, {"act": 0.5, "head": 1.5}, **kwargs)
    reg2.load_state_dict(state)
    rest = data[steps_before:] + batches(seed=6)
    assert _train_steps(model2, reg2, rest) == _train_steps(model, reg, rest)  # bit for bit
    pointers = {f"memories.{i}._extra_state" for i in range(2)}
    if steps_before:
        assert set(state) == {f"memories.{i}.{b}" for i in range(2) for b in ("sums", "counts")} | pointers
        assert state["memories.1.sums"].shape == (3, C, C) and state["memories.0.counts"].shape == (3, C, 3)
        assert all(int(state[key]) == steps_before % 3 for key in pointers)  # K slots
    else:  # no step yet: no sums or counts, the pointers at 0
        assert set(state) == pointers and all(int(state[key]) == 0 for key in pointers)
        reg.load_state_dict(state)  # resets a used regularizer to "nothing seen yet"
        assert [m.ptr for m in reg.memories] == [0, 0] and dict(reg.named_buffers()) == {}
        with pytest.raises(ValueError, match="NSR memory is empty"):
            reg.class_means("act")


@pytest.mark.parametrize("active_only", [False, True])
def test_state_saved_mid_window_continues_bit_for_bit(active_only):
    """Save model, optimizer and NSR 4 steps in (K = 3: the pointer mid-window), load them into a
    fresh model and regularizer (through a parent module, as a checkpoint of a whole training state
    is loaded), and both runs give identical losses and gradients from there on."""
    lams = {"act": 0.5, "head": 1.5}
    kwargs = dict(num_classes=C, queue_batches=3, per_channel=True, active_only=active_only)

    def trainer():
        torch.manual_seed(0)
        model = SmallNet().double()
        reg = NeuronSteadiness(model, lams, **kwargs)
        return model, reg, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)

    def step(model, reg, opt, x, y):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + reg(y)
        loss.backward()
        opt.step()
        return loss.item(), {k: v.item() for k, v in reg.last.items()}, [p.grad.clone() for p in model.parameters()]

    data = batches(seed=5) + batches(seed=6)
    model, reg, opt = trainer()
    for x, y in data[:4]:
        step(model, reg, opt, x, y)
    assert [m.ptr for m in reg.memories] == [1, 1]
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "parent": nn.ModuleDict({"nsr": reg}).state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    model2, reg2, opt2 = trainer()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    nn.ModuleDict({"nsr": reg2}).load_state_dict(saved["parent"])
    assert [m.ptr for m in reg2.memories] == [1, 1]
    for x, y in data[4:]:
        (loss, last, grads), (loss2, last2, grads2) = step(model, reg, opt, x, y), step(model2, reg2, opt2, x, y)
        assert loss2 == loss and last2 == last
        assert all(torch.equal(g, g2) for g, g2 in zip(grads, grads2))
    for m, m2 in zip(reg.memories, reg2.memories):
        assert torch.equal(m.sums, m2.sums) and torch.equal(m.counts, m2.counts) and m.ptr == m2.ptr


def _one_line_value_error(fn, match):
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def _stepped(layers, **kwargs):
    model = MLP(4, [3], 2)
    reg = NeuronSteadiness(model, layers, num_classes=kwargs.pop("num_classes", 2), **kwargs)
    model(torch.randn(4, 4))
    reg(torch.tensor([0, 1, 1, 0]))
    return model, reg


def test_state_dict_from_another_configuration_is_refused():
    _, reg = _stepped({"out": 1.0}, queue_batches=3)  # "out" has 2 neurons, "fc1" 3
    state = reg.state_dict()

    def load_into(layers, stepped=False, **kwargs):
        kwargs = dict(queue_batches=3) | kwargs
        target = _stepped(layers, **kwargs)[1] if stepped else NeuronSteadiness(
            MLP(4, [3], 2), layers, num_classes=kwargs.pop("num_classes", 2), **kwargs)
        return lambda: target.load_state_dict(state)

    fits = r"do not fit queue_batches=%d, num_classes=%d, active_only=%s"
    _one_line_value_error(load_into({"out": 1.0}, queue_batches=5), fits % (5, 2, False))
    _one_line_value_error(load_into({"out": 1.0}, num_classes=3), fits % (3, 3, False))
    _one_line_value_error(load_into({"out": 1.0}, active_only=True), fits % (3, 2, True))
    _one_line_value_error(load_into({"out": 1.0}, stepped=True, queue_batches=5), fits % (5, 2, False))
    # Other widths: refused at the load by a regularizer that knows its widths (it made a step) ...
    _one_line_value_error(load_into({"fc1": 1.0}, stepped=True),
                          r"'memories.0.': saved for 2 neurons, but layer 'fc1' gives 3")
    # ... and at the first step by a fresh one (it learns its layers' widths from that forward pass).
    model = MLP(4, [3], 2)
    fresh = NeuronSteadiness(model, {"fc1": 1.0}, num_classes=2, queue_batches=3)
    fresh.load_state_dict(state)
    model(torch.randn(4, 4))
    _one_line_value_error(lambda: fresh(torch.tensor([0, 1, 1, 0])),
                          r"NSR layer 'fc1' gives 3 neurons, but its memory holds 2")


@pytest.mark.parametrize("pointer,match", [
    (torch.tensor(3), r"pointer 3 lies outside \[0, 3\) \(queue_batches=3\)"),
    (torch.tensor(-1), r"pointer -1 lies outside \[0, 3\)"),
    (torch.tensor(1.0), r"must be an integer tensor of one element, got Tensor torch.float32 of shape \(\)"),
    (torch.tensor([0, 1]), r"got Tensor torch.int64 of shape \(2,\)"),
    (torch.tensor(True), "got Tensor torch.bool"),
    (1, "must be an integer tensor of one element, got int 1$"),
    ("1", "got str '1'$"),
])
def test_saved_pointer_out_of_range_or_of_another_type_is_refused(pointer, match):
    _, reg = _stepped({"out": 1.0, "fc1": 1.0}, queue_batches=3)
    state = reg.state_dict()
    state["memories.1._extra_state"] = pointer
    for stepped in (False, True):
        target = _stepped({"out": 1.0, "fc1": 1.0}, queue_batches=3)[1] if stepped else \
            NeuronSteadiness(MLP(4, [3], 2), {"out": 1.0, "fc1": 1.0}, num_classes=2, queue_batches=3)
        _one_line_value_error(lambda t=target: t.load_state_dict(state), "layer 'fc1'.*" + match)
        assert target.memories[1].ptr == (1 if stepped else 0)  # never set to the refused value
        parent = nn.ModuleDict({"r": target})
        _one_line_value_error(lambda p=parent: p.load_state_dict({"r." + k: v for k, v in state.items()}), match)


def test_memory_is_registered_buffers_that_move_with_to():
    model = MLP(4, [3], 2)
    reg = NeuronSteadiness(model, {"out": 1.0}, num_classes=2, queue_batches=3)
    assert dict(reg.named_buffers()) == {}  # made at the first step
    model(torch.randn(4, 4))
    reg(torch.tensor([0, 1, 1, 0]))
    names = {n for n, _ in reg.named_buffers()}
    assert names == {"memories.0.sums", "memories.0.counts"}
    reg.to("meta")
    assert all(b.device.type == "meta" for b in reg.buffers())
    reg.to(torch.float64)
    assert reg.memories[0].sums.dtype == reg.memories[0].counts.dtype == torch.float64
    assert reg.memories[0].ptr == 1 and reg.state_dict()["memories.0._extra_state"].dtype == torch.long


# ---------------------------------------------------------------- hooks and memory use


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


# ---------------------------------------------------------------- λ and the pointer


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


@pytest.mark.parametrize("K", [1, 3])
def test_pointer_is_true_after_every_step_and_loads(K):
    """Each memory's ptr is the number of steps mod K; the state_dict carries it."""
    torch.manual_seed(0)
    model = MLP(4, [3], 2)
    reg = NeuronSteadiness(model, {"out": 1.0, "fc1": 1.0}, num_classes=2, queue_batches=K)
    y = torch.tensor([0, 1, 1, 0])
    steps = 0
    for _ in range(3 * K + 2):
        model(torch.randn(4, 4))
        reg(y)
        steps += 1
        assert [m.ptr for m in reg.memories] == [steps % K] * 2
        assert int(reg.state_dict()["memories.1._extra_state"]) == steps % K
    # Loaded into a fresh regularizer (here through a parent module's load_state_dict, as a
    # checkpoint of a whole training state would), or into a stepped one, the pointer comes from
    # the saved state and stepping continues from it.
    model2 = copy.deepcopy(model)
    fresh = NeuronSteadiness(model2, {"out": 1.0, "fc1": 1.0}, num_classes=2, queue_batches=K)
    nn.ModuleDict({"nsr": fresh}).load_state_dict({"nsr." + k: v for k, v in reg.state_dict().items()})
    model3 = copy.deepcopy(model)
    stepped = NeuronSteadiness(model3, {"out": 1.0, "fc1": 1.0}, num_classes=2, queue_batches=K)
    parent = nn.ModuleDict({"reg": stepped})
    for _ in range(K + 1):  # its pointer moves on (K = 1: it stays at 0); the load must set it back
        model3(torch.randn(4, 4)), stepped(y)
    parent.load_state_dict({"reg." + k: v for k, v in reg.state_dict().items()})
    assert [m.ptr for m in stepped.memories] == [m.ptr for m in fresh.memories] == [steps % K] * 2
    x = torch.randn(4, 4)
    model(x), model2(x), model3(x)
    want = reg(y).item()
    assert fresh(y).item() == want and stepped(y).item() == want
    assert [m.ptr for m in fresh.memories] == [m.ptr for m in stepped.memories] == [(steps + 1) % K] * 2


# ---------------------------------------------------------------- API and errors


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


@pytest.mark.parametrize("check_labels", ["auto", True, False])
def test_bad_labels_leave_the_memory_untouched(check_labels):
    """Checked labels fail before the memory changes. Unchecked (False), index_add_ fails on the
    CPU after the oldest slot was cleared; the pointer stays, so the next step rewrites that slot
    and training continues exactly as if the bad call had not happened."""
    torch.manual_seed(0)
    model = MLP(4, [3], 3)
    twin = copy.deepcopy(model)
    reg = NeuronSteadiness(model, {"out": 1.0, "fc1": 0.5}, num_classes=3, queue_batches=2,
                           check_labels=check_labels)
    ref = NeuronSteadiness(twin, {"out": 1.0, "fc1": 0.5}, num_classes=3, queue_batches=2)
    data = [(torch.randn(4, 4), torch.tensor([0, 1, 2, 0])) for _ in range(3)]
    _train_steps(model, reg, data[:2])
    _train_steps(twin, ref, data[:2])
    before = {k: v.clone() for k, v in reg.state_dict().items()}
    model(torch.randn(4, 4))
    if check_labels is False:
        with pytest.raises((IndexError, RuntimeError)):
            reg(torch.tensor([0, 1, 7, 0]))
    else:
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got values in \[0, 7\]"):
            reg(torch.tensor([0, 1, 7, 0]))
    after = reg.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        now = after[key]
        if check_labels is False and key.endswith((".sums", ".counts")):
            value, now = value[1:], now[1:]  # slot 0, at the pointer, may have been cleared
        assert torch.equal(value, now), key
    assert [m.ptr for m in reg.memories] == [0, 0]
    assert torch.is_grad_enabled()  # restored after the error
    assert _train_steps(model, reg, data[2:]) == _train_steps(twin, ref, data[2:])


@needs_cuda
def test_cuda_labels_out_of_range_on_the_first_call_are_a_clear_error():
    model = MLP(4, [3], 3).cuda()
    reg = NeuronSteadiness(model, {"out": 1.0}, num_classes=3)
    model(torch.randn(4, 4, device="cuda"))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got values in \[0, 7\]"):
        reg(torch.tensor([0, 1, 7, 0], device="cuda"))


@needs_cuda
def test_memory_loaded_on_cpu_follows_the_model_to_cuda():
    torch.manual_seed(0)
    model = MLP(4, [3], 3)
    reg = NeuronSteadiness(model, {"out": 1.0}, num_classes=3, queue_batches=2)
    data = [(torch.randn(4, 4), torch.tensor([0, 1, 2, 0])) for _ in range(4)]
    _train_steps(model, reg, data[:2])
    want = _train_steps(model, reg, data[2:])

    torch.manual_seed(0)
    model2 = MLP(4, [3], 3)
    reg2 = NeuronSteadiness(model2, {"out": 1.0}, num_classes=3, queue_batches=2)
    _train_steps(model2, reg2, data[:2])
    state = reg2.state_dict()  # CPU tensors
    reg2.remove()
    reg3 = NeuronSteadiness(model2.cuda(), {"out": 1.0}, num_classes=3, queue_batches=2)
    reg3.load_state_dict(state)
    got = _train_steps(model2, reg3, [(x.cuda(), y.cuda()) for x, y in data[2:]])
    assert all(b.is_cuda for b in reg3.buffers())
    for (g, g_last), (w, w_last) in zip(got, want):
        assert g == pytest.approx(w, rel=1e-5)


# ---------------------------------------------------------------- what NSR and CenterLoss share

BOTH = [pytest.param(NeuronSteadiness, "NSR", id="NSR"), pytest.param(CenterLoss, "center-loss", id="center")]


def _step(model, reg, seed=0):
    g = torch.Generator().manual_seed(seed)
    model(torch.randn(6, 4, generator=g))
    return reg(torch.tensor([0, 1, 1, 0, 1, 0]))


@pytest.mark.parametrize("cls,what", BOTH)
def test_lambdas_are_checked_on_every_set(cls, what):
    model = MLP(4, [3], 2)
    reg = cls(model, {"fc1": 0.5, "out": 2.0}, num_classes=2)
    for bad, match in [(-5, rf"lambda for {what} layer 'out' must be a finite number >= 0, got -5$"),
                       (float("inf"), "must be a finite number >= 0, got inf"),
                       ("0.5", rf"lambda for {what} layer 'out' must be a number \(int or float\), got '0.5' of type str"),
                       ("abc", r"got 'abc' of type str"),
                       (True, "got True of type bool"),
                       (None, "got None of type NoneType"),
                       (torch.tensor(1.0), "of type Tensor")]:
        with pytest.raises(ValueError, match=match):
            reg.lambdas["out"] = bad
        assert reg.lambdas["out"] == 2.0  # unchanged
    with pytest.raises(ValueError, match=rf"'fc2' is not one of the {what} layers \['fc1', 'out'\]"):
        reg.lambdas["fc2"] = 1.0
    with pytest.raises(ValueError, match=r"layers are fixed; set lambdas\['out'\] = 0"):
        del reg.lambdas["out"]
    # A whole dict: the same layers, every value checked before any is taken.
    with pytest.raises(ValueError, match=rf"lambdas must name exactly the {what} layers \['fc1', 'out'\]"):
        reg.lambdas = {"fc1": 1.0}
    with pytest.raises(ValueError, match="must be a number"):
        reg.lambdas = {"fc1": 1.0, "out": "2"}
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        reg.lambdas.update(out=-1.0)
    assert dict(reg.lambdas) == {"fc1": 0.5, "out": 2.0}
    # Accepted values are floats, read at the next call.
    reg.lambdas["out"] = 3
    assert type(reg.lambdas["out"]) is float and reg.lambdas == {"fc1": 0.5, "out": 3.0}
    total = _step(model, reg)
    assert total.item() == pytest.approx(0.5 * reg.last["fc1"].item() + 3.0 * reg.last["out"].item(), rel=1e-6)
    reg.lambdas = {"out": 0, "fc1": 1.5}
    total = _step(model, reg, seed=1)
    assert total.item() == pytest.approx(1.5 * reg.last["fc1"].item(), rel=1e-6)
    assert all(v > 0 for v in reg.last.values())


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


@pytest.mark.parametrize("cls,what", BOTH)
def test_a_removed_regularizer_says_so(cls, what):
    model = MLP(4, [3], 2)
    reg = cls(model, ["out"], num_classes=2)
    _step(model, reg)
    reg.remove()
    assert not model.out._forward_hooks
    with pytest.raises(ValueError, match=rf"^this {what} regularizer was removed: its hooks are gone; make a new one$"):
        _step(model, reg)
    reg.remove()  # twice is harmless


@pytest.mark.parametrize("cls,what", BOTH)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_the_regularizer_says_it_has_no_hooks(cls, what, how):
    model = MLP(4, [3], 2)
    reg = cls(model, {"out": 0.5, "fc1": 1.0}, num_classes=2)
    _step(model, reg)
    twin = copy.deepcopy(reg) if how == "deepcopy" else pickle.loads(pickle.dumps(reg))
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in reg.state_dict().items())
    with pytest.raises(ValueError, match=rf"^this {what} regularizer is a copy \(copy.deepcopy, pickle or torch.save\), "
                                         r"and a copy has no hooks on the model; build a new one for the copied model$"):
        _step(model, twin)
    assert math.isfinite(reg(torch.tensor([0, 1, 1, 0, 1, 0])).item())  # the original still has its hooks
    twin.remove()
    assert model.out._forward_hooks  # removing the copy leaves the original's hooks


@pytest.mark.parametrize("cls,what", BOTH)
def test_sync_check_labels_and_last_follow_one_rule(cls, what):
    model = MLP(4, [3], 3)
    reg = cls(model, "out", num_classes=3)
    assert reg.sync is None and reg.last == {}
    _step(model, reg)
    assert reg.sync is False  # decided at the first call: no process group here
    last = reg.last
    assert set(last) == {"out"} and not last["out"].requires_grad and last["out"].dim() == 0
    last.clear()
    assert set(reg.last) == {"out"}  # a copy
    # "auto" on CPU: every call checks the range, not just the first.
    model(torch.randn(6, 4))
    with pytest.raises(ValueError, match=rf"^{what} labels must lie in \[0, 3\), got values in \[0, 3\]$"):
        reg(torch.tensor([0, 1, 3, 0, 1, 0]))
    with pytest.raises(ValueError, match=f"'fc1' is not one of the {what} layers"):
        (reg.class_means if cls is NeuronSteadiness else reg.centers)("fc1")
