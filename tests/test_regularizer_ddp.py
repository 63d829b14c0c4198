"""Two gloo processes, each with half of every batch, against one process fed whole batches.

With the batch statistics all-reduced before they enter memory, both ranks must hold the class
means of the whole batch, and the mean of the two ranks' losses must equal the one-process loss
(equal halves, so the per-rank means average to the global mean).
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nsr import NeuronSteadiness
from nsr.layer_outputs import distributed
from tests.helpers import free_port

C, K, STEPS, BATCH = 4, 2, 4, 12
LAMS = {"out": 0.5, "hidden": 2.0}


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("hidden", nn.Linear(5, 6))
    model.add_module("act", nn.ReLU())
    model.add_module("out", nn.Linear(6, C))
    return model.double()


def make_batches():
    g = torch.Generator().manual_seed(1)
    batches = []
    for step in range(STEPS):
        x = torch.randn(BATCH, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, C, (BATCH,), generator=g)
        if step == 1:
            y[: BATCH // 2] = 0  # rank 0's half has one class only; rank 1 may miss class 0
        batches.append((x, y))
    return batches


def run_steps(model, reg, batches, part):
    """Per step: (total term, per-layer losses, class means of every layer)."""
    out = []
    for x, y in batches:
        x, y = x[part], y[part]
        model(x)
        total = reg(y)
        out.append((total.detach().clone(), {k: v.clone() for k, v in reg.last.items()},
                    {name: reg.class_means(name).clone() for name in LAMS}))
    return out


def parts(rank, world, empty_step):
    """Each step's share of the batch for `rank`: halves, except that at `empty_step` rank 0 takes
    the whole batch and rank 1 none."""
    half = BATCH // world
    return [(slice(None) if rank == 0 else slice(0, 0)) if step == empty_step else
            slice(rank * half, (rank + 1) * half) for step in range(STEPS)]


def run_parts(model, reg, batches, shares):
    out = []
    for (x, y), part in zip(batches, shares):
        out += run_steps(model, reg, [(x, y)], part)
    return out


def worker(rank, world, port, queue, empty_step=None):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = nn.parallel.DistributedDataParallel(make_model())
        # Names without the "module." prefix work on the wrapped model; sync defaults to on.
        reg = NeuronSteadiness(model, LAMS, num_classes=C, queue_batches=K)
        results = run_parts(model, reg, make_batches(), parts(rank, world, empty_step))
        totals = torch.stack([r[0] for r in results])
        if empty_step is None:
            dist.all_reduce(totals)  # sum over ranks; the test divides by world
            totals /= world
        # else each rank's own totals: the empty one's is 0 at that step
        # Plain lists: tensors would travel as shared-memory handles that die with this process.
        queue.put((rank, totals.tolist(), [{name: m.tolist() for name, m in r[2].items()} for r in results]))
        del model, reg
    finally:
        gc.collect()  # see below: free the DDP wrapper first
        dist.destroy_process_group()


# A DDP wrapper holds its process group. Destroyed while still held, the group is torn down at
# interpreter exit instead, where gloo's threads can abort the process ("terminate called without
# an active exception", exit code -6) in about 1 run of 25; so the workers free DDP first.


def _spawn_ranks(world: int, *args) -> list:
    """`worker` as `world` spawned gloo ranks (daemons: a hang fails on the timeout); what they put on
    the queue, in arrival order."""
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=worker, args=(rank, world, port, queue, *args), daemon=True) for rank in range(world)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=60) for _ in range(world)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return results


@pytest.mark.slow  # two spawned processes
@pytest.mark.timeout(300)
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_match_one_process_on_the_whole_batch():
    model = make_model()
    reg = NeuronSteadiness(model, LAMS, num_classes=C, queue_batches=K)
    assert reg.sync is None and not distributed()
    expected = run_steps(model, reg, make_batches(), slice(None))

    results = _spawn_ranks(2)

    want_totals = torch.stack([e[0] for e in expected])
    assert sorted(r[0] for r in results) == [0, 1]
    for rank, totals, means in results:
        totals = torch.tensor(totals, dtype=torch.float64)
        assert torch.allclose(totals, want_totals, rtol=1e-10, atol=1e-12), (rank, totals, want_totals)
        assert len(means) == STEPS
        for step, (got_means, (_, _, want_means)) in enumerate(zip(means, expected)):
            for name in LAMS:
                got = torch.tensor(got_means[name], dtype=torch.float64)
                assert torch.allclose(got, want_means[name], rtol=1e-10, atol=1e-12), (rank, step, name)


@pytest.mark.slow  # two spawned processes
@pytest.mark.timeout(300)
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_rank_with_an_empty_batch_joins_the_all_reduce_and_adds_zero():
    """Rank 1 gets no sample at step 2 and rank 0 the whole batch: both still hold the whole
    batch's class means at every step (no deadlock, no slot skipped on one rank only), rank 1's
    term is 0 there, and rank 0's is the one-process term."""
    model = make_model()
    reg = NeuronSteadiness(model, LAMS, num_classes=C, queue_batches=K)
    expected = run_steps(model, reg, make_batches(), slice(None))
    results = {r[0]: r[1:] for r in _spawn_ranks(2, 2)}  # rank 1's batch is empty at step 2
    assert results[1][0][2] == 0.0
    assert results[0][0][2] == pytest.approx(expected[2][0].item(), rel=1e-10)
    for rank, (_, means) in results.items():
        for step, want in enumerate(expected):
            for name in LAMS:
                got = torch.tensor(means[step][name], dtype=torch.float64)
                assert torch.allclose(got, want[2][name], rtol=1e-10, atol=1e-12), (rank, step, name)
