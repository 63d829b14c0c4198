"""torchrun-style training with two CPU processes (gloo): ranks stay identical, and a stopped run
resumes like a straight one.

One pair of processes (one mp.spawn, two imports of torch) runs every job of the module in turn,
sharing its process group as the engine allows (setup_runtime joins an initialised group), with a
barrier between jobs where torchrun would start new processes: the straight run, then for each way to stop (epoch end, Ctrl-C on both ranks, Ctrl-C on rank 1
alone) the stopped run and its --resume. Each test reads what its jobs left behind."""

import gc
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nsr.train.engine as engine
from nsr.train.config import parse_args
from nsr.train.errors import RunInterrupted
from tests.helpers import ROOT, free_port, step_then_signal, without_times

# 40 fake CIFAR images: 8 held out for validation, 16 per rank, 2 steps of 8 per epoch and rank
ARGS = ["--config", os.path.join(ROOT, "configs", "resnet18_cifar10.yaml"), "--dataset", "fake",
        "--fake-size", "40", "--batch-size", "8", "--eval-batch-size", "16", "--epochs", "2",
        "--device", "cpu", "--quiet", "--queue-batches", "2"]
STOPS = {  # how the first half of a resumed run ends: (extra args, interrupt after global step, on ranks)
    "epoch": (["--epochs", "1"], None, ()),
    "ctrl-c": ([], 3, (0, 1)),  # after global step 3: in the middle of epoch 2
    # rank 1 alone: without agreement it would leave the loop while rank 0 waits in the next
    # gradient all-reduce (the run would hang, then fail on the timeout)
    "ctrl-c-rank-1-only": ([], 3, (1,)),
}
# (name, output folder, args, interrupt after global step, on ranks), run in this order
JOBS = [("straight", "straight", ARGS, None, ())]
for _stop, (_extra, _at, _ranks) in STOPS.items():
    JOBS += [(f"{_stop}-stopped", _stop, [*ARGS, *_extra], _at, _ranks),
             (f"{_stop}-resumed", _stop, [*ARGS, "--resume"], None, ())]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")]


def _job(rank: int, folder: str, name: str, out: str, args: list[str], interrupt_at, interrupt_ranks) -> None:
    """One engine.train of the pair into folder/out; what this rank holds at the end goes to
    folder/name-dump."""
    out, dump = os.path.join(folder, out), os.path.join(folder, f"{name}-dump")
    os.makedirs(dump, exist_ok=True)

    class Recorder(engine.RunHooks):  # what the NNI trial link would report, per rank
        def record(self, *values):
            with open(os.path.join(dump, f"rank{rank}.nni"), "a") as f:
                f.write(f"{values}\n")

        def epoch_end(self, row):
            self.record("intermediate", row["val_acc"])

        def run_end(self, metrics):
            self.record("final", metrics["best_val_acc"], metrics["test_acc"])

    fit, step = engine.Trainer.fit, engine.Trainer.train_step

    def fit_and_dump(self, stop):
        metrics = fit(self, stop)
        torch.save({"model": self.model.state_dict(), "nsr": self.reg.state_dict(),
                    "samples": self.data.train.num_samples}, os.path.join(dump, f"rank{rank}.pt"))
        return metrics

    engine.Trainer.fit = fit_and_dump
    if interrupt_at is not None and rank in interrupt_ranks:  # Ctrl-C reaching these ranks only
        engine.Trainer.train_step = step_then_signal(step, interrupt_at)
    try:
        engine.train(parse_args([*args, "--out", out]), Recorder())
    except RunInterrupted as e:
        with open(os.path.join(dump, f"rank{rank}.interrupted"), "w") as f:
            f.write(str(e))
    finally:
        engine.Trainer.fit, engine.Trainer.train_step = fit, step
        gc.collect()  # free this run's DDP wrapper before the next one
        # as between two torchrun jobs: no rank looks at the folder before rank 0 has written it
        dist.barrier()


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        for job in JOBS:
            _job(rank, folder, *job)
    finally:
        gc.collect()  # a DDP wrapper holds the group: free it first (as engine.main does)
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (per-rank weights, metrics.json) of a finished job, or the ranks' RunInterrupted messages."""
    folder = tmp_path_factory.mktemp("ddp")
    # daemon: should a job hang, the test fails on its timeout and the ranks end with pytest
    mp.spawn(_worker, args=(free_port(), str(folder)), nprocs=2, join=True, daemon=True)
    result = {}
    for name, out, _, interrupt_at, _ in JOBS:
        dump = folder / f"{name}-dump"
        if interrupt_at is not None:
            result[name] = [(dump / f"rank{r}.interrupted").read_text() for r in (0, 1)]
            continue
        ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        result[name] = ranks, json.loads((folder / out / "metrics.json").read_text()), dump
    return result


@pytest.mark.timeout(420)  # the first test pays for the module's one mp.spawn
def test_two_ranks_end_with_identical_weights_and_nsr_memory(runs):
    (r0, r1), m, dump = runs["straight"]
    for key in r0["model"]:
        assert torch.equal(r0["model"][key], r1["model"][key]), key
    assert r0["nsr"] and all(torch.equal(r0["nsr"][k], r1["nsr"][k]) for k in r0["nsr"])
    assert r0["samples"] == r1["samples"] == (40 - 8) // 2  # each rank trains on half of 40 - 8 held out
    assert m["world_size"] == 2 and m["global_steps"] == 4 and m["finished"]
    # only rank 0 reports to NNI: each epoch and the final result
    assert (dump / "rank0.nni").read_text().splitlines() == [
        *(f"('intermediate', {row['val_acc']})" for row in m["history"]),
        f"('final', {m['best_val_acc']}, {m['test_acc']})"]
    assert not (dump / "rank1.nni").exists()


@pytest.mark.timeout(420)
@pytest.mark.parametrize("stop", list(STOPS))
def test_two_ranks_resume_like_a_straight_run(runs, stop):
    (reference, _), m_straight, _ = runs["straight"]
    if stop != "epoch":
        messages = runs[f"{stop}-stopped"]
        assert messages[0].startswith("interrupted in epoch 2 at step 1; saved ")
        assert messages[1] == "rank 1: interrupted in epoch 2 at step 1"
    resumed, m_resumed, _ = runs[f"{stop}-resumed"]
    for key in reference["model"]:
        assert torch.equal(resumed[0]["model"][key], reference["model"][key]), key
        assert torch.equal(resumed[1]["model"][key], reference["model"][key]), key
    for key in reference["nsr"]:
        assert torch.equal(resumed[1]["nsr"][key], reference["nsr"][key]), key
    assert len(m_resumed["history"]) == 2 and m_resumed["finished"]
    assert without_times(m_resumed["history"]) == without_times(m_straight["history"])
