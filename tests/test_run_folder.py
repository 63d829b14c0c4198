"""The run folder's states and what its files say, through the real entry points: a folder left by
a kill or a failed write is repaired or refused by name, never mistaken for another state; a
resumed run never says less than it trained; tools read a run's settings from its checkpoint;
results without their checkpoint are never overwritten in silence; metrics.json is strict JSON.
(Every file operation in turn is tested by test_crash_points.py; the folder's lock by
test_folder_lock.py; --overwrite by test_overwrite.py.)

Fast: MLP-4 on scikit-learn's digits, 1-3 epochs of 36 steps.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import warnings

import pytest
import torch
import yaml

from nsr.experiments import report, reproduce
from nsr.search import launcher
from nsr.train import checkpoint
from nsr.train.config import parse_args
from nsr.train.engine import train
from nsr.train.errors import UserError
from nsr.train.fileio import write_json
from nsr.train.outdir import RUN_FILES
from tests.helpers import (
    DIGITS,
    MLP4,
    ROOT,
    assert_error,
    assert_one_error_line,
    copy_of,
    fingerprint,
    outcome,
    run_in_process,
    run_main,
    strict_json,
)

SCRIPT = "fdnn_nsr.py"


def finished(tmp_path, name="run", *extra) -> str:
    out = str(tmp_path / name)
    result = run_in_process(SCRIPT, *DIGITS, "--epochs", "2", "--out", out, *extra)
    assert result.code == 0, result.err
    return out


def metrics(out) -> dict:
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------- states a kill leaves

@pytest.mark.parametrize("moved", [1, 3, 4], ids=["config-moved", "last-pt-still-there", "only-best-pt-left"])
def test_an_overwrite_killed_while_setting_aside_gives_every_file_back(tmp_path, moved):
    """Killed with some of the old run's files moved into .setting-aside-<pid> (last.pt among those
    not yet moved): the next start moves them back, and refuses as it would have before."""
    out = finished(tmp_path)
    before = fingerprint(out)
    aside = os.path.join(out, ".setting-aside-4242")
    os.mkdir(aside)
    for name in RUN_FILES[:moved]:  # config.yaml, metrics.json, history.csv, last.pt, best.pt
        os.rename(os.path.join(out, name), os.path.join(aside, name))
    result = run_in_process(SCRIPT, *DIGITS, "--epochs", "2", "--out", out)
    assert result.code == 2
    warning, error = result.err.strip().splitlines()
    assert warning.startswith(f"warning: restored the run in {out} that a new run (pid 4242) had set aside")
    assert error == f"error: {out} already holds a finished run; pass --overwrite to replace it, or choose another --out"
    assert fingerprint(out) == before


def test_a_new_run_killed_before_its_first_checkpoint_does_not_block_the_next(tmp_path):
    """What it wrote (config.yaml, best.pt) is deleted by the next start, which then runs."""
    out = tmp_path / "run"
    (out / ".previous-4242").mkdir(parents=True)  # a new run sets aside nothing
    (out / "config.yaml").write_text("lr: 0.5\n")
    (out / "best.pt").write_bytes(b"its first best.pt")
    reference = finished(tmp_path, "reference")
    result = run_in_process(SCRIPT, *DIGITS, "--epochs", "2", "--out", str(out))
    assert result.code == 0, result.err
    assert result.err.strip() == f"warning: deleted config.yaml, best.pt in {out}: a run (pid 4242) wrote them " \
                                 "and stopped before its first checkpoint"
    assert sorted(os.listdir(out)) == sorted([*RUN_FILES, "tb"])
    assert outcome(metrics(out)) == outcome(metrics(reference))


def test_a_kill_while_a_run_is_restored_leaves_nothing_to_lose(tmp_path):
    """.restoring-<pid>: the new run's files were deleted, some old ones are back already."""
    out = finished(tmp_path)
    before = fingerprint(out)
    restoring = os.path.join(out, ".restoring-4242")
    os.mkdir(restoring)
    for name in ("last.pt", "best.pt"):
        os.rename(os.path.join(out, name), os.path.join(restoring, name))
    result = run_in_process(SCRIPT, *DIGITS, "--epochs", "2", "--out", out)
    assert result.code == 2
    warning, error = result.err.strip().splitlines()
    assert warning.startswith("warning: restored the run in ") and "(last.pt, best.pt)" in warning
    assert_one_error_line(error + "\n", "already holds a finished run")
    assert fingerprint(out) == before


