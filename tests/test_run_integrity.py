"""Runs you can trust, through the real entry points (main / train / the scripts).

  1. one owner per output folder       the folder's flock, repairs under it, temporaries by name
  2. a resumed run is the same run     schedules, process count, SIGTERM, --max-steps, inputs that
                                        contradict or would be ignored, strict metrics.json
  3. every file read is checked        what is not a checkpoint, what a checkpoint holds, metrics.json
  4. the machine failing is a message  failed writes (disk full, permissions, I/O), unusable devices

Fast tests train MLP-4 on scikit-learn's digits (36 steps an epoch at batch 32) for a few steps or
epochs; the two `slow` ones start processes (two scripts at once; two torchrun-style ranks).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from nsr.experiments import report
from nsr.search import launcher
from nsr.train import checkpoint, engine
from nsr.train.checkpoint import load_checkpoint, load_resumable
from nsr.train.config import parse_args
from nsr.train.engine import main, train
from nsr.train.errors import UserError
from nsr.train.fileio import write_json
from nsr.train.outdir import LOCK_NAME, RUN_FILES, RUN_FOLDERS, OutputFolder
from tests.helpers import ROOT, assert_one_error_line, free_port, gloo_rank

MLP4 = os.path.join(ROOT, "configs", "mlp4.yaml")  # fdnn_nsr.py's default config
VANILLA_SCRIPT = os.path.join(ROOT, "fdnn_vanilla.py")
RUN = ["--dataset", "digits", "--batch-size", "32", "--quiet"]
FAST = [*RUN, "--lr", "0.05", "--momentum", "0.9"]
STEPS = 36  # per epoch: 1,150 training images of digits at batch 32
TIMES = {"epoch_time_s", "train_time_s", "eval_time_s"}


# ---------------------------------------------------------------------------------- helpers

def run_main(capsys, argv, **kwargs) -> tuple[int, str]:
    """fdnn_nsr.py's main() in-process: (exit code, stderr)."""
    try:
        main(default_config=MLP4, argv=argv, **kwargs)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def run_vanilla_script(capsys, monkeypatch, argv) -> tuple[int, str]:
    """fdnn_vanilla.py itself, in-process."""
    monkeypatch.setattr(sys, "argv", [VANILLA_SCRIPT, *argv])
    try:
        runpy.run_path(VANILLA_SCRIPT, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def fingerprint(folder) -> dict:
    """Bytes and mtime of every file: proof that nothing was touched."""
    result = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                result[name] = (f.read(), os.stat(path).st_mtime_ns)
        else:
            result[name] = "folder"
    return result


def outcome(m: dict) -> dict:
    """What a resumed run must reproduce exactly: everything but the timings."""
    keep = {k: v for k, v in m.items() if k not in TIMES | {"history", "partial_epoch"}}
    keep["history"] = [{k: v for k, v in row.items() if k not in TIMES} for row in m["history"]]
    return keep


def same_weights(a: str, b: str) -> bool:
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    return all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"]) and \
        all(torch.equal(sa["regularizer"][k], sb["regularizer"][k]) for k in sa["regularizer"])


def read(path) -> str:
    with open(path) as f:
        return f.read()


def strict_json(path) -> dict:
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    with open(path) as f:
        return json.loads(f.read(), parse_constant=refuse)


# ---------------------------------------------------------------------------------- 1. one owner

def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_holder(tmp_path, capsys, monkeypatch):
    """A second run starts on the same --out while the first is in its 10th step: refused in one
    line that names the holder; the first run goes on, undisturbed, to the result of a run alone."""
    out, alone = str(tmp_path / "run"), str(tmp_path / "alone")
    reference = train(parse_args([*FAST, "--epochs", "2", "--out", alone], default_config=MLP4))
    capsys.readouterr()
    second, plain_step = {}, engine.Trainer.train_step

    def step_and_start_another(self, xb, yb):
        plain_step(self, xb, yb)
        if self.pos.global_step == 9 and not second:  # (the position advances after the step)
            second["result"] = run_main(capsys, [*FAST, "--epochs", "2", "--lr", "0.1", "--out", out])
            second["listing"] = sorted(os.listdir(out))

    monkeypatch.setattr(engine.Trainer, "train_step", step_and_start_another)
    assert run_main(capsys, [*FAST, "--epochs", "2", "--out", out])[0] == 0
    code, err = second["result"]
    assert code == 2
    assert_one_error_line(err, f"error: {out} is in use by another run (pid {os.getpid()} on {socket.gethostname()}, "
                   "started ", "); wait for it to end, or choose another --out")
    assert LOCK_NAME in second["listing"], "the lock lives in OUT while the run does"
    assert sorted(os.listdir(out)) == sorted([*RUN_FILES, "tb"]), "released (and removed) at the end"
    assert yaml.safe_load(read(os.path.join(out, "config.yaml")))["lr"] == 0.05, "config.yaml is the owner's"
    assert load_checkpoint(os.path.join(out, "last.pt"))["config"]["lr"] == 0.05
    assert outcome(strict_json(os.path.join(out, "metrics.json"))) == outcome(reference)
    assert same_weights(os.path.join(out, "last.pt"), os.path.join(alone, "last.pt"))


def test_what_a_killed_run_left_is_repaired_under_the_lock_not_by_pid(tmp_path, capsys):
    """A run killed during --overwrite left the old run in .previous-1 and its lock file behind.
    pid 1 is alive (init), so asking "is that pid alive?" would leave the old run hidden forever;
    the free lock proves its writer gone."""
    out = str(tmp_path / "run")
    train(parse_args([*FAST, "--epochs", "1", "--out", out], default_config=MLP4))
    before = fingerprint(out)
    os.makedirs(os.path.join(out, ".previous-1"))
    for name in (*RUN_FILES, *RUN_FOLDERS):  # what --overwrite sets aside
        os.replace(os.path.join(out, name), os.path.join(out, ".previous-1", name))
    with open(os.path.join(out, LOCK_NAME), "w") as f:
        f.write("pid 1 on elsewhere, started 2020-01-01 00:00:00 UTC\n")  # its lock died with it
    os.kill(1, 0)  # pid 1 exists
    code, err = run_main(capsys, [*FAST, "--epochs", "1", "--out", out])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"warning: restored the run in {out}"), err
    assert lines[1] == f"error: {out} already holds a finished run; pass --overwrite to replace it, " \
                       "or choose another --out"
    assert fingerprint(out) == before, "the run is back, byte for byte, and no lock file is left"


