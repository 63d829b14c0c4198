"""CenterLoss against a per-sample Python loop of Wen et al.'s formulas (float64), plus its API."""

from __future__ import annotations

import copy
import gc
from collections import OrderedDict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nsr.center_loss import CenterLoss
from tests.helpers import free_port

C, BATCH = 5, 8
LAMS = {"flatten": 0.3, "fc": 2.0}


def make_model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc=nn.Linear(6, 4), act=nn.ReLU(),
                                     out=nn.Linear(4, C))).to(dtype)


def make_batches(steps=5, dtype=torch.float64):
    """Random inputs of shape B x 2 x 3; labels drawn from a few classes only in some steps."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for step in range(steps):
        x = torch.randn(BATCH, 2, 3, generator=g).to(dtype)
        pool = [[0, 1, 2, 3, 4], [1, 3], [0, 0, 4], [2], [0, 1, 2, 3, 4]][step % 5]  # 1-4 classes absent
        y = torch.tensor(pool)[torch.randint(0, len(pool), (BATCH,), generator=g)]
        batches.append((x, y))
    return batches


def naive_center_loss(zs, ys, centers, alpha):
    """One step of the paper for one layer, sample by sample in Python floats: (loss, new centres).

    loss = 1/2 * mean_i ||z_i - c_{y_i}||^2; then for each class j:
    delta_j = sum_{i: y_i = j} (c_j - z_i) / (1 + n_j), c_j <- c_j - alpha * delta_j.
    """
    B = len(zs)
    loss = 0.0
    for z, y in zip(zs, ys):
        loss += 0.5 * sum((zd - cd) ** 2 for zd, cd in zip(z, centers[y]))
    loss /= B
    new = []
    for j, c in enumerate(centers):
        members = [z for z, y in zip(zs, ys) if y == j]
        delta = [sum(cd - z[d] for z in members) / (1 + len(members)) for d, cd in enumerate(c)]
        new.append([cd - alpha * dd for cd, dd in zip(c, delta)])
    return loss, new


def layer_outputs(model, x):
    """The two regularized layers' outputs as Python lists, computed without hooks."""
    flat = x.flatten(1)
    return {"flatten": flat.tolist(), "fc": model.fc(flat).tolist()}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matches_naive_reference_over_steps(dtype, tol):
    alpha = 0.37
    model = make_model(dtype)
    reg = CenterLoss(model, LAMS, num_classes=C, alpha=alpha)
    ref = {"flatten": [[0.0] * 6 for _ in range(C)], "fc": [[0.0] * 4 for _ in range(C)]}  # paper: c = 0
    for step, (x, y) in enumerate(make_batches(dtype=dtype)):
        with torch.no_grad():
            outputs = layer_outputs(model, x)
        model(x)
        total = reg(y)
        want_total = 0.0
        for name, lam in LAMS.items():
            loss, ref[name] = naive_center_loss(outputs[name], y.tolist(), ref[name], alpha)
            want_total += lam * loss
            assert reg.last[name].item() == pytest.approx(loss, rel=tol, abs=tol), (step, name)
            got = reg.centers(name).double()
            assert torch.allclose(got, torch.tensor(ref[name], dtype=torch.float64), rtol=tol, atol=tol)
        assert total.item() == pytest.approx(want_total, rel=tol, abs=tol), step
        assert step == 0 or total.item() > 0
    # Class 2 was absent from step 2 (pool [0, 0, 4]) ... and every class moved at some step.
    assert all(any(v != 0 for v in row) for row in ref["fc"])


def test_gradient_is_z_minus_center_over_batch_and_centres_get_none():
    model = make_model()
    reg = CenterLoss(model, ["flatten"], num_classes=C, alpha=0.5, lam=1.0)
    batches = make_batches(3)
    for x, y in batches[:2]:  # move the centres away from 0 first
        model(x)
        reg(y)
    x, y = batches[2]
    x = x.clone().requires_grad_(True)
    before = reg.centers("flatten").clone()
    model(x)
    reg(y).backward()
    # d/dz_i of 1/2 * 1/B * sum_k ||z_k - c_{y_k}||^2 is (z_i - c_{y_i}) / B, by hand:
    z = x.detach().flatten(1)
    want = torch.stack([(z[i] - before[y[i]]) / BATCH for i in range(BATCH)]).view_as(x)
    assert torch.allclose(x.grad, want, rtol=0, atol=1e-15)
    centers = reg.centers("flatten")
    assert not centers.requires_grad and centers.grad is None
    assert not torch.equal(centers, before)  # updated after the loss, without breaking backward
    assert set(dict(reg.named_parameters())) == set()  # nothing for an optimizer to pick up


