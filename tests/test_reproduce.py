"""nsr.reproduce: planning, skip/resume/overwrite, failures, tables and curves.

Most tests drive the runner against a stand-in training script (fast, deterministic); the last
one runs the real scripts on scikit-learn's digits for 2 epochs (skipped if they are absent).
"""

import json
import math
import os
import sys
import textwrap
from pathlib import Path

import pytest

from nsr import reproduce, stats

REPO = Path(__file__).resolve().parent.parent

FAKE_TRAINER = textwrap.dedent('''
    import argparse, json, os, sys
    p = argparse.ArgumentParser()
    for flag in ("--config", "--out", "--dataset", "--data-dir", "--max-steps"):
        p.add_argument(flag)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lambda", dest="lam", nargs="+", type=float)
    for flag in ("--quiet", "--resume", "--overwrite", "--no-nsr"):
        p.add_argument(flag, action="store_true")
    a = p.parse_args()
    nsr = "nsr" in os.path.basename(sys.argv[0]) and not a.no_nsr
    variant = "nsr" if nsr else "vanilla"
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps({"variant": variant, "seed": a.seed, "resume": a.resume,
                            "overwrite": a.overwrite, "lambda": a.lam, "epochs": a.epochs,
                            "dataset": a.dataset, "max_steps": a.max_steps}) + "\\n")
    if os.environ.get("FAKE_FAIL") == f"{variant}{a.seed}":
        print("Traceback (most recent call last):\\nRuntimeError: boom", file=sys.stderr)
        sys.exit(3)
    os.makedirs(a.out, exist_ok=True)
    # test error: vanilla 3.0 + 0.1*seed, NSR 2.0 + 0.05*seed (percent)
    err = (2.0 + 0.05 * a.seed) if nsr else (3.0 + 0.1 * a.seed)
    hist = [{"val_acc": 0.5 + 0.1 * e + (0.05 if nsr else 0.0) + 0.01 * a.seed,
             "train_loss": 1.0} for e in range(a.epochs)]
    open(os.path.join(a.out, "last.pt"), "w").write("x")
    json.dump({"model": "mlp4", "dataset": a.dataset or "fashion-mnist", "seed": a.seed,
               "lambda": a.lam if nsr else None, "epochs": a.epochs, "test_error": err,
               "test_acc": 100 - err, "finished": True, "history": hist},
              open(os.path.join(a.out, "metrics.json"), "w"))
''')


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    for name in ("mlp4", "mlp6", "resnet18_cifar10"):
        (repo / "configs" / f"{name}.yaml").write_text(f"model: {name}\n")
    for script in ("fdnn_nsr.py", "fdnn_vanilla.py", "cnn_nsr.py"):
        (repo / script).write_text(FAKE_TRAINER)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.delenv("FAKE_FAIL", raising=False)
    return repo, calls


