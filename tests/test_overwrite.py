"""--overwrite keeps the finished run in --out until the new run has written its first checkpoint:
a new run that cannot start, diverges, raises, is interrupted or is killed before then leaves the
finished run byte for byte (after a kill, the next start puts it back); once the new run has a
checkpoint, it replaces the old one.

The folder's states in between: test_run_folder.py (a kill while setting aside or restoring) and
test_crash_points.py (a kill or a full disk at every file operation of an overwrite).
"""

import json
import os
import signal

import pytest

import nsr.train.engine as engine
from nsr.train.checkpoint import load_checkpoint
from nsr.train.outdir import LOCK_NAME
from tests.helpers import (
    DIGITS,
    REFERENCE_ARGS,
    assert_error,
    copy_of,
    fingerprint,
    run_in_process,
    run_script,
    step_then_signal,
)


def test_overwrite_that_cannot_start_keeps_the_finished_run(digits_reference):
    out = digits_reference[0]
    before = fingerprint(out)
    assert_error(run_in_process("fdnn_nsr.py", *REFERENCE_ARGS, "--out", out, "--overwrite", "--regularized-layers", "outt"),
                 "NSR layer 'outt'")
    assert fingerprint(out) == before


def test_overwrite_that_diverges_before_its_first_checkpoint_keeps_the_finished_run(digits_reference, tmp_path):
    out = copy_of(digits_reference, tmp_path)
    before = fingerprint(out)
    assert_error(run_in_process("fdnn_nsr.py", *REFERENCE_ARGS, "--out", out, "--overwrite", "--lambda", "1e30"),
                 "loss became NaN or infinite in epoch 1", "no checkpoint of this run",
                 f"the previous run in {out} is kept as it was")
    assert fingerprint(out) == before, "best.pt, last.pt, metrics.json, history.csv, config.yaml untouched"


def test_overwrite_that_raises_before_its_first_checkpoint_keeps_the_finished_run(digits_reference, tmp_path,
                                                                                   monkeypatch):
    out = copy_of(digits_reference, tmp_path)
    before = fingerprint(out)
    step = engine.Trainer.train_step

    def fails_at_step_3(self, xb, yb):
        if self.pos.step == 2:
            # tb/: the new run's; the old one is set aside with the other files
            assert set(os.listdir(out)) == {"config.yaml", f".previous-{os.getpid()}", LOCK_NAME, "tb"}, \
                "the old run is set aside"
            raise RuntimeError("a bug in the training step")
        step(self, xb, yb)

    monkeypatch.setattr(engine.Trainer, "train_step", fails_at_step_3)
    with pytest.raises(RuntimeError, match="a bug in the training step"):
        run_in_process("fdnn_nsr.py", *REFERENCE_ARGS, "--out", out, "--overwrite")
    assert fingerprint(out) == before


def test_ctrl_c_before_the_first_checkpoint_of_an_overwrite_keeps_the_finished_run(digits_reference, tmp_path,
                                                                                    monkeypatch):
    out = copy_of(digits_reference, tmp_path)
    before = fingerprint(out)
    monkeypatch.setattr(engine.Trainer, "train_step", step_then_signal(engine.Trainer.train_step, 3))
    result = run_in_process("fdnn_nsr.py", *REFERENCE_ARGS, "--out", out, "--overwrite")
    assert result.code == 130, result.err
    assert result.err.strip() == (f"interrupted in epoch 1 at step 3, before the first checkpoint; the previous "
                                  f"run in {out} is kept as it was")
    assert fingerprint(out) == before


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_during_an_overwrite_then_the_next_start_restores_the_finished_run(digits_reference, tmp_path):
    out = copy_of(digits_reference, tmp_path)
    before = fingerprint(out)
    proc = run_script("tests/signal_at.py", "SIGKILL", "step:3", "fdnn_nsr.py", *REFERENCE_ARGS, "--out", out, "--overwrite",
                      check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    aside = [n for n in os.listdir(out) if n.startswith(".previous-")]
    assert len(aside) == 1 and not os.path.exists(os.path.join(out, "last.pt")), "the old run survives the kill"
    result = run_in_process("fdnn_nsr.py", *REFERENCE_ARGS, "--out", out)
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"warning: restored the run in {out}"), result.err
    assert lines[1] == f"error: {out} already holds a finished run; pass --overwrite to replace it, " \
                       "or choose another --out"
    assert fingerprint(out) == before


def test_overwrite_replaces_the_old_run_once_the_new_one_has_a_checkpoint(digits_reference, tmp_path):
    out = copy_of(digits_reference, tmp_path)
    result = run_in_process("fdnn_nsr.py", *DIGITS, "--epochs", "1", "--lr", "0.02", "--out", out, "--overwrite")
    assert result.code == 0, result.err
    assert sorted(os.listdir(out)) == ["best.pt", "config.yaml", "history.csv", "last.pt", "metrics.json", "tb"]
    assert len(json.load(open(os.path.join(out, "metrics.json")))["history"]) == 1
    assert load_checkpoint(os.path.join(out, "last.pt"))["config"]["lr"] == 0.02
