"""--resume continues a stopped run to exactly the result of the straight run (after Ctrl-C,
SIGTERM, a SIGKILL inside a checkpoint write, --max-steps, or to more epochs); a resume that could
not be the same run (other settings, another process count, a shorter cosine schedule) is refused
in one line that says why, and changes nothing.

Also about resuming: test_engine.py (--max-steps then --resume, a resume at an epoch's end),
test_run_folder.py (a resume that would shorten a run, settings of execution that may change),
test_faults.py (a resume after a failed write), test_crash_points.py (a resume stopped at each
file operation), test_distributed.py (two ranks). Signals arrive at a chosen step or inside a
chosen checkpoint write (tests/signal_at.py, helpers.step_then_signal), never after a timed wait.
"""

import json
import os
import signal

import pytest
import torch

import nsr.train.engine as engine
from nsr.train.checkpoint import load_checkpoint, load_resumable
from nsr.train.config import parse_args
from nsr.train.engine import train
from nsr.train.errors import UserError
from tests.helpers import (
    DIGITS,
    MLP4,
    REFERENCE_ARGS,
    STEPS_PER_EPOCH,
    assert_error,
    assert_one_error_line,
    copy_of,
    fingerprint,
    outcome,
    run_in_process,
    run_main,
    run_script,
    same_weights,
    step_then_signal,
    strict_json,
)