def _calls(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _main(repo, out, *extra):
    return reproduce.main(["--repo", str(repo), "--out", str(out), "--python", sys.executable,
                           *extra])


def test_runs_skips_and_reruns_only_missing(fake_repo, tmp_path, capsys):
    repo, calls = fake_repo
    out = tmp_path / "out"
    assert _main(repo, out, "--models", "mlp4", "--seeds", "2", "--epochs", "3") == 0
    assert len(_calls(calls)) == 4  # 2 seeds x (vanilla, nsr)
    table = (out / "table.md").read_text()
    # vanilla: 3.0, 3.1 -> 3.05 ± 0.0707; NSR: 2.0, 2.05 -> 2.025 ± 0.0354
    # gain (3.05 - 2.025)/3.05 = 33.61%; d = (1.0, 1.05): t = 1.025/(0.0354/sqrt 2) = 41,
    # df 1: p = 1 - 2/pi*atan(41) = 0.0155
    assert "| Vanilla       | 3.05±0.07 |" in table
    assert "| Vanilla + NSR | 2.02±0.04 |" in table or "| Vanilla + NSR | 2.03±0.04 |" in table
    assert "33.61%" in table
    p = 1 - 2 / math.pi * math.atan(41)
    assert stats.format_pvalue(p) in table
    assert (out / "table.csv").read_text().splitlines()[0] == "Model,MLP-4"
    assert (out / "curves.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mlp4"]["summary"]["paired_n"] == 2
    assert summary["mlp4"]["nsr"]["1"]["test_error"] == pytest.approx(2.05)

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("mlp4/*/seed*/metrics.json")}
    assert len(mtimes) == 4
    capsys.readouterr()
    assert _main(repo, out, "--models", "mlp4", "--seeds", "2", "--epochs", "3") == 0
    assert len(_calls(calls)) == 4  # nothing re-trained
    assert capsys.readouterr().out.count("skipped (finished)") == 4
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    # Losing one run's metrics.json re-runs that run only (resumed: its last.pt is still there).
    (out / "mlp4" / "nsr" / "seed1" / "metrics.json").unlink()
    assert _main(repo, out, "--models", "mlp4", "--seeds", "2", "--epochs", "3") == 0
    new = _calls(calls)[4:]
    assert [(c["variant"], c["seed"], c["resume"]) for c in new] == [("nsr", 1, True)]
    for p, t in mtimes.items():
        if "nsr/seed1" not in p.as_posix():
            assert p.stat().st_mtime_ns == t


def test_interrupted_and_stale_runs(fake_repo, tmp_path):
    repo, calls = fake_repo
    out = tmp_path / "out"
    interrupted = reproduce.run_dir(out, "mlp4", "vanilla", 0)
    interrupted.mkdir(parents=True)
    (interrupted / "last.pt").write_text("x")
    (interrupted / "metrics.json").write_text(json.dumps({"finished": False}))
    stale = reproduce.run_dir(out, "mlp4", "nsr", 0)
    stale.mkdir(parents=True)
    (stale / "metrics.json").write_text("{truncated")  # no last.pt: start again
    assert reproduce.run_state(interrupted) == "resumable"
    assert reproduce.run_state(stale) == "stale"
    assert reproduce.run_state(tmp_path / "nowhere") == "new"
    assert _main(repo, out, "--models", "mlp4", "--seeds", "1") == 0
    got = {c["variant"]: c for c in _calls(calls)}
    assert got["vanilla"]["resume"] and not got["vanilla"]["overwrite"]
    assert got["nsr"]["overwrite"] and not got["nsr"]["resume"]


def test_failure_is_reported_and_others_continue(fake_repo, tmp_path, monkeypatch, capsys):
    repo, calls = fake_repo
    out = tmp_path / "out"
    monkeypatch.setenv("FAKE_FAIL", "nsr1")
    assert _main(repo, out, "--models", "mlp4", "--seeds", "3") == 1
    assert len(_calls(calls)) == 6  # the failure did not stop the seeds after it
    captured = capsys.readouterr()
    assert "mlp4 nsr     seed 1: FAILED (exit code 3)" in captured.out
    assert "  | RuntimeError: boom" in captured.out  # the stderr tail, as it happens
    assert "1 of 6 runs failed" in captured.err
    assert "mlp4 nsr     seed 1: exit code 3: RuntimeError: boom" in captured.err  # and at the end
    assert "mlp4-nsr-seed1.stderr.log" in captured.err
    # the table is still written from the 5 finished runs
    summary = json.loads((out / "summary.json").read_text())["mlp4"]["summary"]
    assert summary["vanilla_n"] == 3 and summary["nsr_n"] == 2 and summary["paired_n"] == 2
    # the next invocation retries only the failed run
    monkeypatch.delenv("FAKE_FAIL")
    assert _main(repo, out, "--models", "mlp4", "--seeds", "3") == 0
    assert [(c["variant"], c["seed"]) for c in _calls(calls)[6:]] == [("nsr", 1)]


