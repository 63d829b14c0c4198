"""NeuronSteadiness's loss against an independent, deliberately naive reference, and resumed or
interrupted runs against an uninterrupted twin.

The reference (`naive_*` below) is written from the definition, not from nsr/regularizer.py:
explicit Python loops over classes, samples and neurons in float64, a plain list as the memory.
It checks the loss, the class means and the gradients (K, active_only, per_channel, float32 and
bf16 autocast). The twin tests check that the memory carries a run exactly: through its
state_dict, after a call refused for its labels, and from the CPU to CUDA.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.mlp import MLP
from nsr import NeuronSteadiness, steadiness_loss

C = 5


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


# ---------------------------------------------------------------- a run continues exactly as its twin


def _train_steps(model, reg, data):
    losses = []
    for x, y in data:
        model(x)
        out = reg(y)
        losses.append((out.item(), {k: v.item() for k, v in reg.last.items()}))
    return losses


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


@pytest.mark.parametrize("check_labels,first_call", [("auto", True), ("auto", False), (True, False),
                                                      (False, False)])
def test_a_bad_label_is_a_clear_error_and_training_continues_as_without_it(check_labels, first_call):
    """A checked call (the first under "auto", every one under True) refuses a bad label before
    the memory changes. An unchecked one fails in torch's own index check, with the same message,
    after the slot at the pointer was cleared; the pointer stays, so the next step rewrites that
    slot and training continues exactly as if the bad call had not happened."""
    torch.manual_seed(0)
    model = MLP(4, [3], 3)
    twin = copy.deepcopy(model)
    reg = NeuronSteadiness(model, {"out": 1.0, "fc1": 0.5}, num_classes=3, queue_batches=2,
                           check_labels=check_labels)
    ref = NeuronSteadiness(twin, {"out": 1.0, "fc1": 0.5}, num_classes=3, queue_batches=2)
    data = [(torch.randn(4, 4), torch.tensor([0, 1, 2, 0])) for _ in range(3)]
    if not first_call:
        _train_steps(model, reg, data[:2])
        _train_steps(twin, ref, data[:2])
    before = {k: v.clone() for k, v in reg.state_dict().items()}
    model(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"^NSR labels must lie in \[0, 3\), got values in \[0, 7\]$"):
        reg(torch.tensor([0, 1, 7, 0]))
    after = reg.state_dict()
    assert set(after) == set(before)
    checked = check_labels is True or first_call
    for key, value in before.items():
        now = after[key]
        if not checked and key in ("memories.0.sums", "memories.0.counts"):
            # the first layer's slot 0, at the pointer, is empty (cleared, not half-written); the
            # call failed there, before the second layer's memory
            assert not now[0].any(), key
            value, now = value[1:], now[1:]
        assert torch.equal(value, now), key
    assert [m.ptr for m in reg.memories] == [0, 0]
    assert torch.is_grad_enabled()  # restored after the error
    if first_call:
        _train_steps(model, reg, data[:2])
        _train_steps(twin, ref, data[:2])
    assert _train_steps(model, reg, data[2:]) == _train_steps(twin, ref, data[2:])


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
