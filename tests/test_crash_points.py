"""A run folder survives a crash or a full disk at every file operation of a run's life, as
storage engines test themselves.

tests/crash_points.py runs fdnn_nsr.py on digits once per file operation of the undisturbed run
(creating the folder and its lock, setting a replaced run aside, config.yaml, each checkpoint
and metrics write, deleting the replaced run, restoring it, letting go of the lock), stopping it
there with SIGKILL or failing that operation with ENOSPC, and then runs the recovery the project
documents (`--resume`, or what the error line says). Every point must end in one of two states:
the old run byte for byte (and mtime for mtime), or the new run with exactly the straight run's
results and weights, and nothing else in the folder. Never a mix, never less.
"""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
import yaml

from nsr.train.checkpoint import load_checkpoint
from nsr.train.outdir import RUN_FILES, RUN_FOLDERS
from tests.helpers import assert_one_error_line, fingerprint, outcome, read_scalars, run_script, snapshot

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
INVOCATION = {"out", "resume", "overwrite"}  # config.yaml keys that name the command, not the run


def crash_points(root, mode: str, scenario: str) -> dict:
    run_script("tests/crash_points.py", str(root), mode, scenario, timeout=580)
    with open(root / "points.json") as f:
        return json.load(f)


def _weights(path) -> dict:
    state = load_checkpoint(str(path))
    return {**state["model"], **{f"regularizer.{k}": v for k, v in state["regularizer"].items()}}


def _history(path) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in csv.DictReader(f)]


def _settings(path) -> dict:
    with open(path) as f:
        return {k: v for k, v in yaml.safe_load(f).items() if k not in INVOCATION}


