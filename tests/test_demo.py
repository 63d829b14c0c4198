"""python -m nsr demo: the quick start's table, and its bad arguments (one line, exit 2, nothing written)."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _demo(*args, cwd):
    return subprocess.run([sys.executable, "-m", "nsr", "demo", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_bad_arguments(tmp_path):
    (tmp_path / "a_file").write_text("x")
    for args, expected in ((["--seeds", "x"], "argument --seeds: invalid int value: 'x'"),
                           (["--seeds", "0"], "--seeds must be between 1 and 100, got 0"),
                           (["--sedes", "2"], "unknown option --sedes; did you mean --seeds?"),
                           (["--out", "a_file"], "--out a_file is a file; give a folder"),
                           (["--out", "a_file/runs"], "lies under the file")):
        proc = _demo(*args, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert proc.stderr.startswith("error: ") and expected in proc.stderr, (args, proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_one_seed_table(tmp_path):
    proc = _demo("--seeds", "1", "--out", "demo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # one seed: no std, "| Vanilla        |         2.78 |"; the gain from the two printed errors
    cells = dict(re.findall(r"^\| (Vanilla(?: \+ NSR)?|Gain) +\| +(\S+) \|$", proc.stdout, re.M))
    vanilla, nsr = float(cells["Vanilla"]), float(cells["Vanilla + NSR"])
    assert 0 < vanilla < 20 and 0 < nsr < 20  # digits: a few percent test error
    assert abs(float(cells["Gain"].rstrip("%")) - (vanilla - nsr) / vanilla * 100) < 0.6
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["nsr-s0", "vanilla-s0"]
