"""TensorBoard event files of a run (nsr/train/tblog.py), read back with TensorBoard's own reader:
the tags and steps of a digits run and their values against history.csv, a run stopped by
--max-steps, Ctrl-C or a kill and then resumed (the same curves as a straight run: no step twice,
none missing), --overwrite, the switch, a missing package, and torchrun (only rank 0 writes)."""

import csv
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import nsr.train.engine as engine
from nsr.search.trial import NNITrial
from nsr.train.config import parse_args
from nsr.train.data import load_data
from tests.helpers import (DIGITS, DIGITS_EPOCHS, ROOT, STEPS_PER_EPOCH, fingerprint, numpy_intra, read_scalars,
                           run_in_process, run_script, step_then_signal)

REF = [*DIGITS, "--epochs", str(DIGITS_EPOCHS)]  # the reference run's settings (conftest.digits_reference)
EPOCH_TAGS = {"epoch", "loss/train", "loss/ce", "loss/reg", "accuracy/train", "accuracy/val",
              "accuracy/test_at_best_val", "lr", "time/epoch_s", "steadiness/out", "steadiness/fc1",
              "steadiness/fc2"}
STEP_TAGS = {"step/loss", "step/ce_loss", "step/reg_out"}
EPOCH_ENDS = [STEPS_PER_EPOCH * e for e in range(1, DIGITS_EPOCHS + 1)]  # 36, 72, 108, 144
LOGGED_STEPS = [50, 100]  # every 50 steps (tblog.STEP_EVERY) of 144


def event_files(out) -> list[str]:
    return sorted(glob.glob(os.path.join(str(out), "tb", "events.out.tfevents.*")))


def curves(out) -> dict:
    """The scalars a resumed run must reproduce exactly: every tag but the timing."""
    return {tag: points for tag, points in read_scalars(os.path.join(str(out), "tb")).items() if tag != "time/epoch_s"}