# ---------------------------------------------------------------------------------- a full disk

@pytest.mark.parametrize("resume", [False, True], ids=["run-again", "resume"])
def test_a_full_disk_at_the_first_last_pt_leaves_nothing_and_starting_again_works(tmp_path, monkeypatch, resume):
    """best.pt and config.yaml are written, last.pt fails: the line says no checkpoint was written
    and to start again; the folder the run made is gone; starting again (or --resume) trains."""
    out = str(tmp_path / "run")
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if os.path.basename(getattr(f, "name", "")).startswith("last.pt.tmp."):
            f.write(b"part of it")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    result = run_in_process(SCRIPT, *DIGITS, "--epochs", "2", "--out", out)
    monkeypatch.undo()
    assert_error(result, f"cannot write {out}/last.pt: No space left on device; ",
                 f"no checkpoint of this run was written, and {out} is as the run found it: run the same "
                 "command again once it can write")
    assert not os.path.exists(out)
    again = run_in_process(SCRIPT, *DIGITS, "--epochs", "2", "--out", out, *(["--resume"] if resume else []))
    assert again.code == 0, again.err
    assert outcome(metrics(out)) == outcome(metrics(finished(tmp_path, "reference")))


# ---------------------------------------------------------------------------------- what the files say

@pytest.mark.parametrize("argv, fragment", [
    (["--epochs", "1"], "with --epochs 1: it has trained 2 epochs; resume with --epochs 2 or more"),
    (["--epochs", "2", "--max-steps", "40"], "with --max-steps 40: it has taken 72 steps; resume with --max-steps 72"),
], ids=["fewer-epochs", "fewer-steps"])
def test_a_resume_that_would_shorten_a_finished_run_is_refused_and_rewrites_nothing(tmp_path, argv, fragment):
    out = finished(tmp_path)
    before = fingerprint(out)
    result = run_in_process(SCRIPT, *DIGITS, *argv, "--out", out, "--resume")
    assert_error(result, f"cannot resume {out}/last.pt ", fragment)
    assert fingerprint(out) == before
    assert yaml.safe_load(open(os.path.join(out, "config.yaml")))["epochs"] == 2


def test_a_run_stopped_inside_an_epoch_cannot_be_resumed_as_a_shorter_one(tmp_path):
    """50 steps = epoch 1 and 14 steps of epoch 2: a 1-epoch resume would report weights of more."""
    out = str(tmp_path / "run")
    assert run_in_process(SCRIPT, *DIGITS, "--epochs", "3", "--max-steps", "50", "--out", out).code == 0
    before = fingerprint(out)
    result = run_in_process(SCRIPT, *DIGITS, "--epochs", "1", "--out", out, "--resume")
    assert_error(result, "it has trained 1 epochs and 14 steps of epoch 2; resume with --epochs 2 or more")
    assert fingerprint(out) == before


