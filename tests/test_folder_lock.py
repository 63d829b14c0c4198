"""One run per output folder: the folder's lock (nsr/train/outdir.py), held for the run's life.
A second run on a folder in use is refused in one line naming the holder, and the first goes on
undisturbed; torchrun's ranks follow rank 0's lock; what a killed run left is repaired under the
lock (never by asking whether a pid is alive), and only the project's own temporaries are removed;
a lock name taken by a link or a folder is never followed.

Fast tests train MLP-4 on scikit-learn's digits for a few steps or epochs; the two `slow` ones
start processes (two scripts at once; two torchrun-style ranks).
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch.multiprocessing as mp
import yaml

from nsr.train import engine
from nsr.train.checkpoint import load_checkpoint
from nsr.train.config import parse_args
from nsr.train.engine import train
from nsr.train.errors import UserError
from nsr.train.outdir import LOCK_NAME, RUN_FILES, RUN_FOLDERS, OutputFolder
from tests.helpers import (
    DIGITS,
    DIGITS_BASE,
    MLP4,
    ROOT,
    assert_one_error_line,
    fingerprint,
    free_port,
    gloo_rank,
    outcome,
    read_text,
    run_main,
    same_weights,
    strict_json,
)


def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_holder(tmp_path, capsys, monkeypatch):
    """A second run starts on the same --out while the first is in its 10th step: refused in one
    line that names the holder; the first run goes on, undisturbed, to the result of a run alone."""
    out, alone = str(tmp_path / "run"), str(tmp_path / "alone")
    reference = train(parse_args([*DIGITS, "--epochs", "2", "--out", alone], default_config=MLP4))
    capsys.readouterr()
    second, plain_step = {}, engine.Trainer.train_step

    def step_and_start_another(self, xb, yb):
        plain_step(self, xb, yb)
        if self.pos.global_step == 9 and not second:  # (the position advances after the step)
            second["result"] = run_main(capsys, [*DIGITS, "--epochs", "2", "--lr", "0.1", "--out", out])
            second["listing"] = sorted(os.listdir(out))

    monkeypatch.setattr(engine.Trainer, "train_step", step_and_start_another)
    assert run_main(capsys, [*DIGITS, "--epochs", "2", "--out", out])[0] == 0
    code, err = second["result"]
    assert code == 2
    assert_one_error_line(err, f"error: {out} is in use by another run (pid {os.getpid()} on {socket.gethostname()}, "
                   "started ", "); wait for it to end, or choose another --out")
    assert LOCK_NAME in second["listing"], "the lock lives in OUT while the run does"
    assert sorted(os.listdir(out)) == sorted([*RUN_FILES, "tb"]), "released (and removed) at the end"
    assert yaml.safe_load(read_text(os.path.join(out, "config.yaml")))["lr"] == 0.05, "config.yaml is the owner's"
    assert load_checkpoint(os.path.join(out, "last.pt"))["config"]["lr"] == 0.05
    assert outcome(strict_json(os.path.join(out, "metrics.json"))) == outcome(reference)
    assert same_weights(os.path.join(out, "last.pt"), os.path.join(alone, "last.pt"))


def test_what_a_killed_run_left_is_repaired_under_the_lock_not_by_pid(tmp_path, capsys):
    """A run killed during --overwrite left the old run in .previous-1 and its lock file behind.
    pid 1 is alive (init), so asking "is that pid alive?" would leave the old run hidden forever;
    the free lock proves its writer gone."""
    out = str(tmp_path / "run")
    train(parse_args([*DIGITS, "--epochs", "1", "--out", out], default_config=MLP4))
    before = fingerprint(out)
    os.makedirs(os.path.join(out, ".previous-1"))
    for name in (*RUN_FILES, *RUN_FOLDERS):  # what --overwrite sets aside
        os.replace(os.path.join(out, name), os.path.join(out, ".previous-1", name))
    with open(os.path.join(out, LOCK_NAME), "w") as f:
        f.write("pid 1 on elsewhere, started 2020-01-01 00:00:00 UTC\n")  # its lock died with it
    os.kill(1, 0)  # pid 1 exists
    code, err = run_main(capsys, [*DIGITS, "--epochs", "1", "--out", out])
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
    assert run_main(capsys, [*DIGITS, "--max-steps", "2", "--out", str(out)])[0] == 0
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
    code, err = run_main(capsys, [*DIGITS, "--max-steps", "2", "--out", str(out)])
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
    script = [sys.executable, os.path.join(ROOT, "fdnn_nsr.py"), *DIGITS_BASE, "--out", out]
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
    assert yaml.safe_load(read_text(os.path.join(out, "config.yaml")))["lr"] == 0.01
    assert strict_json(os.path.join(out, "metrics.json"))["stopped_by"] == "SIGTERM"
    assert set(os.listdir(out)) <= {*RUN_FILES, "tb"}, "the lock went with its owner"


def _rank(rank: int, port: int, out: str, dump: str, extra: list[str]) -> None:
    """One torchrun-style rank (gloo, CPU): train, and record a UserError's message."""
    with gloo_rank(rank, port):
        try:
            train(parse_args([*DIGITS, *extra, "--out", out], default_config=MLP4))
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
    errors = [read_text(os.path.join(dump, f"rank{r}.error")) for r in (0, 1)]
    assert errors[0].startswith(f"{out} is in use by another run (pid {os.getpid()} on ")
    assert errors[1] == f"rank 1: rank 0 could not take the output folder {out}"
    assert not os.path.exists(out), "nothing was written"

    mp.spawn(_rank, args=(free_port(), out, dump, ["--max-steps", "2"]), nprocs=2, join=True)
    assert strict_json(os.path.join(out, "metrics.json"))["world_size"] == 2
    assert LOCK_NAME not in os.listdir(out)
    before = fingerprint(out)
    code, err = run_main(capsys, [*DIGITS, "--max-steps", "4", "--out", out, "--resume"])
    assert code == 2
    assert_one_error_line(err, f"cannot resume {out}/last.pt: it was trained by 2 processes (torchrun) and this run "
                   "has 1 process; resume it with the same count (torchrun --nproc_per_node=2 SCRIPT ... --resume)")
    assert fingerprint(out) == before

    single = str(tmp_path / "single")
    train(parse_args([*DIGITS, "--max-steps", "2", "--out", single], default_config=MLP4))
    mp.spawn(_rank, args=(free_port(), single, dump, ["--max-steps", "4", "--resume"]), nprocs=2, join=True)
    for r in (0, 1):
        assert read_text(os.path.join(dump, f"rank{r}.error")).startswith(
            f"cannot resume {single}/last.pt: it was trained by 1 process and this run has 2 processes (torchrun)")