def test_fail_fast_starts_nothing_after_a_failure(fake_repo, tmp_path, monkeypatch, capsys):
    repo, calls = fake_repo
    monkeypatch.setenv("FAKE_FAIL", "vanilla0")
    assert _main(repo, tmp_path / "out", "--models", "mlp4", "--seeds", "2", "--fail-fast") == 1
    assert len(_calls(calls)) == 1
    assert capsys.readouterr().out.count("not started (--fail-fast)") == 3


def test_commands_lambda_from_extra_and_cnn(fake_repo, tmp_path, capsys):
    repo, calls = fake_repo
    out = tmp_path / "out"
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"parameters": {"lambda": 0.25}, "value": 97.1}))
    best6 = tmp_path / "best6.json"
    best6.write_text(json.dumps({"parameters": {"lambda": [0.1, 0.2], "queue_batches": 10,
                                                "nsr_layer": "fc4"}}))
    assert _main(repo, out, "--models", "mlp4", "mlp6", "resnet18_cifar10", "--seeds", "1",
                 "--lambda-from", str(best), f"mlp6={best6}", "--dataset", "digits",
                 "--extra", "--max-steps 5", "--dry-run") == 0
    text = capsys.readouterr().out
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("$")]
    assert len(lines) == 6 and not _calls(calls)  # dry run trains nothing
    mlp4_nsr = next(l for l in lines if "fdnn_nsr.py" in l and "mlp4.yaml" in l)
    assert "--lambda 0.25" in mlp4_nsr and "--dataset digits" in mlp4_nsr and "--max-steps 5" in mlp4_nsr
    mlp6_nsr = next(l for l in lines if "fdnn_nsr.py" in l and "mlp6.yaml" in l)
    assert "--lambda 0.1 0.2" in mlp6_nsr
    assert "--queue-batches 10" in mlp6_nsr and "--nsr-layers fc4" in mlp6_nsr
    assert all("--queue-batches" not in l for l in lines if "fdnn_vanilla.py" in l)
    assert all("--lambda" not in l for l in lines if "fdnn_vanilla.py" in l)
    cnn = [l for l in lines if "resnet18_cifar10.yaml" in l]
    assert all("cnn_nsr.py" in l for l in cnn)
    assert sum("--no-nsr" in l for l in cnn) == 1

    # really run the CNN pair and one MLP with the λ file
    assert _main(repo, out, "--models", "resnet18_cifar10", "--seeds", "1",
                 "--lambda-from", str(best)) == 0
    got = {c["variant"]: c for c in _calls(calls)}
    assert got["nsr"]["lambda"] == [0.25] and got["vanilla"]["lambda"] is None


def test_changed_settings_retrain(fake_repo, tmp_path, capsys):
    repo, calls = fake_repo
    out = tmp_path / "out"
    assert _main(repo, out, "--models", "mlp4", "--seeds", "1", "--epochs", "2") == 0
    assert len(_calls(calls)) == 2
    # same folder, more epochs: the finished 2-epoch runs do not count as done
    assert _main(repo, out, "--models", "mlp4", "--seeds", "1", "--epochs", "4") == 0
    new = _calls(calls)[2:]
    assert len(new) == 2 and all(c["overwrite"] and c["epochs"] == 4 for c in new)
    assert "epochs 2 != 4" in capsys.readouterr().out


def _fabricate(out, model, variant, seed, err, val_accs):
    folder = reproduce.run_dir(out, model, variant, seed)
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "model": model, "seed": seed, "test_error": err, "finished": True,
        "history": [{"val_acc": v} for v in val_accs]}))