def test_reproduce_reads_a_runs_settings_from_its_checkpoint_not_config_yaml(tmp_path, capsys):
    """A 2-epoch run whose config.yaml says epochs: 1 (what resuming with --epochs 1 once wrote)
    is not a finished 1-epoch run to `reproduce --epochs 1`: the settings differ, nothing starts."""
    out = tmp_path / "table"
    args = ["--models", "mlp4", "--seeds", "1", "--dataset", "digits", "--out", str(out)]
    runs = reproduce.plan(reproduce.parse_args([*args, "--epochs", "2"]))
    for run in runs:  # train them as python -m nsr reproduce would, in this process
        assert run_in_process(os.path.relpath(run.command[1], ROOT), *run.command[2:]).code == 0
    folder = report.run_dir(out, "mlp4", "nsr", 0)
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    (folder / "config.yaml").write_text(yaml.safe_dump({**saved, "epochs": 1}))
    assert [r.state for r in reproduce.plan(reproduce.parse_args([*args, "--epochs", "2"]))] == ["finished"] * 2
    before = fingerprint(out)
    result = run_in_process("-m nsr reproduce", *args, "--epochs", "1")
    assert_error(result, f"{report.run_dir(out, 'mlp4', 'vanilla', 0)} holds a run with other settings "
                 "(epochs: 2 -> 1) (and 1 more); nothing was started")
    assert fingerprint(out) == before


def test_results_without_their_checkpoint_are_not_overwritten_in_silence(mid_epoch, tmp_path, capsys):
    out = copy_of(mid_epoch, tmp_path)
    os.remove(os.path.join(out, "last.pt"))
    before = fingerprint(out)
    code, err = run_main(capsys, [*DIGITS, "--epochs", "3", "--out", out])
    assert code == 2
    assert_one_error_line(err, f"{out} holds files of an earlier run (metrics.json, history.csv, best.pt) but no last.pt "
                   "to continue from; pass --overwrite to start again")
    assert fingerprint(out) == before


def test_a_run_file_that_is_a_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "last.pt").mkdir(parents=True)
    code, err = run_main(capsys, [*DIGITS, "--max-steps", "2", "--out", str(out), "--resume"])
    assert code == 2
    assert_one_error_line(err, f"{out / 'last.pt'} is not a regular file (a folder, a link, a pipe, ...); move it away")


def test_metrics_json_is_strict_json_and_readers_take_its_nulls(tmp_path, capsys):
    out = tmp_path / "run"
    train(parse_args([*DIGITS, "--max-steps", "3", "--out", str(out)], default_config=MLP4))
    text = (out / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    m = strict_json(out / "metrics.json")
    assert (m["test_acc"], m["test_error"], m["test_top5_error"], m["best_epoch"]) == (None, None, None, -1)
    assert report.test_error(m, out) is None
    assert "no epoch finished" in capsys.readouterr().out
    write_json(tmp_path / "x.json", {"a": [float("nan"), {"b": float("-inf")}], "c": (1.5, float("inf"))})
    assert strict_json(tmp_path / "x.json") == {"a": [None, {"b": None}], "c": [1.5, None]}


# ---------------------------------------------------------------------------------- also seen

@pytest.mark.parametrize("flag, meant", [("--learning-rate", "--lr"), ("--wd", "--weight-decay"),
                                         ("--queue", "--queue-batches"), ("--epoch", "--epochs")])
def test_an_unknown_flag_names_the_one_meant(tmp_path, flag, meant):
    result = run_in_process(SCRIPT, *DIGITS, flag, "3", "--out", str(tmp_path / "out"))
    assert_error(result, f"unknown option {flag}; did you mean {meant}?")


def test_an_unknown_yaml_key_names_the_one_meant(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 0.1\n")
    result = run_in_process(SCRIPT, *DIGITS, "--config", str(config), "--out", str(tmp_path / "out"))
    assert_error(result, "unknown key 'learning_rate'; did you mean 'lr'?")


def test_a_config_that_is_a_folder_says_so(tmp_path):
    result = run_in_process(SCRIPT, *DIGITS, "--config", str(tmp_path), "--out", str(tmp_path / "out"))
    assert_error(result, f"config file {str(tmp_path)!r} is a folder; pass a YAML file to --config")


def test_yaml_merge_keys_merge_and_a_key_given_twice_is_still_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("<<: {lr: 0.1, epochs: 5}\nepochs: 1\nbatch_size: 32\n")
    out = tmp_path / "out"
    result = run_in_process(SCRIPT, "--config", str(config), "--dataset", "digits", "--quiet", "--out", str(out))
    assert result.code == 0, result.err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["lr"], saved["epochs"], saved["batch_size"]) == (0.1, 1, 32)
    config.write_text("<<: {lr: 0.1}\nepochs: 1\nepochs: 2\n")
    assert_error(run_in_process(SCRIPT, "--config", str(config), "--out", str(tmp_path / "o2")),
                 "key 'epochs' is given twice (first at line 2)")


def test_search_trial_args_are_checked_before_anything_starts(tmp_path):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        for args, fragment in ((["--epoch", "1"], "unknown option --epoch; did you mean --epochs?"),
                               (["--gamma", "0.5"], "--gamma has no effect here")):
            with pytest.raises(UserError) as caught:
                launcher.main([os.path.join(ROOT, "configs", "nni", "mlp4.yml"), "--port", "0", "--trial-args",
                               " ".join(args), "--out", str(tmp_path / "out"),
                               "--experiment-dir", str(tmp_path / "nni")])
            assert str(caught.value).startswith(f"--trial-args {' '.join(args)!r}: ") and fragment in str(caught.value)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert not (tmp_path / "nni").exists() and not (tmp_path / "out").exists()


def _report_folder(tmp_path, errors: dict) -> str:
    out = tmp_path / "table"
    for (variant, seed), error in errors.items():
        folder = report.run_dir(out, "mlp4", variant, seed)
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"finished": True, "test_error": error,
                                                         "history": [{"val_acc": 50.0}]}))
    return str(out)