def test_only_the_projects_own_temporaries_are_removed(tmp_path, capsys):
    """Temporaries of the run's files go whatever pid they name (a live one included: the lock says
    no writer is at work); a user's files that merely look like temporaries stay."""
    out = tmp_path / "run"
    out.mkdir()
    ours = [f"last.pt.tmp.{os.getppid()}", f"metrics.json.tmp.{2**22 + 11}", "best.pt.tmp.1"]
    users = ["notes.tmp.123", "last.pt.tmp.backup", "data.csv.tmp.7", "last.pt.tmp.12.keep", "mylast.pt.tmp.5"]
    for name in ours + users:
        (out / name).write_bytes(b"half a file" if name in ours else b"the user's")
    assert run_main(capsys, [*FAST, "--max-steps", "2", "--out", str(out)])[0] == 0
    assert sorted(os.listdir(out)) == sorted(["config.yaml", "metrics.json", "history.csv", "last.pt", "tb", *users])
    assert all((out / name).read_bytes() == b"the user's" for name in users)


@pytest.mark.parametrize("kind", ["link", "folder"])
def test_a_lock_name_taken_by_something_else_is_never_followed(tmp_path, capsys, kind):
    out, victim = tmp_path / "run", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious\n")
    if kind == "link":
        (out / LOCK_NAME).symlink_to(victim)
    else:
        (out / LOCK_NAME).mkdir()
    code, err = run_main(capsys, [*FAST, "--max-steps", "2", "--out", str(out)])
    assert code == 2
    assert_one_error_line(err, f"{out / LOCK_NAME} is {'a link' if kind == 'link' else 'not a file'}, not the lock file a "
                   "run makes; remove it, or choose another --out")
    assert victim.read_text() == "precious\n" and sorted(os.listdir(out)) == [LOCK_NAME]