def resume(out):
    """--resume of the reference's settings in `out`, in-process: the run's final metrics."""
    result = run_in_process("fdnn_nsr.py", *REFERENCE_ARGS, "--out", out, "--resume")
    assert result.code == 0 and result.err == "", result.err
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------- stopped, then resumed

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_while_last_pt_is_written_then_resume_gives_identical_metrics(tmp_path, digits_reference):
    """The worst moment for a kill: epoch 3's last.pt is complete in its temporary file, not yet
    renamed. last.pt must still be epoch 2's, whole; --resume removes the temporary and finishes
    with the metrics of the uninterrupted run."""
    out = str(tmp_path / "run")
    proc = run_script("tests/signal_at.py", "SIGKILL", "last.pt:3", "fdnn_nsr.py", *REFERENCE_ARGS, "--out", out, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = [n for n in os.listdir(out) if n.startswith("last.pt.tmp.")]
    assert len(leftovers) == 1, "the kill landed inside the write (the test would prove nothing otherwise)"
    state = load_checkpoint(os.path.join(out, "last.pt"))  # a kill never leaves a broken last.pt
    assert (state["position"]["epoch"], state["position"]["step"]) == (2, 0)
    assert not json.load(open(os.path.join(out, "metrics.json")))["finished"]
    assert outcome(resume(out)) == outcome(digits_reference[1])
    assert not [n for n in os.listdir(out) if ".tmp." in n], "the stale temporary is removed"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigint_saves_a_mid_epoch_checkpoint_and_resume_gives_identical_metrics(tmp_path, digits_reference):
    """Ctrl-C through the real script in a real process, in the middle of epoch 3: exit code 130,
    one line saying how to continue, no traceback; --resume gives the uninterrupted metrics."""
    out = str(tmp_path / "run")
    at = 2 * STEPS_PER_EPOCH + 17
    proc = run_script("tests/signal_at.py", "SIGINT", f"step:{at}", "fdnn_nsr.py", *REFERENCE_ARGS, "--out", out, check=False)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == (f"interrupted in epoch 3 at step 17; saved {os.path.join(out, 'last.pt')}; "
                                   "continue with --resume")
    state = load_checkpoint(os.path.join(out, "last.pt"))
    assert (state["position"]["epoch"], state["position"]["step"], state["position"]["global_step"]) == (2, 17, at)
    assert state["meter"]["seen"] == 32 * 17, "the epoch's running sums are saved with the position"
    assert outcome(resume(out)) == outcome(digits_reference[1])


def test_sigint_after_the_last_batch_before_validation_then_resume_gives_identical_metrics(
        tmp_path, digits_reference, monkeypatch):
    """SIGINT (through the real handler) right after epoch 3's last batch, before its validation:
    the checkpoint holds a complete epoch that has not been validated yet."""
    at = 3 * STEPS_PER_EPOCH
    monkeypatch.setattr(engine.Trainer, "train_step", step_then_signal(engine.Trainer.train_step, at))
    out = str(tmp_path / "run")
    result = run_in_process("fdnn_nsr.py", *REFERENCE_ARGS, "--out", out)
    assert result.code == 130 and "continue with --resume" in result.err, result.err
    position = load_checkpoint(os.path.join(out, "last.pt"))["position"]
    assert (position["epoch"], position["step"]) == (2, STEPS_PER_EPOCH)
    monkeypatch.undo()
    assert outcome(resume(out)) == outcome(digits_reference[1])


@pytest.mark.parametrize("where", ["middle", "last-step"])
def test_sigterm_saves_the_position_and_resume_is_a_straight_run(tmp_path, capsys, monkeypatch, where):
    straight = train(parse_args([*DIGITS, "--epochs", "3", "--out", str(tmp_path / "a")], default_config=MLP4))
    capsys.readouterr()
    at = STEPS_PER_EPOCH + 10 if where == "middle" else 2 * STEPS_PER_EPOCH
    calls, plain_step = [0], engine.Trainer.train_step

    def step_then_sigterm(self, xb, yb):
        plain_step(self, xb, yb)
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(engine.Trainer, "train_step", step_then_sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    out = str(tmp_path / "b")
    code, err = run_main(capsys, [*DIGITS, "--epochs", "3", "--out", out])
    assert signal.getsignal(signal.SIGTERM) is handler, "the handler is put back"
    assert code == 130
    step = at - STEPS_PER_EPOCH
    assert err.strip() == f"stopped by SIGTERM in epoch 2 at step {step}; saved {out}/last.pt; continue with --resume"
    position = load_checkpoint(os.path.join(out, "last.pt"))["position"]
    assert (position["epoch"], position["step"]) == (1, step)
    m = strict_json(os.path.join(out, "metrics.json"))
    assert (m["finished"], m["stopped_by"]) == (False, "SIGTERM")
    monkeypatch.setattr(engine.Trainer, "train_step", plain_step)
    resumed = train(parse_args([*DIGITS, "--epochs", "3", "--out", out, "--resume"], default_config=MLP4))
    assert outcome(resumed) == outcome(straight)
    assert same_weights(str(tmp_path / "a" / "last.pt"), os.path.join(out, "last.pt"))


def test_a_second_signal_does_not_cut_the_save_short(tmp_path, capsys, monkeypatch):
    """Ctrl-C, then SIGTERM while the checkpoint is being written (a scheduler's signal after the
    user's): the save completes; the second signal raises nothing there."""
    calls, plain_step, plain_save = [0], engine.Trainer.train_step, engine.Trainer.save

    def step_then_sigint(self, xb, yb):
        plain_step(self, xb, yb)
        calls[0] += 1
        if calls[0] == 20:
            os.kill(os.getpid(), signal.SIGINT)

    def sigterm_then_save(self, name):
        os.kill(os.getpid(), signal.SIGTERM)
        plain_save(self, name)

    monkeypatch.setattr(engine.Trainer, "train_step", step_then_sigint)
    monkeypatch.setattr(engine.Trainer, "save", sigterm_then_save)
    out = str(tmp_path / "run")
    code, err = run_main(capsys, [*DIGITS, "--epochs", "2", "--out", out])
    assert code == 130
    assert err.strip() == f"interrupted in epoch 1 at step 20; saved {out}/last.pt; continue with --resume"
    assert load_checkpoint(os.path.join(out, "last.pt"))["position"]["step"] == 20


@pytest.mark.parametrize("steps", [50, STEPS_PER_EPOCH], ids=["inside-an-epoch", "at-an-epoch-end"])
def test_a_max_steps_stop_is_not_finished_and_a_plain_rerun_points_to_resume(tmp_path, capsys, steps):
    out = str(tmp_path / "run")
    first = train(parse_args([*DIGITS, "--epochs", "3", "--max-steps", str(steps), "--out", out], default_config=MLP4))
    assert (first["finished"], first["stopped_by"], first["global_steps"]) == (False, "max_steps", steps)
    assert (first["partial_epoch"] is None) == (steps == STEPS_PER_EPOCH)
    capsys.readouterr()
    before = fingerprint(out)
    code, err = run_main(capsys, [*DIGITS, "--epochs", "3", "--out", out])
    assert code == 2
    line = assert_one_error_line(err, f"{out} holds a run stopped by --max-steps after {steps} steps; continue it with "
                          "--resume (and a larger --max-steps, or none)")
    assert "--overwrite" not in line
    assert fingerprint(out) == before
    # the same stop resumed: nothing to train, the same report, from the checkpoint
    again = train(parse_args([*DIGITS, "--epochs", "3", "--max-steps", str(steps), "--out", out, "--resume"],
                             default_config=MLP4))
    assert outcome(again) == outcome(first) and again["partial_epoch"] == first["partial_epoch"]
    assert fingerprint(out)["last.pt"] == before["last.pt"], "nothing trained, nothing saved again"
    assert "continue with --resume" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- more epochs

SCHEDULES = {"none": [], "multistep": ["--scheduler", "multistep", "--milestones", "1", "3", "--gamma", "0.5"],
             "cosine": ["--scheduler", "cosine"]}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_resume_to_more_epochs_is_a_straight_run_or_refused_with_the_reason(tmp_path, capsys, schedule):
    """Train 2 epochs, resume to 4 = train 4, bit for bit, for every schedule the scripts offer;
    cosine's rates follow the run's length, so there the longer resume is refused, saying why."""
    args = [*DIGITS, *SCHEDULES[schedule]]
    straight = train(parse_args([*args, "--epochs", "4", "--out", str(tmp_path / "a")], default_config=MLP4))
    train(parse_args([*args, "--epochs", "2", "--out", str(tmp_path / "b")], default_config=MLP4))
    before = fingerprint(tmp_path / "b")
    code, err = run_main(capsys, [*args, "--epochs", "4", "--out", str(tmp_path / "b"), "--resume"])
    if schedule == "cosine":
        assert code == 2
        assert_one_error_line(err, f"cannot resume {tmp_path / 'b' / 'last.pt'} with --epochs 4: its cosine schedule "
                       "follows the run's length, and the saved run (--epochs 2) trained epoch 2 at lr 0.025 where "
                       "a 4-epoch run uses 0.0426777; resume with --epochs 2, or train 4 epochs from the start")
        assert fingerprint(tmp_path / "b") == before
        return
    assert code == 0, err
    resumed = strict_json(tmp_path / "b" / "metrics.json")
    assert outcome(resumed) == outcome(straight)
    assert [r["lr"] for r in resumed["history"]] == ([0.05] * 4 if schedule == "none" else
                                                     [0.05, 0.025, 0.025, 0.0125])
    assert same_weights(str(tmp_path / "a" / "last.pt"), str(tmp_path / "b" / "last.pt"))
    sa, sb = (load_checkpoint(str(tmp_path / d / "last.pt")) for d in "ab")
    assert sa["scheduler"] == sb["scheduler"] and sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]


def test_cosine_stopped_inside_its_first_epoch_may_grow(tmp_path):
    """Until its first scheduler step a cosine run has used lr 0.05 only, as any length would: a
    resume to more epochs is then exactly the longer straight run."""
    args = [*DIGITS, "--scheduler", "cosine"]
    straight = train(parse_args([*args, "--epochs", "3", "--out", str(tmp_path / "a")], default_config=MLP4))
    train(parse_args([*args, "--epochs", "2", "--max-steps", "20", "--out", str(tmp_path / "b")],
                     default_config=MLP4))
    resumed = train(parse_args([*args, "--epochs", "3", "--out", str(tmp_path / "b"), "--resume"],
                               default_config=MLP4))
    assert outcome(resumed) == outcome(straight)
    assert same_weights(str(tmp_path / "a" / "last.pt"), str(tmp_path / "b" / "last.pt"))


# ---------------------------------------------------------------------------------- refused

def test_resume_with_other_settings_is_refused_naming_the_key(digits_reference):
    out = digits_reference[0]
    before = fingerprint(out)
    assert_error(run_in_process("fdnn_nsr.py", *REFERENCE_ARGS, "--out", out, "--resume", "--lr", "0.1"),
                 "cannot resume", "settings differ", "lr: 0.05 -> 0.1")
    assert fingerprint(out) == before


def test_resume_with_another_process_count_is_refused(mid_epoch, tmp_path, capsys):
    out = copy_of(mid_epoch, tmp_path)
    last = os.path.join(out, "last.pt")
    state = torch.load(last, weights_only=True)
    assert state["world_size"] == 1
    config = state["config"]
    with pytest.raises(UserError, match="it was trained by 1 process and this run has 2 processes"):
        load_resumable(last, config, world=2)
    state["world_size"] = 2
    torch.save(state, last)
    before = fingerprint(out)
    code, err = run_main(capsys, [*DIGITS, "--epochs", "3", "--out", out, "--resume"])
    assert code == 2
    assert_one_error_line(err, "it was trained by 2 processes (torchrun) and this run has 1 process")
    assert fingerprint(out) == before


# ---------------------------------------------------------------------------------- finished or absent

def test_resuming_a_finished_run_reports_its_checkpoint_not_an_edited_metrics_json(tmp_path, capsys):
    out = tmp_path / "run"
    original = train(parse_args([*DIGITS, "--epochs", "2", "--out", str(out)], default_config=MLP4))
    edited = {**original, "test_acc": 99.9, "test_error": 0.1, "best_val_acc": 100.0, "finished": True}
    (out / "metrics.json").write_text(json.dumps(edited))
    capsys.readouterr()
    resumed = train(parse_args([*DIGITS, "--epochs", "2", "--out", str(out), "--resume"], default_config=MLP4))
    assert resumed == original and strict_json(out / "metrics.json") == json.loads(json.dumps(original))
    assert f"test error {original['test_error']:.2f}%" in capsys.readouterr().out
    (out / "metrics.json").write_bytes(b"\x00\xff garbage")
    assert train(parse_args([*DIGITS, "--epochs", "2", "--out", str(out), "--resume"], default_config=MLP4)) == original


def test_resume_without_a_checkpoint_says_so_even_when_quiet_and_stale_temporaries_go(tmp_path):
    out = tmp_path / "new"
    out.mkdir()
    dead = 2 ** 22 + 11  # above Linux's largest pid: no such process
    for name in (f"last.pt.tmp.{dead}", f"best.pt.tmp.{dead}"):
        (out / name).write_bytes(b"half a checkpoint")
    result = run_in_process("fdnn_nsr.py", *DIGITS, "--max-steps", "2", "--out", str(out), "--resume")
    assert result.code == 0, result.err
    assert result.err.strip() == f"warning: --resume: no checkpoint in {out}; starting a new run there"
    assert sorted(os.listdir(out)) == ["config.yaml", "history.csv", "last.pt", "metrics.json", "tb"]


def test_resume_without_a_checkpoint_and_a_bad_setting_is_one_error_line(tmp_path):
    assert_error(run_in_process("fdnn_nsr.py", *DIGITS, "--out", str(tmp_path / "new"), "--resume",
                                "--regularized-layers", "outt"), "NSR layer 'outt'")
    assert not (tmp_path / "new").exists()