def test_table_only_on_fabricated_runs(tmp_path, capsys):
    out = tmp_path / "out"
    # MLP-3: vanilla (3.0, 3.2, 3.1), NSR (2.8, 2.9, 3.0) -> the df=2 case of test_stats:
    # means 3.10 / 2.90, stds 0.10 / 0.10, gain 0.2/3.1 = 6.45%, p = 1 - sqrt(12/14) = 0.074
    for seed, (v, n) in enumerate([(3.0, 2.8), (3.2, 2.9), (3.1, 3.0)]):
        _fabricate(out, "mlp3", "vanilla", seed, v, [90, 91, 92])
        _fabricate(out, "mlp3", "nsr", seed, n, [91, 92, 93 + seed])
    # MLP-10: a single vanilla run, and an unfinished NSR run that must be ignored
    _fabricate(out, "mlp10", "vanilla", 0, 3.06, [88, 89])
    unfinished = reproduce.run_dir(out, "mlp10", "nsr", 0)
    unfinished.mkdir(parents=True)
    (unfinished / "metrics.json").write_text(json.dumps({"finished": False, "test_error": 1.0}))
    assert reproduce.main(["--out", str(out), "--table-only"]) == 0
    rows = [line.split(",") for line in (out / "table.csv").read_text().splitlines()]
    assert rows == [["Model", "MLP-3", "MLP-10"],  # natural order: 3 before 10
                    ["Vanilla", "3.10±0.10", "3.06"],
                    ["Vanilla + NSR", "2.90±0.10", "n/a"],
                    ["Gain", "6.45%", "n/a"],
                    ["p-value", "0.074", "n/a"]]
    assert (out / "curves.png").exists()
    assert "| p-value" in capsys.readouterr().out
    x, mean, std = reproduce._curve_stats([[91, 92, 93], [91, 92, 94], [91, 92, 95], [90]])
    assert list(x) == [1, 2, 3] and mean[2] == pytest.approx(94) and std[2] == pytest.approx(1)
    assert std[0] == pytest.approx(0.5)  # (91, 91, 91, 90): sd ddof=1 = sqrt(0.75/3)
    assert reproduce.main(["--out", str(tmp_path / "empty"), "--table-only"]) == 1


def test_errors_for_bad_input(fake_repo, tmp_path, capsys):
    repo, _ = fake_repo
    assert _main(repo, tmp_path / "o", "--models", "mlp5", "--seeds", "1") == 2
    assert "no config for mlp5" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"parameters": {"lr": 0.1}}))
    with pytest.raises(SystemExit, match="no parameters.lambda"):
        _main(repo, tmp_path / "o", "--models", "mlp4", "--lambda-from", str(bad))
    assert reproduce.display_name("mlp10") == "MLP-10"
    assert reproduce.display_name("vgg19_cifar10") == "VGG-19"


ENGINE_READY = all((REPO / f).is_file() for f in ("fdnn_nsr.py", "fdnn_vanilla.py",
                                                  "configs/mlp4.yaml", "nsr/engine.py"))


@pytest.mark.skipif(not ENGINE_READY, reason="training scripts not present")
def test_real_digits_runs_skip_and_rerun(tmp_path, capsys):
    out = tmp_path / "digits"
    args = ["--models", "mlp4", "--seeds", "2", "--dataset", "digits", "--epochs", "2",
            "--out", str(out)]
    assert reproduce.main(args + ["--jobs", "2"]) == 0  # 2 cores: two runs at once
    metrics = sorted(out.glob("mlp4/*/seed*/metrics.json"))
    assert len(metrics) == 4
    for path in metrics:
        m = json.loads(path.read_text())
        assert m["finished"] is True and len(m["history"]) == 2
    rows = (out / "table.csv").read_text().splitlines()
    assert rows[0] == "Model,MLP-4" and rows[1].startswith("Vanilla,") and "±" in rows[1]
    assert (out / "curves.png").exists()

    mtimes = {p: p.stat().st_mtime_ns for p in metrics}
    capsys.readouterr()
    assert reproduce.main(args) == 0
    assert capsys.readouterr().out.count("skipped (finished)") == 4
    assert {p: p.stat().st_mtime_ns for p in metrics} == mtimes

    target = out / "mlp4" / "vanilla" / "seed1" / "metrics.json"
    target.unlink()
    assert reproduce.main(args) == 0
    text = capsys.readouterr().out
    assert text.count("skipped (finished)") == 3 and "mlp4 vanilla seed 1: done" in text
    assert json.loads(target.read_text())["finished"] is True
    for p, t in mtimes.items():
        if p != target:
            assert p.stat().st_mtime_ns == t