def _wait_for(path: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


@pytest.mark.slow
def test_two_scripts_on_one_folder_one_owner_then_sigterm_saves_it(tmp_path):
    """Two real fdnn_nsr.py processes on one --out: the second is refused while the first holds the
    folder; SIGTERM (what a cluster scheduler sends) then stops the first like Ctrl-C, with a
    mid-epoch checkpoint and the line that says how to resume."""
    out = str(tmp_path / "run")
    script = [sys.executable, os.path.join(ROOT, "fdnn_nsr.py"), *RUN, "--out", out]
    first = subprocess.Popen([*script, "--batch-size", "1", "--epochs", "10"], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(os.path.join(out, "config.yaml"), first)  # it has loaded and owns the folder
        second = subprocess.run([*script, "--lr", "0.5"], cwd=ROOT, text=True, capture_output=True, timeout=180,
                                check=False)
        assert second.returncode == 2
        assert_one_error_line(second.stderr, f"{out} is in use by another run (pid {first.pid} on ")
        assert first.poll() is None, "the second run did not disturb the first"
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert re.fullmatch(rf"stopped by SIGTERM in epoch \d+ at step \d+; saved {re.escape(out)}/last.pt; "
                        "continue with --resume", stderr.strip()), stderr
    state = load_checkpoint(os.path.join(out, "last.pt"))
    assert state["position"]["step"] > 0 and state["config"]["lr"] == 0.01
    assert yaml.safe_load(read(os.path.join(out, "config.yaml")))["lr"] == 0.01
    assert strict_json(os.path.join(out, "metrics.json"))["stopped_by"] == "SIGTERM"
    assert set(os.listdir(out)) <= {*RUN_FILES, "tb"}, "the lock went with its owner"


def _rank(rank: int, port: int, out: str, dump: str, extra: list[str]) -> None:
    """One torchrun-style rank (gloo, CPU): train, and record a UserError's message."""
    with gloo_rank(rank, port):
        try:
            train(parse_args([*FAST, *extra, "--out", out], default_config=MLP4))
        except UserError as e:
            with open(os.path.join(dump, f"rank{rank}.error"), "w") as f:
                f.write(str(e))


@pytest.mark.slow
def test_torchrun_ranks_follow_rank_0s_lock_and_a_resume_keeps_the_process_count(tmp_path, capsys):
    """Rank 0 holds the lock for all ranks; when it cannot, every rank ends (none waits forever in
    a collective). A run trained on 2 processes cannot be resumed on 1 (nor the other way)."""
    out, dump = str(tmp_path / "run"), str(tmp_path / "dump")
    os.makedirs(dump)
    holder = OutputFolder(out)
    holder.acquire()  # another run owns the folder
    try:
        mp.spawn(_rank, args=(free_port(), out, dump, ["--max-steps", "2"]), nprocs=2, join=True)
    finally:
        holder.release()
    errors = [read(os.path.join(dump, f"rank{r}.error")) for r in (0, 1)]
    assert errors[0].startswith(f"{out} is in use by another run (pid {os.getpid()} on ")
    assert errors[1] == f"rank 1: rank 0 could not take the output folder {out}"
    assert not os.path.exists(out), "nothing was written"

    mp.spawn(_rank, args=(free_port(), out, dump, ["--max-steps", "2"]), nprocs=2, join=True)
    assert strict_json(os.path.join(out, "metrics.json"))["world_size"] == 2
    assert LOCK_NAME not in os.listdir(out)
    before = fingerprint(out)
    code, err = run_main(capsys, [*FAST, "--max-steps", "4", "--out", out, "--resume"])
    assert code == 2
    assert_one_error_line(err, f"cannot resume {out}/last.pt: it was trained by 2 processes (torchrun) and this run "
                   "has 1 process; resume it with the same count (torchrun --nproc_per_node=2 SCRIPT ... --resume)")
    assert fingerprint(out) == before

    single = str(tmp_path / "single")
    train(parse_args([*FAST, "--max-steps", "2", "--out", single], default_config=MLP4))
    mp.spawn(_rank, args=(free_port(), single, dump, ["--max-steps", "4", "--resume"]), nprocs=2, join=True)
    for r in (0, 1):
        assert read(os.path.join(dump, f"rank{r}.error")).startswith(
            f"cannot resume {single}/last.pt: it was trained by 1 process and this run has 2 processes (torchrun)")


# ---------------------------------------------------------------------------------- 2. same run

SCHEDULES = {"none": [], "multistep": ["--scheduler", "multistep", "--milestones", "1", "3", "--gamma", "0.5"],
             "cosine": ["--scheduler", "cosine"]}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_resume_to_more_epochs_is_a_straight_run_or_refused_with_the_reason(tmp_path, capsys, schedule):
    """Train 2 epochs, resume to 4 = train 4, bit for bit, for every schedule the scripts offer;
    cosine's rates follow the run's length, so there the longer resume is refused, saying why."""
    args = [*FAST, *SCHEDULES[schedule]]
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
    args = [*FAST, "--scheduler", "cosine"]
    straight = train(parse_args([*args, "--epochs", "3", "--out", str(tmp_path / "a")], default_config=MLP4))
    train(parse_args([*args, "--epochs", "2", "--max-steps", "20", "--out", str(tmp_path / "b")],
                     default_config=MLP4))
    resumed = train(parse_args([*args, "--epochs", "3", "--out", str(tmp_path / "b"), "--resume"],
                               default_config=MLP4))
    assert outcome(resumed) == outcome(straight)
    assert same_weights(str(tmp_path / "a" / "last.pt"), str(tmp_path / "b" / "last.pt"))


@pytest.fixture(scope="module")
def mid_epoch(tmp_path_factory):
    """A run stopped by --max-steps 50 (epoch 2, step 14): history, best epoch, momentum buffers,
    NSR memory and the open epoch's sums all hold something. Tests copy it."""
    out = str(tmp_path_factory.mktemp("mid") / "run")
    metrics = train(parse_args([*FAST, "--epochs", "3", "--max-steps", "50", "--out", out], default_config=MLP4))
    return out, metrics


def _copy(mid_epoch, tmp_path) -> str:
    out = str(tmp_path / "run")
    shutil.copytree(mid_epoch[0], out)
    return out


def test_resume_with_another_process_count_is_refused(mid_epoch, tmp_path, capsys):
    out = _copy(mid_epoch, tmp_path)
    last = os.path.join(out, "last.pt")
    state = torch.load(last, weights_only=True)
    assert state["world_size"] == 1
    config = state["config"]
    with pytest.raises(UserError, match="it was trained by 1 process and this run has 2 processes"):
        load_resumable(last, config, world=2)
    state["world_size"] = 2
    torch.save(state, last)
    before = fingerprint(out)
    code, err = run_main(capsys, [*FAST, "--epochs", "3", "--out", out, "--resume"])
    assert code == 2
    assert_one_error_line(err, "it was trained by 2 processes (torchrun) and this run has 1 process")
    assert fingerprint(out) == before


@pytest.mark.parametrize("where", ["middle", "last-step"])
def test_sigterm_saves_the_position_and_resume_is_a_straight_run(tmp_path, capsys, monkeypatch, where):
    straight = train(parse_args([*FAST, "--epochs", "3", "--out", str(tmp_path / "a")], default_config=MLP4))
    capsys.readouterr()
    at = STEPS + 10 if where == "middle" else 2 * STEPS
    calls, plain_step = [0], engine.Trainer.train_step

    def step_then_sigterm(self, xb, yb):
        plain_step(self, xb, yb)
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(engine.Trainer, "train_step", step_then_sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    out = str(tmp_path / "b")
    code, err = run_main(capsys, [*FAST, "--epochs", "3", "--out", out])
    assert signal.getsignal(signal.SIGTERM) is handler, "the handler is put back"
    assert code == 130
    step = at - STEPS
    assert err.strip() == f"stopped by SIGTERM in epoch 2 at step {step}; saved {out}/last.pt; continue with --resume"
    position = load_checkpoint(os.path.join(out, "last.pt"))["position"]
    assert (position["epoch"], position["step"]) == (1, step)
    m = strict_json(os.path.join(out, "metrics.json"))
    assert (m["finished"], m["stopped_by"]) == (False, "SIGTERM")
    monkeypatch.setattr(engine.Trainer, "train_step", plain_step)
    resumed = train(parse_args([*FAST, "--epochs", "3", "--out", out, "--resume"], default_config=MLP4))
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
    code, err = run_main(capsys, [*FAST, "--epochs", "2", "--out", out])
    assert code == 130
    assert err.strip() == f"interrupted in epoch 1 at step 20; saved {out}/last.pt; continue with --resume"
    assert load_checkpoint(os.path.join(out, "last.pt"))["position"]["step"] == 20


@pytest.mark.parametrize("steps", [50, STEPS], ids=["inside-an-epoch", "at-an-epoch-end"])
def test_a_max_steps_stop_is_not_finished_and_a_plain_rerun_points_to_resume(tmp_path, capsys, steps):
    out = str(tmp_path / "run")
    first = train(parse_args([*FAST, "--epochs", "3", "--max-steps", str(steps), "--out", out], default_config=MLP4))
    assert (first["finished"], first["stopped_by"], first["global_steps"]) == (False, "max_steps", steps)
    assert (first["partial_epoch"] is None) == (steps == STEPS)
    capsys.readouterr()
    before = fingerprint(out)
    code, err = run_main(capsys, [*FAST, "--epochs", "3", "--out", out])
    assert code == 2
    line = assert_one_error_line(err, f"{out} holds a run stopped by --max-steps after {steps} steps; continue it with "
                          "--resume (and a larger --max-steps, or none)")
    assert "--overwrite" not in line
    assert fingerprint(out) == before
    # the same stop resumed: nothing to train, the same report, from the checkpoint
    again = train(parse_args([*FAST, "--epochs", "3", "--max-steps", str(steps), "--out", out, "--resume"],
                             default_config=MLP4))
    assert outcome(again) == outcome(first) and again["partial_epoch"] == first["partial_epoch"]
    assert fingerprint(out)["last.pt"] == before["last.pt"], "nothing trained, nothing saved again"
    assert "continue with --resume" in capsys.readouterr().out


def test_results_without_their_checkpoint_are_not_overwritten_in_silence(mid_epoch, tmp_path, capsys):
    out = _copy(mid_epoch, tmp_path)
    os.remove(os.path.join(out, "last.pt"))
    before = fingerprint(out)
    code, err = run_main(capsys, [*FAST, "--epochs", "3", "--out", out])
    assert code == 2
    assert_one_error_line(err, f"{out} holds files of an earlier run (metrics.json, history.csv, best.pt) but no last.pt "
                   "to continue from; pass --overwrite to start again")
    assert fingerprint(out) == before


def _yaml(tmp_path, name, text) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", ["resume-and-overwrite", "second-config", "duplicate-yaml-key",
                                  "duplicate-key-in-a-nested-mapping"])
def test_contradicting_or_repeated_inputs_are_refused(tmp_path, capsys, case):
    a = _yaml(tmp_path, "a.yaml", "lr: 0.05\n")
    cases = {
        "resume-and-overwrite": (["--resume", "--overwrite"], ["--resume and --overwrite contradict each other"]),
        "second-config": (["--config", a, "--config", _yaml(tmp_path, "b.yaml", "lr: 0.1\n")],
                          [f"--config given twice ({a}, {tmp_path / 'b.yaml'}); one YAML file sets the defaults"]),
        "duplicate-yaml-key": (["--config", _yaml(tmp_path, "d.yaml", "lr: 0.1\nepochs: 2\nlr: 0.2\n")],
                               ["is not valid YAML at line 3: key 'lr' is given twice (first at line 1); keep one"]),
        "duplicate-key-in-a-nested-mapping": (
            ["--config", _yaml(tmp_path, "n.yaml", "lr: 0.1\nx: {a: 1, a: 2}\n")],
            ["is not valid YAML at line 2: key 'a' is given twice"]),
    }
    argv, fragments = cases[case]
    code, err = run_main(capsys, [*FAST, "--max-steps", "2", *argv, "--out", str(tmp_path / "out")])
    assert code == 2
    assert_one_error_line(err, *fragments)
    assert not (tmp_path / "out").exists()


def test_a_search_config_with_a_key_given_twice_is_refused(tmp_path):
    """The same YAML loader reads configs/nni/*.yml for python -m nsr search."""
    nni_yml = tmp_path / "dup.yml"
    nni_yml.write_text("experimentName: x\nmaxTrialNumber: 2\nmaxTrialNumber: 3\n")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with pytest.raises(UserError, match=r"is not valid YAML at line 3: key 'maxTrialNumber' is given twice "
                                            r"\(first at line 2\); keep one"):
            launcher.main([str(nni_yml), "--port", "0", "--out", str(tmp_path / "out"),
                           "--experiment-dir", str(tmp_path / "nni")])
    finally:
        for s, handler in handlers.items():  # main() installs its own
            signal.signal(s, handler)
    assert not (tmp_path / "nni").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--regularizer", "nsr"], "--regularizer nsr: this script always trains with regularizer 'none'"),
    (["--regularizer", "center"], "--regularizer center: this script always trains with regularizer 'none'"),
    (["--lambda", "3"], "--lambda has no effect here: only --regularizer nsr or center uses it (this run: none); drop it"),
    (["--regularized-layers", "fc1"], "--regularized-layers has no effect here"),
    (["--queue-batches", "3"], "--queue-batches has no effect here"),
    (["--active-only"], "--active-only has no effect here"),
    (["--no-per-channel"], "--per-channel has no effect here"),
    (["--center-alpha", "0.3"], "--center-alpha has no effect here"),
    (["--config", "REGULARIZED_YAML"], "sets regularizer: center: this script always trains with regularizer 'none'"),
], ids=["regularizer-nsr", "regularizer-center", "lambda", "regularized-layers", "queue-batches", "active-only",
        "no-per-channel", "center-alpha", "yaml-regularizer"])
