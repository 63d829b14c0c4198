"""python -m nsr demo: the quick start's table, and its bad arguments (one line, exit 2, nothing
written), in-process through the dispatcher (tests/helpers.run_in_process); test_entry_points.py
runs the command once as a process."""

import re

import pytest

from tests.helpers import assert_error, read_scalars, run_in_process


@pytest.mark.parametrize("args, expected", [
    (["--seeds", "x"], "argument --seeds: invalid int value: 'x'"),
    (["--seeds", "0"], "--seeds must be between 1 and 100, got 0"),
    (["--sedes", "2"], "unknown option --sedes; did you mean --seeds?"),
    (["--out", "a_file"], "--out a_file is a file; give a folder"),
    (["--out", "a_file/runs"], "lies under the file"),
])
def test_bad_arguments(tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    assert_error(run_in_process("-m nsr demo", *args), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.slow  # MLP-4 vanilla and NSR, 60 epochs each
@pytest.mark.timeout(300)
def test_one_seed_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_in_process("-m nsr demo", "--seeds", "1", "--out", "demo")
    assert result.code == 0, result.err
    # one seed: no std, "| Vanilla        |         2.78 |"; the gain from the two printed errors
    cells = dict(re.findall(r"^\| (Vanilla(?: \+ NSR)?|Gain) +\| +(\S+) \|$", result.out, re.M))
    vanilla, nsr = float(cells["Vanilla"]), float(cells["Vanilla + NSR"])
    assert 0 < vanilla < 20 and 0 < nsr < 20  # digits: a few percent test error
    assert abs(float(cells["Gain"].rstrip("%")) - (vanilla - nsr) / vanilla * 100) < 0.6
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["nsr-s0", "vanilla-s0"]
    # `tensorboard --logdir runs/demo` shows both runs: every epoch (60 of 36 steps) and each layer's steadiness
    for run in ("nsr-s0", "vanilla-s0"):
        scalars = read_scalars(tmp_path / "demo" / run / "tb")
        assert [s for s, _ in scalars["accuracy/val"]] == [36 * e for e in range(1, 61)], run
        assert {"steadiness/out", "steadiness/fc1", "steadiness/fc2"} <= set(scalars), run
        assert ("loss/reg" in scalars) == (run == "nsr-s0")
