"""Faults never cost finished work: a write that fails (a full disk, permissions, I/O) is one line
saying which file failed and that the last checkpoint is intact, and --resume then ends in the
straight run; a loss that turns NaN or infinite stops the run naming the epoch, the step and the
checkpoint it kept.

A full disk at every write of a run: test_crash_points.py; at the first last.pt:
test_run_folder.py; an --overwrite that diverges: test_overwrite.py.
"""

import errno
import json
import os

import pytest
import torch

from nsr.train import checkpoint, engine
from nsr.train.checkpoint import load_checkpoint
from nsr.train.config import parse_args
from nsr.train.engine import train
from tests.helpers import (
    DIGITS,
    MLP4,
    assert_error,
    assert_one_error_line,
    outcome,
    run_in_process,
    run_main,
    same_weights,
)


# ---------------------------------------------------------------------------------- failed writes

def _enospc_from_torch_save(obj, f):
    f.write(b"the first bytes")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _runtime_error_from_enospc(obj, f):
    f.write(b"the first bytes")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") \
        from OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _runtime_error_alone(obj, f):
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


WRITE_FAILURES = {  # name: (the file that fails at the end of epoch 2, how, the cause in the message, kept)
    "disk-full-in-torch-save": ("last.pt", _enospc_from_torch_save, "No space left on device", 1),
    "torch-runtime-error-from-a-full-disk": ("last.pt", _runtime_error_from_enospc, "No space left on device", 1),
    "torch-runtime-error-without-cause": ("last.pt", _runtime_error_alone,
                                          ("the write failed ([enforce fail at inline_container.cc:672] . "
                                           "unexpected pos 704 vs 598)"), 1),
    "permission-denied-on-rename": ("metrics.json", PermissionError(errno.EACCES, "Permission denied"),
                                    "Permission denied", 2),
    "io-error-on-fsync": ("history.csv", OSError(errno.EIO, "Input/output error"), "Input/output error", 2),
}


@pytest.mark.parametrize("case", list(WRITE_FAILURES))
def test_a_failed_write_is_one_line_and_the_run_resumes_from_the_intact_checkpoint(tmp_path, capsys, monkeypatch,
                                                                                   case):
    straight = train(parse_args([*DIGITS, "--epochs", "3", "--out", str(tmp_path / "a")], default_config=MLP4))
    capsys.readouterr()
    name, failure, cause, kept_epoch = WRITE_FAILURES[case]
    out = str(tmp_path / "b")
    target = os.path.join(out, name)
    real_save, real_replace, real_fsync = torch.save, os.replace, os.fsync
    trainer_epoch = {}
    plain_end_epoch = engine.Trainer.end_epoch

    def end_epoch(self):
        trainer_epoch["now"] = self.pos.epoch + 1
        return plain_end_epoch(self)

    def failing_now(path) -> bool:
        return trainer_epoch.get("now") == 2 and os.fspath(path).startswith(target + ".tmp.")

    def save(obj, f):
        return failure(obj, f) if failing_now(f.name) else real_save(obj, f)

    def replace(src, dst):
        if failing_now(src):
            raise failure
        return real_replace(src, dst)

    def fsync(fd):
        if failing_now(os.readlink(f"/proc/self/fd/{fd}")):
            raise failure
        return real_fsync(fd)

    monkeypatch.setattr(engine.Trainer, "end_epoch", end_epoch)
    if callable(failure):
        monkeypatch.setattr(checkpoint.torch, "save", save)
    elif name == "metrics.json":
        monkeypatch.setattr(os, "replace", replace)
    else:
        monkeypatch.setattr(os, "fsync", fsync)
    code, err = run_main(capsys, [*DIGITS, "--epochs", "3", "--out", out])
    monkeypatch.undo()
    assert code == 2
    assert_one_error_line(err, f"error: cannot write {target}: {cause}; the {name} there before is unchanged; ",
                   f"; {out}/last.pt (end of epoch {kept_epoch}) is intact: continue with --resume once it can write")
    assert not [n for n in os.listdir(out) if ".tmp." in n], "no temporary is left"
    assert load_checkpoint(os.path.join(out, "last.pt"))["position"]["epoch"] == kept_epoch
    resumed = train(parse_args([*DIGITS, "--epochs", "3", "--out", out, "--resume"], default_config=MLP4))
    assert outcome(resumed) == outcome(straight)
    assert same_weights(str(tmp_path / "a" / "last.pt"), os.path.join(out, "last.pt"))


# ---------------------------------------------------------------------------------- non-finite loss

def test_nonfinite_loss_stops_naming_epoch_step_and_the_kept_checkpoint(tmp_path):
    # lr x 1e8 after the first epoch: epoch 1 finishes, epoch 2 diverges within a few steps.
    out = str(tmp_path / "run")
    line = assert_error(run_in_process("fdnn_nsr.py", *DIGITS, "--epochs", "3", "--out", out, "--scheduler",
                                       "multistep", "--milestones", "1", "--gamma", "1e8"),
                        "loss became NaN or infinite in epoch 2, step ",
                        f"last good checkpoint {os.path.join(out, 'last.pt')} (end of epoch 1) is kept")
    assert "--overwrite" in line
    state = load_checkpoint(os.path.join(out, "last.pt"))
    assert (state["position"]["epoch"], state["position"]["step"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert not metrics["finished"] and len(metrics["history"]) == 1