def test_the_vanilla_script_refuses_a_regularizer_and_its_settings(tmp_path, capsys, monkeypatch, argv, fragment):
    if argv[-1] == "REGULARIZED_YAML":
        argv = ["--config", _yaml(tmp_path, "center.yaml", "model: mlp4\nregularizer: center\n")]
    out = tmp_path / "out"
    code, err = run_vanilla_script(capsys, monkeypatch, [*RUN, "--max-steps", "2", *argv, "--out", str(out)])
    assert code == 2
    assert_one_error_line(err, fragment)
    assert not out.exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--regularizer", "center", "--queue-batches", "3"],
     "--queue-batches has no effect here: only --regularizer nsr uses it (this run: center)"),
    (["--regularizer", "center", "--per-channel"], "active_only and per_channel are NSR options"),
    (["--center-alpha", "0.3"], "--center-alpha has no effect here: only --regularizer center uses it (this run: nsr)"),
    (["--scheduler", "cosine", "--milestones", "5"], "--milestones has no effect here: only --scheduler multistep"),
    (["--gamma", "0.5"], "--gamma has no effect here: only --scheduler multistep uses it (this run: none)"),
    (["--optimizer", "adam", "--momentum", "0.9"], "--momentum has no effect here: only --optimizer sgd uses it"),
    (["--optimizer", "adamw", "--no-nesterov"], "--nesterov has no effect here"),
    (["--cutout", "8"], "--cutout has no effect here: only --augment crop_flip_cutout uses it (this run: none)"),
    (["--fake-size", "64"], "--fake-size has no effect here: only --dataset fake uses it (this run: digits)"),
], ids=["center-queue", "center-per-channel", "nsr-center-alpha", "cosine-milestones", "none-gamma",
        "adam-momentum", "adamw-nesterov", "cutout", "fake-size"])
