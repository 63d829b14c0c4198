"""What NeuronSteadiness and CenterLoss share through LayerRegularizer (nsr/layer_outputs.py): λ
checked on every set, a removed regularizer and a copy of one that say what they are, and one
rule for `sync`, `check_labels` and `last`."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

from models.mlp import MLP
from nsr import CenterLoss, NeuronSteadiness

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
    # "auto" checks the first call only; a later bad label fails in torch's index check, which
    # the regularizer reports in the same words.
    model(torch.randn(6, 4))
    with pytest.raises(ValueError, match=rf"^{what} labels must lie in \[0, 3\), got values in \[0, 3\]$"):
        reg(torch.tensor([0, 1, 3, 0, 1, 0]))
    with pytest.raises(ValueError, match=f"'fc1' is not one of the {what} layers"):
        (reg.class_means if cls is NeuronSteadiness else reg.centers)("fc1")