def assert_the_new_run(out, straight, where: str) -> None:
    """`out` holds exactly the run of `straight`: the same files, results, weights and settings."""
    # the run files, and tb/ where the straight run logs TensorBoard curves
    assert sorted(os.listdir(out)) == sorted(os.listdir(straight)), where
    assert set(RUN_FILES) <= set(os.listdir(out)), where
    if os.path.isdir(os.path.join(straight, "tb")):
        # TensorBoard's reader applies a resumed run's purge of the steps it logs again
        assert _curves(out) == _curves(straight), where
    with open(os.path.join(out, "metrics.json")) as f, open(os.path.join(straight, "metrics.json")) as g:
        got, want = json.load(f), json.load(g)
    assert got["finished"] is True and outcome(got) == outcome(want), where
    for name in ("last.pt", "best.pt"):
        a, b = _weights(os.path.join(out, name)), _weights(os.path.join(straight, name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (where, name)
    assert _history(os.path.join(out, "history.csv")) == _history(os.path.join(straight, "history.csv")), where
    assert _settings(os.path.join(out, "config.yaml")) == _settings(os.path.join(straight, "config.yaml")), where


def _curves(out) -> dict:
    """Every logged scalar but the timing, as TensorBoard reads the run's tb/."""
    return {tag: points for tag, points in read_scalars(os.path.join(out, "tb")).items() if tag != "time/epoch_s"}


def _where(point: dict) -> str:
    return f"point {point['n']} ({point['op']}): {point['fault']['stderr'][-400:]!r} then " \
           f"{point['recovered']['stderr'][-400:]!r}"


def test_a_new_run_killed_at_each_file_operation_resumes_to_the_straight_run(tmp_path):
    """No start is refused for what a killed run left: --resume (which a job script may always
    pass) ends every point in the straight run."""
    result = crash_points(tmp_path, "kill", "fresh")
    points = result["points"]
    assert len(points) >= 50 and result["undisturbed"]["exit"] == 0
    for point in points:
        where = _where(point)
        assert point["fault"]["exit"] == -9, where  # the kill came, at that operation
        assert point["recovered"]["exit"] == 0, where
        assert_the_new_run(tmp_path / "points" / str(point["n"]) / "run", tmp_path / "straight", where)


def test_an_overwrite_killed_at_each_file_operation_leaves_the_old_run_or_the_new_one(tmp_path):
    """Before the new run's first checkpoint the next start gives the old run back, byte for byte
    (then --resume with the new settings is refused); after it, --resume ends in the new run."""
    result = crash_points(tmp_path, "kill", "overwrite")
    old = fingerprint(tmp_path / "old")
    kept = replaced = 0
    for point in result["points"]:
        where, out = _where(point), tmp_path / "points" / str(point["n"]) / "run"
        assert point["fault"]["exit"] == -9, where
        if point["recovered"]["exit"] == 2:
            assert_one_error_line(point["recovered"]["stderr"].splitlines()[-1] + "\n",
                                  "settings differ from the saved run (lr: 0.02 -> 0.05)")
            assert fingerprint(out) == old, where
            kept += 1
        else:
            assert point["recovered"]["exit"] == 0, where
            assert_the_new_run(out, tmp_path / "straight", where)
            replaced += 1
    assert kept >= 20 and replaced >= 20, (kept, replaced)  # both sides of the first checkpoint were hit


def test_a_restore_killed_at_each_file_operation_still_gives_back_the_old_run(tmp_path):
    """--overwrite stopped by Ctrl-C before its first checkpoint moves the old run back; a kill at
    any operation of that (or before it) leaves a state the next start completes."""
    result = crash_points(tmp_path, "kill", "restore")
    undisturbed = result["undisturbed"]
    assert undisturbed["exit"] == 130 and "the previous run in" in undisturbed["stderr"]
    moves = sum(op.startswith(("rename .previous-", "replace .restoring-")) for op in result["ops"])
    assert moves == 1 + len(RUN_FILES) + len(RUN_FOLDERS)  # the folder, then each file and tb/
    old = fingerprint(tmp_path / "old")
    for point in result["points"]:
        where, out = _where(point), tmp_path / "points" / str(point["n"]) / "run"
        assert point["fault"]["exit"] == -9, where
        assert point["recovered"]["exit"] == 2, where
        assert "settings differ from the saved run (lr: 0.02 -> 0.05)" in point["recovered"]["stderr"], where
        assert fingerprint(out) == old, where


def _failed_with_one_line(point: dict) -> str:
    where = _where(point)
    assert point["fault"]["exit"] == 2, where
    return assert_one_error_line(point["fault"]["stderr"], "No space left on device")


def test_a_full_disk_at_each_write_of_a_new_run_is_one_line_whose_advice_works(tmp_path):
    """Either the line says to continue with --resume, and that ends in the straight run; or the run
    left nothing (the folder it made is gone) and running the same command again does."""
    result = crash_points(tmp_path, "enospc", "fresh")
    resumed = started_again = 0
    for point in result["points"]:
        where, out = _where(point), tmp_path / "points" / str(point["n"]) / "run"
        line = _failed_with_one_line(point)
        if "continue with --resume" in line:
            assert "--resume" in point["recovery"], where
            resumed += 1
        else:
            assert "--resume" not in point["recovery"], where
            assert point["left"] is None, where  # nothing was written, not even the folder
            started_again += 1
        assert point["recovered"]["exit"] == 0, where
        assert_the_new_run(out, tmp_path / "straight", where)
    assert resumed >= 10 and started_again >= 10, (resumed, started_again)


def test_a_full_disk_at_each_write_of_an_overwrite_keeps_the_old_run_or_resumes(tmp_path):
    """Before the new run's first checkpoint the failure leaves the old run as it was, at once (no
    repair needed) and says so; after it, --resume ends in the new run."""
    result = crash_points(tmp_path, "enospc", "overwrite")
    old = snapshot(tmp_path / "old")
    kept = 0
    for point in result["points"]:
        where, out = _where(point), tmp_path / "points" / str(point["n"]) / "run"
        line = _failed_with_one_line(point)
        if "continue with --resume" not in line:
            assert point["left"] == old, where
            assert any(s in line for s in ("is kept as it was", "nothing in it was changed",
                                           "cannot write to output folder")), where
            kept += 1
        assert point["recovered"]["exit"] == 0, where
        assert_the_new_run(out, tmp_path / "straight", where)
    assert kept >= 10, kept


@pytest.mark.parametrize("mode", ["kill", "enospc"])
def test_a_resume_stopped_at_each_file_operation_still_ends_in_the_straight_run(tmp_path, mode):
    """--resume of a run stopped inside epoch 2 (config.yaml rewritten, then each save): killed or
    failing at any operation, the next --resume (what the line says) ends in the straight run."""
    result = crash_points(tmp_path, mode, "resume")
    assert len(result["points"]) >= (20 if mode == "kill" else 15)
    for point in result["points"]:
        where = _where(point)
        if mode == "kill":
            assert point["fault"]["exit"] == -9, where
        else:
            line = _failed_with_one_line(point)  # (the lock file is the one write before the checkpoint is read)
            assert "continue with --resume" in line or "cannot write to output folder" in line, where
        assert point["recovered"]["exit"] == 0, where
        assert_the_new_run(tmp_path / "points" / str(point["n"]) / "run", tmp_path / "straight", where)