def test_lambda_change_takes_effect():
    model = make_model()
    reg = CenterLoss(model, LAMS, num_classes=C)
    batches = make_batches(4)
    for x, y in batches[:1]:
        model(x)
        reg(y)
    reg.lambdas["fc"] = 0.0
    model(batches[1][0])
    total = reg(batches[1][1])
    assert total.item() == pytest.approx(0.3 * reg.last["flatten"].item(), rel=1e-12)
    reg.lambdas = {"flatten": 0.0, "fc": 5.0}
    model(batches[2][0])
    total = reg(batches[2][1])
    assert reg.last["fc"].item() > 0
    assert total.item() == pytest.approx(5.0 * reg.last["fc"].item(), rel=1e-12)
    reg.lambdas["flatten"] = 0.5
    model(batches[3][0])
    total = reg(batches[3][1])
    assert total.item() == pytest.approx(0.5 * reg.last["flatten"].item() + 5.0 * reg.last["fc"].item(),
                                         rel=1e-12)
    # Checked on set (more cases, shared with NSR, in test_layer_regularizer.py): a refused value changes nothing.
    with pytest.raises(ValueError, match=r"'out' is not one of the center-loss layers \['flatten', 'fc'\]"):
        reg.lambdas["out"] = 1.0
    with pytest.raises(ValueError, match="must be a finite number >= 0, got inf"):
        reg.lambdas["fc"] = float("inf")
    with pytest.raises(ValueError, match=r"must be a number \(int or float\), got '0.1' of type str"):
        reg.lambdas["fc"] = "0.1"
    with pytest.raises(ValueError, match="lambdas must name exactly the center-loss layers"):
        reg.lambdas = {"fc": 1.0}
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        reg.lambdas = {"flatten": 1.0, "fc": -1.0}
    assert reg.lambdas == {"flatten": 0.5, "fc": 5.0}


def run(model, reg, batches):
    out = []
    for x, y in batches:
        model(x)
        out.append((reg(y).item(), {n: reg.centers(n).clone() for n in LAMS}))
    return out


def test_state_dict_round_trip_continues_identically():
    batches = make_batches(6)
    model = make_model()
    reg = CenterLoss(model, LAMS, num_classes=C, alpha=0.6)
    run(model, reg, batches[:3])
    saved = copy.deepcopy(reg.state_dict())
    assert set(saved) == {"centers_0", "centers_1"} and saved["centers_1"].shape == (C, 4)
    straight = run(model, reg, batches[3:])

    model2 = make_model()
    fresh = CenterLoss(model2, LAMS, num_classes=C, alpha=0.6)
    fresh.load_state_dict(saved)  # before its first step: the centres are made by the load
    resumed = run(model2, fresh, batches[3:])
    for (lt, ct), (lr, cr) in zip(straight, resumed):
        assert lt == lr
        assert all(torch.equal(ct[n], cr[n]) for n in LAMS)

    # A state saved before the first step resets a used regularizer to "no centres yet".
    empty = CenterLoss(make_model(), LAMS, num_classes=C).state_dict()
    assert empty == {}
    fresh.load_state_dict(empty)
    with pytest.raises(ValueError, match="do not exist yet"):
        fresh.centers("fc")


def test_state_of_another_shape_is_refused_in_one_line():
    model = make_model()
    reg = CenterLoss(model, LAMS, num_classes=C)
    run(model, reg, make_batches(1))
    saved = reg.state_dict()  # centers_0: C x 6 ("flatten"), centers_1: C x 4 ("fc")
    one_line_value_error(lambda: CenterLoss(make_model(), LAMS, num_classes=3).load_state_dict(saved),
                         r"centres 'centers_0' of layer 'flatten' have shape \(5, 6\); this regularizer "
                         r"needs \(3, D\)")
    bad = dict(saved, centers_1=torch.zeros(C))
    one_line_value_error(lambda: CenterLoss(make_model(), LAMS, num_classes=C).load_state_dict(bad),
                         r"'centers_1' of layer 'fc' have shape \(5,\)")
    # Other widths (layers swapped): refused at the load once the centres exist ...
    swapped = {"fc": 1.0, "flatten": 1.0}
    model2 = make_model()
    stepped = CenterLoss(model2, swapped, num_classes=C)
    run(model2, stepped, make_batches(1))
    before = {k: v.clone() for k, v in stepped.state_dict().items()}
    one_line_value_error(lambda: stepped.load_state_dict(saved),
                         r"'centers_0': saved for 6 neurons, but layer 'fc' gives 4")
    assert all(torch.equal(v, stepped.state_dict()[k]) for k, v in before.items())
    # ... and at the first step before (the widths come from that forward pass).
    model3 = make_model()
    fresh = CenterLoss(model3, swapped, num_classes=C)
    fresh.load_state_dict(saved)
    model3(make_batches(1)[0][0])
    one_line_value_error(lambda: fresh(make_batches(1)[0][1]),
                         r"center-loss layer 'fc' gives 4 neurons, but its centres have 6")