def test_a_digits_run_logs_every_tag_at_its_steps_with_the_history_values(digits_reference):
    out, metrics, _ = digits_reference
    assert len(event_files(out)) == 1
    scalars = read_scalars(os.path.join(out, "tb"))
    assert set(scalars) == EPOCH_TAGS | STEP_TAGS
    for tag in EPOCH_TAGS:
        assert [s for s, _ in scalars[tag]] == EPOCH_ENDS, tag
    for tag in STEP_TAGS:
        assert [s for s, _ in scalars[tag]] == LOGGED_STEPS, tag
    with open(os.path.join(out, "history.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    for tag, column in (("loss/train", "train_loss"), ("loss/ce", "ce_loss"), ("loss/reg", "reg_loss"),
                        ("accuracy/train", "train_acc"), ("accuracy/val", "val_acc"), ("lr", "lr"),
                        ("epoch", "epoch"), ("steadiness/out", "intra_var_out"),
                        ("steadiness/fc2", "intra_var_fc2")):
        assert [v for _, v in scalars[tag]] == pytest.approx([float(r[column]) for r in rows], rel=1e-6), tag
    # test accuracy of the best validation so far: the run's reported figure at its end
    assert scalars["accuracy/test_at_best_val"][-1][1] == pytest.approx(metrics["test_acc"], rel=1e-6)
    # each logged step: loss = cross entropy + the λ-weighted NSR term of the one layer
    for (_, loss), (_, ce), (_, term) in zip(scalars["step/loss"], scalars["step/ce_loss"], scalars["step/reg_out"]):
        assert loss == pytest.approx(ce + term, rel=1e-5) and term > 0


def test_max_steps_then_resume_draws_the_curves_of_a_straight_run(tmp_path, digits_reference):
    out = str(tmp_path / "run")
    assert run_in_process("fdnn_nsr.py", *REF, "--out", out, "--max-steps", "50").code == 0
    stopped = read_scalars(os.path.join(out, "tb"))  # readable as the stop left it
    assert [s for s, _ in stopped["accuracy/val"]] == [36] and [s for s, _ in stopped["step/loss"]] == [50]
    assert run_in_process("fdnn_nsr.py", *REF, "--out", out, "--resume").code == 0
    assert len(event_files(out)) == 2
    assert curves(out) == curves(digits_reference[0])


def test_ctrl_c_then_resume_draws_the_curves_of_a_straight_run(tmp_path, digits_reference, monkeypatch):
    out = str(tmp_path / "run")
    monkeypatch.setattr(engine.Trainer, "train_step", step_then_signal(engine.Trainer.train_step, 90))
    assert run_in_process("fdnn_nsr.py", *REF, "--out", out).code == 130
    monkeypatch.undo()
    stopped = read_scalars(os.path.join(out, "tb"))
    assert [s for s, _ in stopped["accuracy/val"]] == [36, 72] and [s for s, _ in stopped["step/loss"]] == [50]
    assert run_in_process("fdnn_nsr.py", *REF, "--out", out, "--resume").code == 0
    assert curves(out) == curves(digits_reference[0])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_after_logging_an_epoch_but_before_its_checkpoint_resume_logs_no_step_twice(
        tmp_path, digits_reference):
    """SIGKILL while epoch 3's last.pt is written: epoch 3's events are on disk (flushed before the
    checkpoint) but last.pt is epoch 2's, so the resumed run logs steps 73..108 again. TensorBoard
    must show each step once, as the straight run does."""
    out = str(tmp_path / "run")
    proc = run_script("tests/signal_at.py", "SIGKILL", "last.pt:3", "fdnn_nsr.py", *REF, "--out", out, check=False)
    assert proc.returncode < 0, proc.stderr
    killed = read_scalars(os.path.join(out, "tb"))
    assert [s for s, _ in killed["accuracy/val"]] == [36, 72, 108], "epoch 3 was logged before the kill"
    assert run_in_process("fdnn_nsr.py", *REF, "--out", out, "--resume").code == 0
    assert curves(out) == curves(digits_reference[0])


def test_overwrite_keeps_the_old_curves_until_the_new_run_has_a_checkpoint(tmp_path, digits_reference,
                                                                           monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(digits_reference[0], out)
    before = fingerprint(out / "tb")
    monkeypatch.setattr(engine.Trainer, "train_step", step_then_signal(engine.Trainer.train_step, 5))
    result = run_in_process("fdnn_nsr.py", *REF, "--out", str(out), "--overwrite")
    assert result.code == 130 and "kept as it was" in result.err, result.err
    monkeypatch.undo()
    assert fingerprint(out / "tb") == before  # the replaced run's curves, untouched and alone
    assert run_in_process("fdnn_nsr.py", *DIGITS, "--epochs", "1", "--out", str(out), "--overwrite").code == 0
    assert len(event_files(out)) == 1
    assert [s for s, _ in read_scalars(out / "tb")["accuracy/val"]] == [STEPS_PER_EPOCH]


def test_no_tensorboard_writes_none(tmp_path):
    out = tmp_path / "run"
    assert run_in_process("fdnn_nsr.py", *DIGITS, "--epochs", "1", "--out", str(out), "--no-tensorboard").code == 0
    assert not (out / "tb").exists() and (out / "metrics.json").exists()
    (tmp_path / "c.yaml").write_text("tensorboard: false\n")
    assert parse_args(["--config", str(tmp_path / "c.yaml")]).tensorboard is False
    assert parse_args([]).tensorboard is True


def test_without_the_package_one_note_and_the_run_trains(tmp_path, monkeypatch):
    # as if not installed: `import` of any of them raises ImportError, imported before or not
    for name in [*sys.modules, "tensorboard", "torch.utils.tensorboard"]:
        if name.split(".")[0] == "tensorboard" or name.startswith("torch.utils.tensorboard"):
            monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "run"
    result = run_in_process("fdnn_nsr.py", *DIGITS, "--epochs", "1", "--out", str(out))
    assert result.code == 0
    assert result.err.splitlines() == ["note: tensorboard is not installed, so this run writes no TensorBoard "
                                       "events; pip install tensorboard, or pass --no-tensorboard"]
    assert not (out / "tb").exists() and json.loads((out / "metrics.json").read_text())["finished"]


def test_a_path_in_the_way_is_one_error_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "tb").write_text("a file where the event folder goes")
    result = run_in_process("fdnn_nsr.py", *DIGITS, "--epochs", "1", "--out", str(out))
    assert result.code == 2 and "Traceback" not in result.err
    assert result.err == (f"error: {out / 'tb'} is not a folder (a file, a link, ...), where a run keeps its "
                          "TensorBoard events; move it away, or choose another --out\n")
    assert (out / "tb").read_text() == "a file where the event folder goes" and os.listdir(out) == ["tb"]


def test_nni_trial_writes_where_the_web_ui_looks(tmp_path, monkeypatch):
    """NNI 3.0's web UI reads <experiment>/trials/<id>/output/tensorboard; a local trial's
    NNI_OUTPUT_DIR is <experiment>/environments/local-env/trials/<id>."""
    trial_dir = tmp_path / "exp" / "environments" / "local-env" / "trials" / "Ab1cD"
    trial_dir.mkdir(parents=True)
    monkeypatch.setenv("NNI_PLATFORM", "local")
    monkeypatch.setenv("NNI_TRIAL_JOB_ID", "Ab1cD")
    monkeypatch.setenv("NNI_OUTPUT_DIR", str(trial_dir))
    tb = NNITrial().tensorboard_dir(str(trial_dir / "run"))
    assert tb == str(trial_dir / "tensorboard")
    os.makedirs(tb)
    link = tmp_path / "exp" / "trials" / "Ab1cD" / "output" / "tensorboard"
    assert link.resolve() == (trial_dir / "tensorboard").resolve()
    monkeypatch.setenv("NNI_PLATFORM", "remote")  # the files stay on the remote machine: no link
    monkeypatch.setenv("NNI_TRIAL_JOB_ID", "Xy9zW")
    other = tmp_path / "exp" / "environments" / "remote-env" / "trials" / "Xy9zW"
    monkeypatch.setenv("NNI_OUTPUT_DIR", str(other))
    assert NNITrial().tensorboard_dir("run") == str(other / "tensorboard")
    assert not (tmp_path / "exp" / "trials" / "Xy9zW").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_two_gloo_ranks_one_writer_and_the_figure_of_all_ranks(tmp_path):
    """Only rank 0 writes events; the steadiness figure merges both ranks' halves of the validation
    set: it equals numpy's over the whole split, from the saved weights."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "fdnn_nsr.py"), *DIGITS, "--epochs", "2", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert len(event_files(out)) == 1
    scalars = read_scalars(out / "tb")
    per_epoch = metrics["global_steps"] // 2
    assert [s for s, _ in scalars["accuracy/val"]] == [per_epoch, 2 * per_epoch]
    weights = {k: v.double().numpy() for k, v in torch.load(out / "last.pt", weights_only=True)["model"].items()}
    data = load_data(parse_args([*DIGITS, "--out", str(out)]), torch.device("cpu"))
    x = np.concatenate([xb.reshape(len(xb), -1).double().numpy() for xb, _ in data.val.iterate(0)])
    y = np.concatenate([yb.numpy() for _, yb in data.val.iterate(0)])
    fc1 = x @ weights["fc1.weight"].T + weights["fc1.bias"]
    expected = numpy_intra(fc1, y)
    assert metrics["history"][-1]["intra_var_fc1"] == pytest.approx(expected, rel=1e-6)
    assert scalars["steadiness/fc1"][-1][1] == pytest.approx(expected, rel=1e-6)
    # rank 0 validates every second sample: its half alone would give another figure
    assert numpy_intra(fc1[::2], y[::2]) != pytest.approx(expected, rel=1e-4)