def test_flags_the_run_would_not_read_are_refused(tmp_path, capsys, argv, fragment):
    code, err = run_main(capsys, [*RUN, "--max-steps", "2", *argv, "--out", str(tmp_path / "out")])
    assert code == 2
    assert_one_error_line(err, fragment)
    assert not (tmp_path / "out").exists()


def test_settings_a_run_does_not_read_are_not_recorded_as_used(tmp_path, capsys, monkeypatch):
    """fdnn_vanilla.py on configs/mlp4.yaml (lambda, regularized_layers, queue_batches set there for the
    NSR script): config.yaml, the checkpoint and metrics.json show none of them as used."""
    out = tmp_path / "v"
    assert run_vanilla_script(capsys, monkeypatch, [*RUN, "--max-steps", "2", "--out", str(out)])[0] == 0
    unread = {"regularized_layers", "lambda", "queue_batches", "active_only", "per_channel", "center_alpha",
              "milestones", "gamma", "cutout", "fake_size"}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["regularizer"] == "none" and not unread & set(saved) and saved["lr"] == 0.01
    assert not unread & set(load_checkpoint(str(out / "last.pt"))["config"])
    m = strict_json(out / "metrics.json")
    assert (m["lambda"], m["regularized_layers"], m["queue_batches"], m["center_alpha"]) == ([], [], None, None)


