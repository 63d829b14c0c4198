"""Checkpoints: what last.pt holds, that it is written whole or not at all, and that --resume
checks every part of it before anything is used. A file that is not a checkpoint of this project,
or one whose contents are damaged or crafted, is one line naming what is wrong; nothing is loaded
and nothing in the folder is written.

A kill inside a checkpoint write: test_resume.py (then --resume) and test_crash_points.py (at
every file operation); a checkpoint from another process count: test_resume.py.
"""

import os
import random
import zipfile

import pytest
import torch

import nsr.train.checkpoint as checkpoint
from nsr.train.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from nsr.train.config import parse_args
from nsr.train.engine import train
from nsr.train.fileio import WriteError
from tests.helpers import (
    DIGITS,
    DIGITS_BASE,
    DIGITS_EPOCHS,
    MLP4,
    REFERENCE_ARGS,
    assert_error,
    assert_one_error_line,
    copy_of,
    fingerprint,
    nan_first,
    run_in_process,
    run_main,
)


# ---------------------------------------------------------------------------------- contents and writes

def test_checkpoint_holds_everything_a_resume_needs(digits_reference):
    out, metrics, _ = digits_reference
    state = load_checkpoint(os.path.join(out, "last.pt"))
    assert state["format"] == FORMAT
    assert {"model", "optimizer", "scheduler", "regularizer", "rng", "config", "position", "meter"} <= set(state)
    assert state["model"] and state["optimizer"]["param_groups"] and "last_epoch" in state["scheduler"]
    assert all(s["momentum_buffer"].abs().sum() > 0 for s in state["optimizer"]["state"].values())
    assert any(torch.is_tensor(v) and v.abs().sum() > 0 for v in state["regularizer"].values()), "NSR memory"
    assert {"torch", "numpy", "python"} <= set(state["rng"])
    assert state["position"]["epoch"] == DIGITS_EPOCHS and state["position"]["step"] == 0
    assert state["position"]["history"] == metrics["history"]
    assert state["config"]["lr"] == 0.05 and state["config"]["dataset"] == "digits"


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    good = open(path, "rb").read()

    def dies_halfway(obj, f):  # save_checkpoint hands torch.save an open file
        f.write(good[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", dies_halfway)
    with pytest.raises(WriteError, match="No space left on device"):
        save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    assert open(path, "rb").read() == good and os.listdir(tmp_path) == ["last.pt"]
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


# ---------------------------------------------------------------------------------- not a checkpoint

NOT_CHECKPOINTS = {
    "text": b"hello, this is a text file\n",
    "random-bytes": random.Random(0).randbytes(4096),
    "empty": b"",
    "json": b'{"model": {}, "epoch": 3}',
    "zip-of-something-else": None,  # made below
    "pickle-of-a-list": b"\x80\x04\x95\x09\x00\x00\x00\x00\x00\x00\x00]\x94(K\x01K\x02e.",
    "truncated-checkpoint": None,   # half of a real one
}


@pytest.mark.parametrize("kind", list(NOT_CHECKPOINTS))
def test_a_file_that_is_not_a_checkpoint_is_one_line(mid_epoch, tmp_path, capsys, kind):
    out = copy_of(mid_epoch, tmp_path)
    last = os.path.join(out, "last.pt")
    if kind == "zip-of-something-else":
        with zipfile.ZipFile(last, "w") as z:
            z.writestr("readme.txt", "not a model")
    elif kind == "truncated-checkpoint":
        with open(last, "r+b") as f:
            f.truncate(os.path.getsize(last) // 2)
    else:
        with open(last, "wb") as f:
            f.write(NOT_CHECKPOINTS[kind])
    before, files_before = fingerprint(out), fingerprint(out)
    code, err = run_main(capsys, [*DIGITS, "--epochs", "3", "--out", out, "--resume"])
    assert code == 2
    assert_one_error_line(err, f"checkpoint {last} is truncated or not a PyTorch checkpoint (",
                   "); delete it or restore it from a backup")
    assert fingerprint(out) == before
    assert fingerprint(out) == files_before, "tb/'s event files too"


def test_a_checkpoint_without_the_projects_marker_is_refused(tmp_path, digits_reference):
    out = copy_of(digits_reference, tmp_path)
    last = os.path.join(out, "last.pt")
    torch.save({"model": {}, "epoch": 3}, last)  # a plain torch.save'd dict
    before = fingerprint(out)
    assert_error(run_in_process("fdnn_nsr.py", *REFERENCE_ARGS, "--out", out, "--resume"),
                 f"last.pt is not a checkpoint written by this project (no '{FORMAT}' marker)")
    assert fingerprint(out) == before


# ---------------------------------------------------------------------------------- damaged or crafted

def _set(path, value):
    """A mutation that sets state[path...] = value (value may be a function of the old value)."""
    def apply(state):
        *keys, last = path
        for k in keys:
            state = state[k]
        state[last] = value(state[last]) if callable(value) else value
    return apply



CRAFTED = {  # name: (mutation, the fragment of the one error line)
    "model-dtype": (_set(["model", "fc1.weight"], lambda t: t.double()), "dtype mismatch for fc1.weight"),
    "model-nan": (_set(["model", "fc1.weight"], nan_first), "model: fc1.weight holds NaN or infinite values"),
    "model-extra-tensor": (_set(["model", "extra.weight"], torch.zeros(1)), "model has 'extra.weight'"),
    "optimizer-buffer-shape": (_set(["optimizer", "state", 0, "momentum_buffer"], torch.zeros(3)),
                               "size mismatch for momentum_buffer of parameter 0"),
    "optimizer-buffer-nan": (_set(["optimizer", "state", 1, "momentum_buffer"], nan_first),
                             "momentum_buffer of parameter 1 holds NaN"),
    "optimizer-index": (_set(["optimizer", "state", 99], {"momentum_buffer": torch.zeros(1)}),
                        "optimizer state for parameter 99, of 6"),
    "optimizer-hyperparameter": (_set(["optimizer", "param_groups", 0, "momentum"], 0.5),
                                 "optimizer momentum is 0.5, this run's is 0.9"),
    "optimizer-lr": (_set(["optimizer", "param_groups", 0, "lr"], 10.0),
                     "its learning rate in epoch 2 is 10.0, this run's schedule gives 0.05"),
    "scheduler-epoch": (_set(["scheduler", "last_epoch"], 5), "scheduler last_epoch 5 is not the position's epoch 1"),
    "rng-torch": (_set(["rng", "torch"], lambda t: t[:100]), "rng: size mismatch for torch state"),
    "rng-numpy-pos": (_set(["rng", "numpy", "pos"], 9999), "rng numpy pos, has_gauss or cached_gaussian out of range"),
    "rng-python-index": (_set(["rng", "python", 0], lambda s: [*s[:-1], 9999]), "rng python state out of range"),
    "position-step": (_set(["position", "step"], 999), "position epoch 1, step 999 lies outside this run's epochs of 36"),
    "position-negative-epoch": (_set(["position", "epoch"], -1), "position epoch -1, step 14 lies outside"),
    "position-global-step": (_set(["position", "global_step"], 51), "global_step 51 is not 1 epochs of 36 steps plus 14"),
    "position-history": (_set(["position", "history"], []), "history has 0 rows for 1 finished epochs"),
    "position-best-epoch": (_set(["position", "best_epoch"], 2), "best_epoch 2 (val"),
    "position-test-acc": (_set(["position", "test_acc"], 150.0), "position test_acc 150.0 is not a percentage"),
    "history-value": (_set(["position", "history", 0, "val_acc"], -3.0), "val_acc -3.0 is not a finite number >= 0"),
    "meter-seen": (_set(["meter", "seen"], 5), "meter seen 5 is not the 448 samples of 14 steps"),
    "meter-correct": (_set(["meter", "correct"], torch.tensor(10_000)), "meter correct must be a count in 0..448"),
    "meter-losses": (_set(["meter", "losses"], lambda t: t * float("nan")), "meter losses must be 3 finite sums"),
    "missing-part": (lambda s: s.pop("meter"), "it lacks the part 'meter'"),
    "nsr-memory-missing": (_set(["regularizer"], {}), "regularizer holds no state after 50 steps"),
    "nsr-memory-shape": (lambda s: s["regularizer"].update({k: torch.zeros(2, 2) for k in list(s["regularizer"])[:1]}), ""),
    # The NSR memory (mlp4.yaml: layer out, K = 5, 10 classes, 50 steps, so the pointer is back at 0):
    # the library's own load checks, surfaced as the one line.
    "nsr-counts-int32": (_set(["regularizer", "memories.0.counts"], lambda t: t.int()),
                         "NSR memory 'memories.0.' of layer 'out': saved sums and counts are torch.float32 and "
                         "torch.int32; the memory holds floating-point tensors"),
    "nsr-sums-bool": (_set(["regularizer", "memories.0.sums"], lambda t: t != 0), "saved sums and counts are torch.bool and"),
    "nsr-sums-nan": (_set(["regularizer", "memories.0.sums"], nan_first), "'out': its saved sums hold NaN or infinite values"),
    "nsr-sums-inf": (_set(["regularizer", "memories.0.sums"], lambda t: t / 0), "its saved sums hold NaN or infinite values"),
    "nsr-counts-negative": (_set(["regularizer", "memories.0.counts"], lambda t: -t),
                            "'out': its saved counts must be whole numbers >= 0"),
    "nsr-counts-fractional": (_set(["regularizer", "memories.0.counts"], lambda t: t + 0.5),
                              "its saved counts must be whole numbers >= 0"),
    "nsr-counts-zeroed": (_set(["regularizer", "memories.0.counts"], torch.zeros(5, 10, 1)),
                          "'out': its saved sums are not 0 where nothing was counted"),
    "nsr-sums-and-counts-missing": (lambda s: [s["regularizer"].pop(f"memories.0.{k}") for k in ("sums", "counts")],
                                    "regularizer holds no state after 50 steps (a layer's memory is missing)"),
    "nsr-sums-missing-pointer-moved": (lambda s: [s["regularizer"].pop(f"memories.0.{k}") for k in ("sums", "counts")]
                                       + [s["regularizer"].update({"memories.0._extra_state": torch.tensor(3)})],
                                       "its saved pointer is 3 but it has no sums and counts"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_checkpoint_contents_are_checked_before_anything_is_used(mid_epoch, tmp_path, capsys, case):
    """A checkpoint with the right marker but one part damaged or crafted: one line naming it,
    nothing loaded, nothing written."""
    out = copy_of(mid_epoch, tmp_path)
    last = os.path.join(out, "last.pt")
    state = torch.load(last, weights_only=True)
    mutate, fragment = CRAFTED[case]
    mutate(state)
    torch.save(state, last)
    before = fingerprint(out)
    code, err = run_main(capsys, [*DIGITS, "--epochs", "3", "--out", out, "--resume"])
    assert code == 2
    assert_one_error_line(err, f"checkpoint {last} does not fit this run (", fragment)
    assert fingerprint(out) == before


ADAM = [*DIGITS_BASE, "--optimizer", "adam", "--lr", "0.001"]


@pytest.mark.parametrize("case, mutate, fragment", [
    ("step-negative", _set(["optimizer", "state", 0, "step"], torch.tensor(-5.0)),
     "optimizer step of parameter 0 is -5.0, not a count of 0..40 steps"),
    ("step-beyond-the-steps-taken", _set(["optimizer", "state", 0, "step"], torch.tensor(41.0)),
     "optimizer step of parameter 0 is 41.0, not a count of 0..40 steps"),
    ("square-average-negative", _set(["optimizer", "state", 2, "exp_avg_sq"], lambda t: -t - 1),
     "optimizer exp_avg_sq of parameter 2 holds negative values"),
    ("betas", _set(["optimizer", "param_groups", 0, "betas"], (0.5, 0.5)),
     "optimizer betas is (0.5, 0.5), this run's is (0.9, 0.999)"),
], ids=lambda v: v if isinstance(v, str) and " " not in v else "")
def test_adam_counters_and_hyperparameters_are_checked(tmp_path, capsys, case, mutate, fragment):
    """Adam's per-parameter step counter (a negative one makes a complex step size, a raw
    traceback at the first step) and its squared averages."""
    out = str(tmp_path / "run")
    train(parse_args([*ADAM, "--max-steps", "40", "--out", out], default_config=MLP4))
    last = os.path.join(out, "last.pt")
    state = torch.load(last, weights_only=True)
    mutate(state)
    torch.save(state, last)
    capsys.readouterr()
    code, err = run_main(capsys, [*ADAM, "--max-steps", "60", "--out", out, "--resume"])
    assert code == 2
    assert_one_error_line(err, f"checkpoint {last} does not fit this run (", fragment)
