"""torchrun-style training with two CPU processes (gloo): ranks stay identical."""

import gc
import json
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

from nsr.train.errors import RunInterrupted
from tests.conftest import ROOT

ARGS = ["--config", os.path.join(ROOT, "configs", "resnet18_cifar10.yaml"), "--dataset", "fake",
        "--fake-size", "64", "--batch-size", "8", "--eval-batch-size", "16", "--epochs", "1",
        "--max-steps", "3", "--device", "cpu", "--quiet", "--queue-batches", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str, dump: str, args: list[str] = ARGS,
            interrupt_at: int | None = None, interrupt_ranks: tuple[int, ...] = (0, 1)) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    import nsr.train.engine as engine
    from nsr.train.config import parse_args

    fit = engine.Trainer.fit

    def fit_and_dump(self, stop):
        metrics = fit(self, stop)
        torch.save({"model": self.model.state_dict(), "nsr": self.reg.state_dict(),
                    "samples": self.data.train.num_samples}, os.path.join(dump, f"rank{rank}.pt"))
        return metrics

    engine.Trainer.fit = fit_and_dump

    class Recorder(engine.RunHooks):  # what the NNI trial link would report, per rank
        def record(self, *values):
            with open(os.path.join(dump, f"rank{rank}.nni"), "a") as f:
                f.write(f"{values}\n")

        def epoch_end(self, row):
            self.record("intermediate", row["val_acc"])

        def run_end(self, metrics):
            self.record("final", metrics["best_val_acc"], metrics["test_acc"])

    if interrupt_at is not None and rank in interrupt_ranks:  # Ctrl-C reaching these ranks only
        step = engine.Trainer.train_step

        def step_and_interrupt(self, xb, yb):
            step(self, xb, yb)
            if self.pos.global_step + 1 == interrupt_at:  # (the position advances after the step)
                os.kill(os.getpid(), signal.SIGINT)

        engine.Trainer.train_step = step_and_interrupt
    try:
        engine.train(parse_args([*args, "--out", out]), Recorder())
    except RunInterrupted as e:
        with open(os.path.join(dump, f"rank{rank}.interrupted"), "w") as f:
            f.write(str(e))
    finally:
        gc.collect()  # the trainer's DDP wrapper holds the group: free it first (as engine.main does)
        dist.destroy_process_group()


def test_two_ranks_end_with_identical_weights_and_nsr_memory(tmp_path):
    out, dump = str(tmp_path / "run"), str(tmp_path)
    mp.spawn(_worker, args=(free_port(), out, dump), nprocs=2, join=True)
    r0 = torch.load(os.path.join(dump, "rank0.pt"), weights_only=True)
    r1 = torch.load(os.path.join(dump, "rank1.pt"), weights_only=True)
    for key in r0["model"]:
        assert torch.equal(r0["model"][key], r1["model"][key]), key
    assert r0["nsr"] and all(torch.equal(r0["nsr"][k], r1["nsr"][k]) for k in r0["nsr"])
    # each rank trains on half of the 64 - 13 (20 % validation) fake images
    assert r0["samples"] == r1["samples"] == (64 - 13) // 2
    m = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert m["world_size"] == 2 and m["global_steps"] == 3 and m["finished"]
    # only rank 0 reports to NNI: epoch 1 (its 3 steps) and the final result
    assert open(os.path.join(dump, "rank0.nni")).read().splitlines() == [
        f"('intermediate', {m['history'][0]['val_acc']})", f"('final', {m['best_val_acc']}, {m['test_acc']})"]
    assert not os.path.exists(os.path.join(dump, "rank1.nni"))


def _run(tmp_path, name, args, interrupt_at=None, interrupt_ranks=(0, 1)):
    out, dump = str(tmp_path / name), str(tmp_path / f"{name}-dump")
    os.makedirs(dump, exist_ok=True)
    mp.spawn(_worker, args=(free_port(), out, dump, args, interrupt_at, interrupt_ranks), nprocs=2, join=True)
    if interrupt_at is not None:
        return [open(os.path.join(dump, f"rank{r}.interrupted")).read() for r in (0, 1)]
    ranks = [torch.load(os.path.join(dump, f"rank{r}.pt"), weights_only=True) for r in (0, 1)]
    return ranks, json.loads(open(os.path.join(out, "metrics.json")).read())


@pytest.mark.parametrize("stop", ["epoch", "ctrl-c", "ctrl-c-rank-1-only"])
def test_two_ranks_resume_like_a_straight_run(tmp_path, stop):
    two_epochs = [a for a in ARGS if a not in ("--max-steps", "3")] + ["--epochs", "2", "--fake-size", "40"]
    straight, m_straight = _run(tmp_path, "straight", two_epochs)
    if stop == "epoch":
        _run(tmp_path, "resumed", [*two_epochs, "--epochs", "1"])
    else:  # in the middle of epoch 2 (2 steps per epoch per rank)
        # rank 1 alone: without agreement it would leave the loop while rank 0 waits in the
        # next gradient all-reduce (the test would hang, then fail on mp.spawn's timeout)
        ranks = (1,) if stop == "ctrl-c-rank-1-only" else (0, 1)
        messages = _run(tmp_path, "resumed", two_epochs, interrupt_at=3, interrupt_ranks=ranks)
        assert messages[0].startswith("interrupted in epoch 2 at step 1; saved ")
        assert messages[1] == "rank 1: interrupted in epoch 2 at step 1"
    resumed, m_resumed = _run(tmp_path, "resumed", [*two_epochs, "--resume"])
    for key in straight[0]["model"]:
        assert torch.equal(resumed[0]["model"][key], straight[0]["model"][key]), key
        assert torch.equal(resumed[1]["model"][key], straight[0]["model"][key]), key
    for key in straight[0]["nsr"]:
        assert torch.equal(resumed[1]["nsr"][key], straight[0]["nsr"][key]), key
    drop = lambda h: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in h]  # noqa: E731
    assert len(m_resumed["history"]) == 2 and m_resumed["finished"]
    assert drop(m_resumed["history"]) == drop(m_straight["history"])