def test_metrics_json_is_strict_json_and_readers_take_its_nulls(tmp_path, capsys):
    out = tmp_path / "run"
    train(parse_args([*FAST, "--max-steps", "3", "--out", str(out)], default_config=MLP4))
    text = (out / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    m = strict_json(out / "metrics.json")
    assert (m["test_acc"], m["test_error"], m["test_top5_error"], m["best_epoch"]) == (None, None, None, -1)
    assert report.test_error(m, out) is None
    assert "no epoch finished" in capsys.readouterr().out
    write_json(tmp_path / "x.json", {"a": [float("nan"), {"b": float("-inf")}], "c": (1.5, float("inf"))})
    assert strict_json(tmp_path / "x.json") == {"a": [None, {"b": None}], "c": [1.5, None]}


# ---------------------------------------------------------------------------------- 3. files read

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
    out = _copy(mid_epoch, tmp_path)
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
    before = fingerprint(out)
    code, err = run_main(capsys, [*FAST, "--epochs", "3", "--out", out, "--resume"])
    assert code == 2
    assert_one_error_line(err, f"checkpoint {last} is truncated or not a PyTorch checkpoint (",
                   "); delete it or restore it from a backup")
    assert fingerprint(out) == before


def _set(path, value):
    """A mutation that sets state[path...] = value (value may be a function of the old value)."""
    def apply(state):
        *keys, last = path
        for k in keys:
            state = state[k]
        state[last] = value(state[last]) if callable(value) else value
    return apply


def _nan_at_0(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


CRAFTED = {  # name: (mutation, the fragment of the one error line)
    "model-dtype": (_set(["model", "fc1.weight"], lambda t: t.double()), "dtype mismatch for fc1.weight"),
    "model-nan": (_set(["model", "fc1.weight"], _nan_at_0), "model: fc1.weight holds NaN or infinite values"),
    "model-extra-tensor": (_set(["model", "extra.weight"], torch.zeros(1)), "model has 'extra.weight'"),
    "optimizer-buffer-shape": (_set(["optimizer", "state", 0, "momentum_buffer"], torch.zeros(3)),
                               "size mismatch for momentum_buffer of parameter 0"),
    "optimizer-buffer-nan": (_set(["optimizer", "state", 1, "momentum_buffer"], _nan_at_0),
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
    "nsr-sums-nan": (_set(["regularizer", "memories.0.sums"], _nan_at_0), "'out': its saved sums hold NaN or infinite values"),
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
    out = _copy(mid_epoch, tmp_path)
    last = os.path.join(out, "last.pt")
    state = torch.load(last, weights_only=True)
    mutate, fragment = CRAFTED[case]
    mutate(state)
    torch.save(state, last)
    before = fingerprint(out)
    code, err = run_main(capsys, [*FAST, "--epochs", "3", "--out", out, "--resume"])
    assert code == 2
    assert_one_error_line(err, f"checkpoint {last} does not fit this run (", fragment)
    assert fingerprint(out) == before


ADAM = [*RUN, "--optimizer", "adam", "--lr", "0.001"]


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


def test_resuming_a_finished_run_reports_its_checkpoint_not_an_edited_metrics_json(tmp_path, capsys):
    out = tmp_path / "run"
    original = train(parse_args([*FAST, "--epochs", "2", "--out", str(out)], default_config=MLP4))
    edited = {**original, "test_acc": 99.9, "test_error": 0.1, "best_val_acc": 100.0, "finished": True}
    (out / "metrics.json").write_text(json.dumps(edited))
    capsys.readouterr()
    resumed = train(parse_args([*FAST, "--epochs", "2", "--out", str(out), "--resume"], default_config=MLP4))
    assert resumed == original and strict_json(out / "metrics.json") == json.loads(json.dumps(original))
    assert f"test error {original['test_error']:.2f}%" in capsys.readouterr().out
    (out / "metrics.json").write_bytes(b"\x00\xff garbage")
    assert train(parse_args([*FAST, "--epochs", "2", "--out", str(out), "--resume"], default_config=MLP4)) == original


def test_a_run_file_that_is_a_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "last.pt").mkdir(parents=True)
    code, err = run_main(capsys, [*FAST, "--max-steps", "2", "--out", str(out), "--resume"])
    assert code == 2
    assert_one_error_line(err, f"{out / 'last.pt'} is not a regular file (a folder, a link, a pipe, ...); move it away")


# ---------------------------------------------------------------------------------- 4. the machine

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
    straight = train(parse_args([*FAST, "--epochs", "3", "--out", str(tmp_path / "a")], default_config=MLP4))
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
    code, err = run_main(capsys, [*FAST, "--epochs", "3", "--out", out])
    monkeypatch.undo()
    assert code == 2
    assert_one_error_line(err, f"error: cannot write {target}: {cause}; the {name} there before is unchanged; ",
                   f"; {out}/last.pt (end of epoch {kept_epoch}) is intact: continue with --resume once it can write")
    assert not [n for n in os.listdir(out) if ".tmp." in n], "no temporary is left"
    assert load_checkpoint(os.path.join(out, "last.pt"))["position"]["epoch"] == kept_epoch
    resumed = train(parse_args([*FAST, "--epochs", "3", "--out", out, "--resume"], default_config=MLP4))
    assert outcome(resumed) == outcome(straight)
    assert same_weights(str(tmp_path / "a" / "last.pt"), os.path.join(out, "last.pt"))


def _device_cases():
    cuda, count = torch.cuda.is_available(), torch.cuda.device_count()
    no_cuda = "but this torch cannot use CUDA here"
    cases = [("tpu", "unknown device 'tpu'; use auto, cpu, cuda or cuda:N")]
    if not cuda:
        cases += [("cuda", no_cuda), ("cuda:0", no_cuda)]
    cases.append(("cuda:7", no_cuda if not cuda else f"this machine has {count} CUDA GPU(s)") if count < 8 else None)
    if not torch.backends.mps.is_available():
        cases.append(("mps", "device 'mps' asked for, but this torch cannot use Apple's MPS here"))
    return [c for c in cases if c is not None]


@pytest.mark.parametrize("device, fragment", _device_cases())
def test_a_device_this_torch_cannot_use_is_refused_at_validation(tmp_path, capsys, device, fragment):
    with pytest.raises(UserError, match="device"):
        parse_args([*FAST, "--device", device])  # before any output folder or data exists
    code, err = run_main(capsys, [*FAST, "--max-steps", "2", "--device", device, "--out", str(tmp_path / "out")])
    assert code == 2
    assert_one_error_line(err, fragment)
    assert not (tmp_path / "out").exists()