def test_report_warns_of_a_seed_without_a_test_error_and_of_unequal_seed_sets(tmp_path):
    out = _report_folder(tmp_path, {("vanilla", 0): 3.0, ("vanilla", 1): 3.2, ("nsr", 0): 2.0, ("nsr", 1): None})
    result = run_in_process("-m nsr report", out)
    assert result.code == 0, result.err
    lines = result.err.strip().splitlines()
    assert lines == [f"warning: {report.run_dir(out, 'mlp4', 'nsr', 1)} is a finished run without a test error "
                     "(test_error is None); left out of the table",
                     "warning: MLP-4: nsr has seeds 0 and vanilla 0, 1; its gain compares the means of these "
                     "unequal sets, its p-value pairs the 1 seed both have"]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["mlp4"]["nsr"]["summary"]["n"] == 1 and summary["mlp4"]["nsr"]["summary"]["paired_n"] == 1


def test_report_of_equal_seed_sets_warns_of_nothing(tmp_path):
    out = _report_folder(tmp_path, {("vanilla", 0): 3.0, ("vanilla", 1): 3.2, ("nsr", 0): 2.0, ("nsr", 1): 2.1})
    result = run_in_process("-m nsr report", out)
    assert result.code == 0 and result.err == "", result.err


def test_a_resume_at_an_epochs_last_step_prints_no_scheduler_warning(tmp_path, monkeypatch):
    """Ctrl-C at the last step of epoch 1: the resumed run steps the scheduler first thing, which
    torch took for a wrong call order; with --quiet nothing but the summary is printed."""
    from nsr.train import engine
    from tests.helpers import STEPS_PER_EPOCH, step_then_signal
    out = str(tmp_path / "run")
    args = [*DIGITS, "--epochs", "2", "--scheduler", "multistep", "--milestones", "1", "--out", out]
    with monkeypatch.context() as m:
        m.setattr(engine.Trainer, "train_step", step_then_signal(engine.Trainer.train_step, STEPS_PER_EPOCH))
        assert run_in_process(SCRIPT, *args).code == 130
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_in_process(SCRIPT, *args, "--resume")
    assert result.code == 0 and result.err == "", result.err
    assert not [w for w in caught if "lr_scheduler" in str(w.message)], [str(w.message) for w in caught]
    straight = run_in_process(SCRIPT, *args[:-1], str(tmp_path / "straight"))
    assert straight.code == 0
    assert outcome(metrics(out)) == outcome(metrics(tmp_path / "straight"))