def one_line_value_error(fn, match):
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_errors_are_one_clear_value_error():
    model = make_model()
    one_line_value_error(lambda: CenterLoss(model, ["fc9"], num_classes=C),
                         "layer 'fc9' is not a module of the model; closest valid names: fc")
    one_line_value_error(lambda: CenterLoss(model, [], num_classes=C), "at least one layer")
    one_line_value_error(lambda: CenterLoss(model, ["fc"], num_classes=0), "num_classes")
    one_line_value_error(lambda: CenterLoss(model, ["fc"], num_classes=C, alpha=1.5), r"alpha .* \[0, 1\]")
    one_line_value_error(lambda: CenterLoss(model, {"fc": float("nan")}, num_classes=C), "finite number")

    reg = CenterLoss(model, ["fc"], num_classes=C)
    x, y = make_batches(1)[0]
    model(x)
    reg(y)
    before = reg.centers().clone()
    for bad, match in [(torch.full((BATCH,), C), r"lie in \[0, 5\), got values in \[5, 5\]"),
                       (torch.full((BATCH,), -1), r"lie in \[0, 5\)"),
                       (y[:3], r"shape \(8,\) to match the batch"),
                       (y.view(2, 4), r"shape \(8,\)"),
                       (y.double(), "integer tensor of class indices"),
                       ([0] * BATCH, "must be a tensor")]:
        model(x)
        one_line_value_error(lambda bad=bad: reg(bad), match)
        assert torch.equal(reg.centers(), before)  # a refused call changes nothing
    model.eval()
    model(x)  # evaluation does not capture: reg(y) says what to do
    one_line_value_error(lambda: reg(y), r"no captured output for layer\(s\) \['fc'\].*model.train\(\)")
    model.train()
    reg.remove()
    model(x)
    one_line_value_error(lambda: reg(y), "^this center-loss regularizer was removed: its hooks are gone")


def test_float32_under_autocast_and_wrapper_prefixes():
    model = make_model(torch.float32)
    wrapper = nn.Module()
    wrapper.module = model  # what DDP's named_modules() look like: "module.fc"
    reg = CenterLoss(wrapper, {"fc": 1.0, "module.out": 1.0}, num_classes=C)
    x, y = make_batches(1, torch.float32)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        total = reg(y)
    assert out.dtype == torch.bfloat16
    assert total.dtype == torch.float32 and reg.centers("fc").dtype == torch.float32
    assert set(reg.last) == {"fc", "module.out"}


# -- two gloo ranks, each with half of every batch, against the naive loop on whole batches

def ddp_worker(rank, world, port, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = nn.parallel.DistributedDataParallel(make_model())
        reg = CenterLoss(model, LAMS, num_classes=C, alpha=0.4)  # sync on by default
        half = BATCH // world
        centers = []
        for x, y in make_batches(4):
            model(x[rank * half:(rank + 1) * half])
            reg(y[rank * half:(rank + 1) * half])
            centers.append({n: reg.centers(n).tolist() for n in LAMS})
        queue.put((rank, centers))
        del model, reg
    finally:
        gc.collect()  # a DDP wrapper holds the group: free it first (see test_regularizer_ddp.py)
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes
@pytest.mark.timeout(300)
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_update_centres_from_the_whole_batch():
    model = make_model()
    ref = {"flatten": [[0.0] * 6 for _ in range(C)], "fc": [[0.0] * 4 for _ in range(C)]}
    want = []
    for x, y in make_batches(4):
        with torch.no_grad():
            outputs = layer_outputs(model, x)
        for name in LAMS:
            _, ref[name] = naive_center_loss(outputs[name], y.tolist(), ref[name], 0.4)
        want.append(copy.deepcopy(ref))

    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=ddp_worker, args=(rank, 2, port, queue), daemon=True) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=60) for _ in range(2)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert sorted(rank for rank, _ in results) == [0, 1]
    for rank, centers in results:
        for step, (got, expected) in enumerate(zip(centers, want)):
            for name in LAMS:
                assert torch.allclose(torch.tensor(got[name], dtype=torch.float64),
                                      torch.tensor(expected[name], dtype=torch.float64),
                                      rtol=1e-12, atol=1e-12), (rank, step, name)
