"""NSR's class-mean memory (ClassMeanMemory): K slots of per-class sums and counts and a pointer,
written out by hand; the pointer after every step and through a load; what a load of a saved
state refuses (another configuration, another width, a pointer out of range or of another type);
and the memory as registered buffers that move with `.to`."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models.mlp import MLP
from nsr import ClassMeanMemory, NeuronSteadiness


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