def _rank(rank: int, port: int, out: str, dump: str) -> None:
    """One torchrun-style rank (gloo, CPU); rank 1 alone gets SIGTERM after its 5th step."""
    from nsr.train import engine
    from nsr.train.config import parse_args
    from nsr.train.errors import RunInterrupted
    from tests.helpers import MLP4, gloo_rank, step_then_signal
    if rank == 1:
        engine.Trainer.train_step = step_then_signal(engine.Trainer.train_step, 5, signal.SIGTERM)
    with gloo_rank(rank, port):
        try:
            engine.train(parse_args([*DIGITS, "--epochs", "2", "--out", out], default_config=MLP4))
        except RunInterrupted as e:
            with open(os.path.join(dump, f"rank{rank}"), "w") as f:
                f.write(str(e))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_one_rank_under_torchrun_is_recorded_as_sigterm(tmp_path):
    """The ranks agree to stop at the same step; rank 0, which writes metrics.json, was not the one
    signalled, and still names the signal."""
    import torch.multiprocessing as mp

    from tests.helpers import free_port
    out, dump = str(tmp_path / "run"), str(tmp_path / "dump")
    os.makedirs(dump)
    mp.spawn(_rank, args=(free_port(), out, dump), nprocs=2, join=True)
    said = [open(os.path.join(dump, f"rank{r}")).read() for r in (0, 1)]
    assert said[0] == f"stopped by SIGTERM in epoch 1 at step 5; saved {out}/last.pt; continue with --resume"
    assert said[1] == "rank 1: stopped by SIGTERM in epoch 1 at step 5"
    m = metrics(out)
    assert (m["finished"], m["stopped_by"], m["global_steps"]) == (False, "SIGTERM", 5)


def test_settings_of_execution_may_change_on_resume_and_in_reproduce_alike(tmp_path):
    """One list (checkpoint.EXECUTION_KEYS): a resume with other threads and evaluation batches
    continues to the straight result, and reproduce counts such a folder as the same run."""
    from nsr.train.checkpoint import EXECUTION_KEYS
    assert reproduce.EXECUTION_KEYS is EXECUTION_KEYS
    out = str(tmp_path / "run")
    assert run_in_process(SCRIPT, *DIGITS, "--epochs", "2", "--max-steps", "40", "--out", out).code == 0
    result = run_in_process(SCRIPT, *DIGITS, "--epochs", "2", "--threads", "2", "--eval-batch-size", "64",
                            "--out", out, "--resume")
    assert result.code == 0, result.err
    got, want = outcome(metrics(out)), outcome(metrics(finished(tmp_path, "reference")))
    # the steadiness figure sums the validation set in eval batches: other batches, other rounding
    for a, b in zip(got["history"], want["history"]):
        for key in [k for k in b if k.startswith("intra_var_")]:
            assert a.pop(key) == pytest.approx(b.pop(key), rel=1e-5), key
    assert got == want
    saved = checkpoint.load_checkpoint(os.path.join(out, "last.pt"))["config"]
    assert reproduce.differences(saved, {**saved, "threads": 0, "eval_batch_size": 1000, "out": "x"}) == []
    assert reproduce.differences(saved, {**saved, "epochs": 3}) == ["epochs: 2 -> 3"]


def test_a_checkpoint_without_its_process_count_is_refused(tmp_path):
    out = finished(tmp_path)
    state = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    del state["world_size"]
    torch.save(state, os.path.join(out, "last.pt"))
    assert_error(run_in_process(SCRIPT, *DIGITS, "--epochs", "2", "--out", out, "--resume"),
                 "does not fit this run (world_size None is not a process count)")
