"""python -m nsr reproduce and python -m nsr report: planning, skip/resume/refuse, failures, N variants, tables, curves,
and bad input through the real entry points.

Most tests drive the runner against a stand-in training script that parses its flags with the
real nsr.train.config (fast, deterministic), run in-process in place of the runner's subprocess
(test_failure_is_reported_... runs it as real processes); test_real_digits_runs_skip_and_rerun runs
the real scripts on scikit-learn's digits. Bad input goes through `python -m nsr reproduce|report`
in-process (tests/helpers.run_in_process); test_entry_points.py runs each command once as a process.
"""

import contextlib
import json
import math
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import psutil
import pytest

from nsr.experiments import curves, report, reproduce, runner, stats
from nsr.experiments.runner import Variant
from nsr.train.checkpoint import save_checkpoint
from tests.helpers import ROOT, assert_one_error_line, fingerprint, run_in_process

REPO = Path(ROOT)

FAKE_TRAINER = textwrap.dedent('''
    import json, os, sys, yaml
    from nsr.train.config import parse_args, to_dict
    cfg = parse_args(sys.argv[1:])
    variant = "nsr" if (cfg.regularizer != "none") else "vanilla"
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps({"variant": variant, "seed": cfg.seed, "resume": cfg.resume,
                            "overwrite": cfg.overwrite, "lambda": cfg.lambda_ if (cfg.regularizer != "none") else None,
                            "epochs": cfg.epochs, "dataset": cfg.dataset, "argv": sys.argv[1:],
                            "queue_batches": cfg.queue_batches, "regularized_layers": cfg.regularized_layers}) + "\\n")
    if os.environ.get("FAKE_FAIL") == f"{variant}{cfg.seed}":
        print("Traceback (most recent call last):\\nRuntimeError: boom", file=sys.stderr)
        sys.exit(3)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(cfg), f)
    # test error: vanilla 3.0 + 0.1*seed, NSR 2.0 + 0.05*seed, minus 0.01 per queue batch beyond 5
    err = (2.0 + 0.05 * cfg.seed - 0.01 * (cfg.queue_batches - 5)) if (cfg.regularizer != "none") else (3.0 + 0.1 * cfg.seed)
    hist = [{"val_acc": 50 + 10 * e + (5 if (cfg.regularizer != "none") else 0) + cfg.seed} for e in range(cfg.epochs)]
    from nsr.train.checkpoint import save_checkpoint
    save_checkpoint({"config": to_dict(cfg)}, os.path.join(cfg.out, "last.pt"))  # the settings a tool reads
    with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
        json.dump({"model": cfg.model, "dataset": cfg.dataset, "seed": cfg.seed, "epochs": cfg.epochs,
                   "test_error": err, "test_acc": 100 - err, "finished": True, "history": hist}, f)
''')


# FAKE_TRAINER's twin for the runner's real processes: the same calls log, failure and test errors,
# without torch (argparse on the flags the runner sets), so that a process costs what Python does.
FAKE_PROCESS = textwrap.dedent('''
    import argparse, json, os, sys
    parser = argparse.ArgumentParser()
    for flag in ("--config", "--out", "--regularizer"):
        parser.add_argument(flag)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    args, _ = parser.parse_known_args()
    variant = "vanilla" if args.regularizer == "none" else "nsr"
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps({"variant": variant, "seed": args.seed, "resume": args.resume,
                            "overwrite": args.overwrite}) + "\\n")
    if os.environ.get("FAKE_FAIL") == f"{variant}{args.seed}":
        print("Traceback (most recent call last):\\nRuntimeError: boom", file=sys.stderr)
        sys.exit(3)
    if os.environ.get("FAKE_WAIT_FOR_SIGTERM"):  # a run still training when its command is stopped
        import signal
        def stop(*_):
            with open(os.environ["FAKE_CALLS"], "a") as f:
                f.write(json.dumps({"stopped": f"{variant}{args.seed}", "pid": os.getpid()}) + "\\n")
            sys.exit(130)
        signal.signal(signal.SIGTERM, stop)
        with open(os.environ["FAKE_CALLS"], "a") as f:
            f.write(json.dumps({"waiting": f"{variant}{args.seed}", "pid": os.getpid()}) + "\\n")
        while True:
            signal.pause()
    os.makedirs(args.out, exist_ok=True)
    err = 2.0 + 0.05 * args.seed if variant == "nsr" else 3.0 + 0.1 * args.seed
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"model": "mlp4", "seed": args.seed, "test_error": err, "finished": True,
                   "history": [{"val_acc": 50.0}]}, f)
''')
_ONE_AT_A_TIME = threading.Lock()  # sys.argv, stdout and stderr are the process's own


class _InProcess:
    """The runner's subprocess.Popen for the stand-in trainer: the same script file, run in this
    process when waited for (its import of torch is what a process would cost); its output goes
    to the run's logs and sys.exit to the return code, as in a process."""

    def __init__(self, command, stdout, stderr, stdin=None, env=None):
        assert command[0] == sys.executable and os.path.isfile(command[1]), command
        self.command, self.stdout, self.stderr = command, stdout, stderr

    def wait(self):
        with _ONE_AT_A_TIME, contextlib.redirect_stdout(self.stdout), contextlib.redirect_stderr(self.stderr):
            saved, sys.argv = sys.argv, self.command[1:]
            try:
                runpy.run_path(self.command[1], run_name="__main__")
                return 0
            except SystemExit as e:
                return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            finally:
                sys.argv = saved


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """A repository whose training scripts are FAKE_TRAINER, run in-process by the runner."""
    monkeypatch.setattr(runner, "subprocess", types.SimpleNamespace(Popen=_InProcess, DEVNULL=subprocess.DEVNULL))
    return _fake_repo(tmp_path, monkeypatch, FAKE_TRAINER)


@pytest.fixture
def fake_repo_in_processes(tmp_path, monkeypatch):
    """A repository whose training scripts are FAKE_PROCESS, started by the runner as real
    processes, as it starts the real scripts."""
    return _fake_repo(tmp_path, monkeypatch, FAKE_PROCESS)


def _fake_repo(tmp_path, monkeypatch, trainer):
    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    for name, text in (("mlp4", "model: mlp4\nepochs: 3\n"), ("mlp6", "model: mlp6\nepochs: 3\n"),
                       ("resnet18_cifar10", "model: resnet18\ndataset: cifar10\nepochs: 3\n")):
        (repo / "configs" / f"{name}.yaml").write_text(text)
    for script in ("fdnn_nsr.py", "cnn_nsr.py"):
        (repo / script).write_text(trainer)
    calls = tmp_path / "calls.jsonl"
    # The fake scripts sit outside the checkout but use its nsr/ and models/, as the real ones do beside them.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.delenv("FAKE_FAIL", raising=False)
    return repo, calls


def _calls(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _main(repo, out, *extra, variants=reproduce.VARIANTS):
    return reproduce.main(["--repo", str(repo), "--out", str(out), *extra], variants=variants)


def test_runs_skips_and_reruns_only_missing(fake_repo, tmp_path, capsys):
    repo, calls = fake_repo
    out = tmp_path / "out"
    assert _main(repo, out, "--models", "mlp4", "--seeds", "2") == 0
    assert len(_calls(calls)) == 4  # 2 seeds x (vanilla, nsr)
    table = (out / "table.md").read_text()
    # vanilla: 3.0, 3.1 -> 3.05 ± 0.0707; NSR: 2.0, 2.05 -> 2.025 ± 0.0354
    # gain (3.05 - 2.025)/3.05 = 33.61%; d = (1.0, 1.05): t = 1.025/(0.0354/sqrt 2) = 41,
    # df 1: p = 1 - 2/pi*atan(41) = 0.0155
    assert _table_cells(out)["Vanilla"] == ["3.05±0.07"]
    assert _table_cells(out)["Vanilla + NSR"] in (["2.02±0.04"], ["2.03±0.04"])
    assert "33.61%" in table
    assert stats.format_pvalue(1 - 2 / math.pi * math.atan(41)) in table
    assert (out / "table.csv").read_text().splitlines()[0] == "Model,MLP-4"
    assert (out / "curves.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mlp4"]["nsr"]["summary"]["paired_n"] == 2
    assert summary["mlp4"]["vanilla"]["summary"]["std"] == pytest.approx(math.sqrt(0.005))
    assert summary["mlp4"]["nsr"]["runs"]["1"]["test_error"] == pytest.approx(2.05)

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("mlp4/*/seed*/metrics.json")}
    assert len(mtimes) == 4
    capsys.readouterr()
    assert _main(repo, out, "--models", "mlp4", "--seeds", "2") == 0
    assert len(_calls(calls)) == 4  # nothing re-trained
    assert capsys.readouterr().out.count("skipped (finished)") == 4
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    # Losing one run's metrics.json re-runs that run only (resumed: its last.pt is still there).
    (out / "mlp4" / "nsr" / "seed1" / "metrics.json").unlink()
    assert _main(repo, out, "--models", "mlp4", "--seeds", "2") == 0
    assert [(c["variant"], c["seed"], c["resume"]) for c in _calls(calls)[4:]] == [("nsr", 1, True)]
    for p, t in mtimes.items():
        if "nsr/seed1" not in p.as_posix():
            assert p.stat().st_mtime_ns == t


def test_interrupted_and_stale_runs(fake_repo, tmp_path):
    repo, calls = fake_repo
    out = tmp_path / "out"
    interrupted = report.run_dir(out, "mlp4", "vanilla", 0)
    interrupted.mkdir(parents=True)
    save_checkpoint({"config": {}}, str(interrupted / "last.pt"))  # (no settings to compare)
    (interrupted / "metrics.json").write_text(json.dumps({"finished": False}))
    stale = report.run_dir(out, "mlp4", "nsr", 0)
    stale.mkdir(parents=True)
    (stale / "metrics.json").write_text("{truncated")  # no last.pt: start again
    assert reproduce.folder_state(interrupted) == "resumable"
    assert reproduce.folder_state(stale) == "stale"
    assert reproduce.folder_state(tmp_path / "nowhere") == "new"
    assert _main(repo, out, "--models", "mlp4", "--seeds", "1") == 0
    got = {c["variant"]: c for c in _calls(calls)}
    assert got["vanilla"]["resume"] and not got["vanilla"]["overwrite"]
    assert got["nsr"]["overwrite"] and not got["nsr"]["resume"]


@pytest.mark.slow  # the runner's real subprocesses: exit code, stderr streamed to the log
@pytest.mark.timeout(300)
def test_failure_is_reported_and_others_continue(fake_repo_in_processes, tmp_path, monkeypatch, capsys):
    repo, calls = fake_repo_in_processes
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
    summary = json.loads((out / "summary.json").read_text())["mlp4"]
    assert summary["vanilla"]["summary"]["n"] == 3 and summary["nsr"]["summary"]["n"] == 2
    assert summary["nsr"]["summary"]["paired_n"] == 2
    # the next invocation retries only the failed run
    monkeypatch.delenv("FAKE_FAIL")
    assert _main(repo, out, "--models", "mlp4", "--seeds", "3") == 0
    assert [(c["variant"], c["seed"]) for c in _calls(calls)[6:]] == [("nsr", 1)]


@pytest.mark.slow  # real processes: the command and its runs
@pytest.mark.timeout(120)
def test_a_stopped_reproduce_stops_its_runs_and_starts_no_more(fake_repo_in_processes, tmp_path, monkeypatch):
    """SIGTERM to `python -m nsr reproduce` alone (a `kill`, a cluster's warning), even when it was
    started with SIGINT ignored as a `&` job is: each run in flight gets SIGTERM (a training script
    then saves last.pt and exits), no queued run starts, and the command exits 130."""
    repo, calls = fake_repo_in_processes
    monkeypatch.setenv("FAKE_WAIT_FOR_SIGTERM", "1")
    command = [sys.executable, "-m", "nsr", "reproduce", "--repo", str(repo), "--out", str(tmp_path / "out"),
               "--models", "mlp4", "--seeds", "3", "--jobs", "2"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    while sum("waiting" in c for c in _calls(calls)) < 2:  # both runs have started (polled, no fixed wait)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)
    finally:  # a failing runner must not leave its runs waiting forever
        for pid in (c["pid"] for c in _calls(calls) if "waiting" in c):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 130, (out, err)
    records = _calls(calls)
    waiting = {c["waiting"]: c["pid"] for c in records if "waiting" in c}
    stopped = {c["stopped"]: c["pid"] for c in records if "stopped" in c}
    assert len(waiting) == 2 and stopped == waiting  # both runs were told, and only they started
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in waiting.values())
    assert err.startswith("interrupted; finished runs are kept") and "Traceback" not in err


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
    best.write_text(json.dumps({"parameters": {"lambda": 0.25, "regularized_layer": "out"}, "value": 97.1}))
    best6 = tmp_path / "best6.json"
    best6.write_text(json.dumps({"parameters": {"lambda": [0.1, 0.2], "queue_batches": 10,
                                                "regularized_layers": ["fc4", "out"]}}))
    assert _main(repo, out, "--models", "mlp4", "mlp6", "resnet18_cifar10", "--seeds", "1",
                 "--lambda-from", str(best), f"mlp6={best6}", "--dataset", "digits",
                 "--extra", "--max-steps 5", "--dry-run") == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()
             if line.strip().startswith("$")]
    assert len(lines) == 6 and not _calls(calls) and not out.exists()  # a dry run touches nothing
    nsr = {m: next(l for l in lines if f"{m}.yaml" in l and "--regularizer nsr" in l)
           for m in ("mlp4", "mlp6", "resnet18_cifar10")}
    assert "fdnn_nsr.py" in nsr["mlp4"] and "cnn_nsr.py" in nsr["resnet18_cifar10"]
    assert "--lambda 0.25 --regularized-layers out" in nsr["mlp4"] and "--dataset digits" in nsr["mlp4"]
    assert nsr["mlp4"].endswith("--max-steps 5")
    assert all(l.count("--regularizer") == 1 for l in lines)
    assert "--lambda 0.1 0.2" in nsr["mlp6"]
    assert "--queue-batches 10" in nsr["mlp6"] and "--regularized-layers fc4 out" in nsr["mlp6"]
    vanilla = [l for l in lines if "--regularizer none" in l]
    assert len(vanilla) == 3 and all("--lambda" not in l and "--queue" not in l for l in vanilla)

    assert _main(repo, out, "--models", "resnet18_cifar10", "--seeds", "1",
                 "--lambda-from", str(best)) == 0
    got = {c["variant"]: c for c in _calls(calls)}
    assert got["nsr"]["lambda"] == [0.25] and got["vanilla"]["lambda"] is None


def test_variants_are_data(fake_repo, tmp_path):
    """A baseline and sweep points are entries of a Variant list: folders, commands, table rows."""
    repo, calls = fake_repo
    out = tmp_path / "out"
    variants = (Variant("vanilla", nsr=False), Variant("nsr"),
                Variant("k10", ("--queue-batches", "10")), Variant("k15", ("--queue-batches", "15")),
                Variant("wd", ("--weight-decay", "0.0005"), nsr=False))
    assert _main(repo, out, "--models", "mlp4", "--seeds", "2", variants=variants) == 0
    got = {(c["argv"][c["argv"].index("--out") + 1].split("/")[-2], c["seed"]): c
           for c in _calls(calls)}
    assert len(got) == 10
    assert got[("k10", 0)]["queue_batches"] == 10 and got[("k15", 1)]["queue_batches"] == 15
    assert "--weight-decay" in got[("wd", 0)]["argv"] and got[("wd", 0)]["variant"] == "vanilla"
    rows = [line.split(",") for line in (out / "table.csv").read_text().splitlines()]
    # k10: errors (1.95, 2.00) -> 1.975 ± 0.035; gain (3.05 - 1.975)/3.05 = 35.25%;
    # d = (1.05, 1.10): sd 0.035355, t = 1.075/(0.035355/sqrt 2) = 43, p = 1 - 2/pi*atan(43)
    assert rows[0] == ["Model", "MLP-4"]
    assert [r[0] for r in rows[1:6]] == ["Vanilla", "Vanilla + NSR", "k10", "k15", "wd"]
    assert rows[3][1] in ("1.98±0.04", "1.97±0.04")
    gain_k10 = next(r for r in rows if r[0] == "Gain: k10")
    assert gain_k10[1] == "35.25%"
    p_k10 = next(r for r in rows if r[0] == "p-value: k10")
    assert p_k10[1] == stats.format_pvalue(1 - 2 / math.pi * math.atan(43))
    assert next(r for r in rows if r[0] == "Gain: wd")[1] == "0.00%"  # same errors as vanilla
    # python -m nsr report alone finds the same variants in the folders and writes the same table
    before = (out / "table.csv").read_text()
    (out / "table.csv").unlink()
    assert report.main([str(out)]) == 0
    assert (out / "table.csv").read_text() == before


def test_changed_settings_are_refused(fake_repo, tmp_path, capsys):
    repo, calls = fake_repo
    out = tmp_path / "out"
    assert _main(repo, out, "--models", "mlp4", "--seeds", "1", "--epochs", "2") == 0
    before = fingerprint(out)
    capsys.readouterr()
    # same folder, more epochs: the finished 2-epoch runs are not what is asked for
    proc = _cli("-m nsr reproduce", "--repo", str(repo), "--out", str(out), "--models", "mlp4",
                "--seeds", "1", "--epochs", "4")
    assert "holds a run with other settings (epochs: 2 -> 4)" in proc.err
    assert "(and 1 more)" in proc.err
    assert len(_calls(calls)) == 2 and fingerprint(out) == before
    # an NSR setting from --extra counts too; execution settings (data dir, device) do not
    proc = _cli("-m nsr reproduce", "--repo", str(repo), "--out", str(out), "--models", "mlp4",
                "--seeds", "1", "--epochs", "2", "--extra", "--queue-batches 7")
    assert "queue_batches: 5 -> 7" in proc.err and fingerprint(out) == before
    assert _main(repo, out, "--models", "mlp4", "--seeds", "1", "--epochs", "2",
                 "--extra", "--device cpu --workers 0") == 0
    assert len(_calls(calls)) == 2


def _fabricate(out, model, variant, seed, err, val_accs):
    folder = report.run_dir(out, model, variant, seed)
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "model": model, "seed": seed, "test_error": err, "finished": True,
        "history": [{"val_acc": v} for v in val_accs]}))


def test_report_on_fabricated_runs(tmp_path, capsys):
    out = tmp_path / "out"
    # MLP-3: vanilla (3.0, 3.2, 3.1), NSR (2.8, 2.9, 3.0) -> the df=2 case of test_stats:
    # means 3.10 / 2.90, stds 0.10 / 0.10, gain 0.2/3.1 = 6.45%, p = 1 - sqrt(12/14) = 0.074
    for seed, (v, n) in enumerate([(3.0, 2.8), (3.2, 2.9), (3.1, 3.0)]):
        _fabricate(out, "mlp3", "vanilla", seed, v, [90, 91, 92])
        _fabricate(out, "mlp3", "nsr", seed, n, [91, 92, 93 + seed])
    # MLP-10: a single vanilla run, and an unfinished NSR run that must be left out
    _fabricate(out, "mlp10", "vanilla", 0, 3.06, [88, 89])
    unfinished = report.run_dir(out, "mlp10", "nsr", 0)
    unfinished.mkdir(parents=True)
    (unfinished / "metrics.json").write_text(json.dumps({"finished": False, "test_error": 1.0}))
    proc = _cli("-m nsr report", str(out), expect=0)
    assert f"warning: {unfinished} is not a finished run" in proc.err
    rows = [line.split(",") for line in (out / "table.csv").read_text().splitlines()]
    assert rows == [["Model", "MLP-3", "MLP-10"],  # natural order: 3 before 10
                    ["Vanilla", "3.10±0.10", "3.06"],
                    ["Vanilla + NSR", "2.90±0.10", "n/a"],
                    ["Gain", "6.45%", "n/a"],
                    ["p-value", "0.074", "n/a"]]
    assert (out / "curves.png").exists() and "| p-value" in proc.out
    assert json.loads((out / "summary.json").read_text())["mlp10"]["vanilla"]["summary"]["std"] is None
    # --table-only of python -m nsr reproduce is the same report; --models narrows the columns
    assert reproduce.main(["--out", str(out), "--table-only", "--models", "mlp10"]) == 0
    assert (out / "table.csv").read_text().splitlines()[0] == "Model,MLP-10"
    x, mean, std = report.curve_stats([[91, 92, 93], [91, 92, 94], [91, 92, 95], [90]])
    assert list(x) == [1, 2, 3] and mean[2] == pytest.approx(94) and std[2] == pytest.approx(1)
    assert std[0] == pytest.approx(0.5)  # (91, 91, 91, 90): sd ddof=1 = sqrt(0.75/3)
    assert report.display_name("mlp10") == "MLP-10"
    assert report.display_name("vgg19_cifar10") == "VGG-19"


def test_report_draws_the_steadiness_of_the_nsr_layer_from_history_csv(tmp_path, monkeypatch):
    """Beside validation accuracy, curves.png compares the NSR layer's steadiness (history.csv's
    intra_var_<layer>) of vanilla and NSR, mean ± std over seeds."""
    out = tmp_path / "out"
    # intra_var_out per epoch: vanilla [4, 3] and [6, 5]; NSR [1, 0.5] and [3, 0.5]
    for seed, (vanilla, nsr) in enumerate([([4.0, 3.0], [1.0, 0.5]), ([6.0, 5.0], [3.0, 0.5])]):
        for variant, values, layers in (("vanilla", vanilla, []), ("nsr", nsr, ["out"])):
            folder = report.run_dir(out, "mlp4", variant, seed)
            folder.mkdir(parents=True)
            (folder / "metrics.json").write_text(json.dumps({
                "model": "mlp4", "seed": seed, "test_error": 2.0, "finished": True, "regularized_layers": layers,
                "history": [{"val_acc": 90.0}, {"val_acc": 91.0}]}))
            (folder / "history.csv").write_text("epoch,val_acc,intra_var_fc1,intra_var_out\n" + "".join(
                f"{e + 1},9{e}.0,7.0,{v}\n" for e, v in enumerate(values)))
    drawn = []
    monkeypatch.setattr(curves, "plot", lambda path, panels: drawn.append(panels) or path)
    _cli("-m nsr report", str(out), expect=0)
    (panel,) = drawn[0]
    assert panel["layer"] == "out"  # the NSR run's layer, not the first column
    assert panel["steadiness"] == {"Vanilla": [[4.0, 3.0], [6.0, 5.0]], "Vanilla + NSR": [[1.0, 0.5], [3.0, 0.5]]}
    x, mean, std = curves.curve_stats(panel["steadiness"]["Vanilla + NSR"])
    assert list(mean) == [2.0, 0.5] and std == pytest.approx([math.sqrt(2), 0.0])
    monkeypatch.undo()
    _cli("-m nsr report", str(out), expect=0)  # and drawn for real
    assert (out / "curves.png").stat().st_size > 0
    (folder / "history.csv").write_bytes(b"\xff\xfe\x00")  # damaged: one line naming the file
    assert "history.csv" in _cli("-m nsr report", str(out)).err


def test_a_variant_from_the_command_line_trains_beside_vanilla_and_nsr(fake_repo, tmp_path):
    repo, calls = fake_repo
    out = tmp_path / "out"
    spec = 'last2=--regularized-layers relu2 out --lambda 0.5 0.25'
    assert _main(repo, out, "--models", "mlp4", "--seeds", "1", "--variant", spec,
                 "--variant", "smooth=--regularizer none --label-smoothing 0.1") == 0
    by_folder = {Path(c["argv"][c["argv"].index("--out") + 1]).parent.name: c for c in _calls(calls)}
    assert sorted(by_folder) == ["last2", "nsr", "smooth", "vanilla"]
    assert by_folder["last2"]["regularized_layers"] == ["relu2", "out"] and by_folder["last2"]["lambda"] == [0.5, 0.25]
    assert by_folder["smooth"]["variant"] == "vanilla" and "--label-smoothing" in by_folder["smooth"]["argv"]
    assert set(_table_cells(out)) >= {"last2", "smooth", "Gain: last2", "p-value: smooth"}
    # the same command again trains nothing: every run, the added ones too, is finished
    assert _main(repo, out, "--models", "mlp4", "--seeds", "1", "--variant", spec,
                 "--variant", "smooth=--regularizer none --label-smoothing 0.1") == 0
    assert len(_calls(calls)) == 4


@pytest.mark.parametrize("spec, message", [
    ("last2", "expected NAME=FLAGS"),
    ("nsr=--lambda 1", "expected NAME=FLAGS"),
    ("../up=--lambda 1", "expected NAME=FLAGS"),
    ("k=--seed 3", "--variant k must not set --seed"),
    ('q=--lambda "1', "No closing quotation"),
    ("typo=--lamda 1", "typo"),
])
def test_a_bad_variant_is_one_error_line_before_anything_runs(fake_repo, tmp_path, spec, message):
    repo, calls = fake_repo
    result = _cli("-m nsr reproduce", "--repo", str(repo), "--out", str(tmp_path / "out"), "--models", "mlp4",
                  "--variant", spec)
    assert message in result.err and not _calls(calls) and not (tmp_path / "out").exists()


def _rebuilt_table(committed, out, seeds_of) -> tuple[list[str], list[str]]:
    """Run folders rebuilt from a committed summary.json (`seeds_of(entry)`: (variant, {seed:
    metrics}) pairs), then `python -m nsr report`: (the rows it writes, the committed rows)."""
    for model, entry in json.loads((committed / "summary.json").read_text()).items():
        for variant, runs in seeds_of(entry):
            for seed, m in runs.items():
                folder = report.run_dir(out, model, variant, int(seed))
                folder.mkdir(parents=True)
                (folder / "metrics.json").write_text(json.dumps({**m, "finished": True}))
    _cli("-m nsr report", str(out), expect=0)
    rows = [[line for line in (folder / "table.md").read_text().splitlines() if line.startswith("|")]
            for folder in (out, committed)]
    return rows[0], rows[1]


def test_report_reads_the_committed_fashion_mnist_layout(tmp_path):
    """The Fashion-MNIST runs of RESULTS.md (run folders are not committed; their per-seed numbers
    are, in summary.json, in its first layout): the rebuilt table is the committed one, digit for digit."""
    got, want = _rebuilt_table(REPO / "results" / "fashion-mnist" / "paper_lambda", tmp_path / "fmnist",
                               lambda entry: ((v, entry[v]) for v in ("vanilla", "nsr")))
    assert got == want and len(got) == 6


def test_report_rebuilds_the_committed_mnist_table_with_the_papers_rows(tmp_path):
    """RESULTS.md's MNIST table, rebuilt the same way, the paper's rows included."""
    got, want = _rebuilt_table(REPO / "results" / "mnist" / "paper_lambda", tmp_path / "mnist",
                               lambda entry: ((v, detail["runs"]) for v, detail in entry.items()))
    assert got == want and got[-1].startswith("| Gain (paper)")


def _table_cells(out):
    """{row label: [cell, ...]} of OUT/table.md."""
    rows = [line.split("|")[1:-1] for line in (out / "table.md").read_text().splitlines() if line.startswith("|")]
    return {row[0].strip(): [cell.strip() for cell in row[1:]] for row in rows}


def test_report_on_the_papers_data_puts_the_papers_rows_beside_ours(tmp_path):
    """MLP-4 and MLP-10 on MNIST get the paper's rows (its README's figures); a column on another data set gets "—", and a table with no such column no paper rows."""
    out = tmp_path / "mnist"
    for model, dataset in (("mlp4", "mnist"), ("mlp10", "mnist"), ("mlp6", "fashion-mnist")):
        for variant, errors in (("vanilla", (2.4, 2.3)), ("nsr", (1.7, 1.6))):
            for seed, error in enumerate(errors):
                folder = report.run_dir(out, model, variant, seed)
                folder.mkdir(parents=True)
                (folder / "metrics.json").write_text(json.dumps(
                    {"finished": True, "dataset": dataset, "test_error": error}))
    _cli("-m nsr report", str(out), expect=0)
    cells = _table_cells(out)
    assert cells["Model"] == ["MLP-4", "MLP-6", "MLP-10"]
    assert cells["Vanilla"] == ["2.35±0.07"] * 3
    assert cells["Vanilla (paper)"] == ["2.29±0.07", "—", "3.06±0.06"]
    assert cells["Vanilla + NSR (paper)"] == ["1.64±0.04", "—", "1.72±0.14"]
    # as the paper prints them; (2.29 - 1.64) / 2.29 and (3.06 - 1.72) / 3.06 give the same
    assert cells["Gain (paper)"] == ["28.38%", "—", "43.79%"]
    _cli("-m nsr report", str(out), "--models", "mlp6", expect=0)
    assert "paper" not in (out / "table.md").read_text()


# ------------------------------------------------------------------------------- bad input

def _cli(command, *args, expect=2):
    """`python -m nsr reproduce|report ...` in-process; with expect=2: exactly one `error:` line on
    stderr, no traceback."""
    result = run_in_process(command, *args)
    assert result.code == expect, (result.code, result.out, result.err)
    if expect == 2:
        assert_one_error_line(result.err)
    return result


def test_bad_arguments_of_reproduce(fake_repo, tmp_path):
    repo, calls = fake_repo
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    out = tmp_path / "out"
    base = ["--repo", str(repo), "--models", "mlp4", "--seeds", "1"]
    cases = {
        "invalid int value: 'x'": ["--out", str(out), *base, "--seeds", "x"],
        "unknown option --sedes": ["--out", str(out), *base, "--sedes", "2"],
        "required: --out": base,
        "--seeds must be between 1": ["--out", str(out), *base, "--seeds", "0"],
        "--first-seed must be between": ["--out", str(out), *base, "--first-seed", "-1"],
        "--jobs must be at least 1": ["--out", str(out), *base, "--jobs", "-2"],
        "is a file; give a folder": ["--out", str(a_file), *base],
        f"lies under the file {a_file}": ["--out", str(a_file / "sub"), *base],
        "no config for mlp5": ["--out", str(out), "--repo", str(repo), "--models", "mlp5"],
        "no config for ../configs/mlp4": ["--out", str(out), "--repo", str(repo), "--models",
                                          "../configs/mlp4"],
        "epochs must be at least 1": ["--out", str(out), *base, "--epochs", "0"],
        "unknown dataset 'nope'": ["--out", str(out), *base, "--dataset", "nope"],
        "--data-dir": ["--out", str(out), *base, "--data-dir", str(a_file)],
        "No closing quotation": ["--out", str(out), *base, "--extra", "--lr '0.1"],
        "--extra must not set --out, --seed": ["--out", str(out), *base, "--extra", "--seed 3 --out x"],
        "unknown option --lrr": ["--out", str(out), *base, "--extra", "--lrr 0.1"],
        "lr expects float": ["--out", str(out), *base, "--extra", "--lr fast"],
        "--models is required": ["--out", str(out), "--repo", str(repo)],
        "argument --out: must not be empty": ["--out", "", *base],
        "argument --data-dir: must not be empty": ["--out", str(out), *base, "--data-dir", " "],
    }
    for expected, argv in cases.items():
        proc = _cli("-m nsr reproduce", *argv)
        assert expected in proc.err, (argv, proc.err)
    assert not out.exists() and a_file.read_text() == "keep me" and not _calls(calls)


def test_bad_lambda_files(fake_repo, tmp_path):
    repo, calls = fake_repo
    out = tmp_path / "out"
    files = {
        "truncated": ('{"parameters": {"lambda": 0.', "cannot read it as JSON"),
        "list": ("[1, 2]", "no parameters.lambda"),
        "nolambda": ('{"parameters": {"lr": 0.1}}', "no parameters.lambda"),
        "negative": ('{"parameters": {"lambda": -1}}', "must be numbers >= 0, got -1"),
        "nan": ('{"parameters": {"lambda": NaN}}', "must be numbers >= 0"),
        "text": ('{"parameters": {"lambda": "abc"}}', "must be numbers >= 0"),
        "bool": ('{"parameters": {"lambda": true}}', "must be numbers >= 0"),
        "nested": ('{"parameters": {"lambda": 1, "queue_batches": {"a": 1}}}', "parameters.queue_batches"),
        "badkey": ('{"parameters": {"lambda": 1, "qeue_batches": 3}}', "unknown option --qeue-batches"),
        "badvalue": ('{"parameters": {"lambda": 1, "queue_batches": "many"}}', "queue_batches expects int"),
    }
    for name, (text, expected) in files.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        proc = _cli("-m nsr reproduce", "--repo", str(repo), "--out", str(out), "--models", "mlp4",
                    "--seeds", "1", "--lambda-from", str(path))
        assert expected in proc.err, (name, proc.err)
    for spec, expected in ((str(tmp_path / "missing.json"), "No such file"),
                           (str(tmp_path), "Is a directory"),
                           (f"mlp6={tmp_path / 'nan.json'}", "'mlp6' is not one of --models")):
        proc = _cli("-m nsr reproduce", "--repo", str(repo), "--out", str(out), "--models", "mlp4",
                    "--lambda-from", spec)
        assert expected in proc.err, (spec, proc.err)
    assert not out.exists() and not _calls(calls)


def test_damaged_run_folders(fake_repo, tmp_path):
    repo, calls = fake_repo
    out = tmp_path / "out"
    assert _main(repo, out, "--models", "mlp4", "--seeds", "1") == 0
    folder = report.run_dir(out, "mlp4", "nsr", 0)
    (folder / "last.pt").write_bytes(b"not a checkpoint")  # the run's settings are its checkpoint's
    before = fingerprint(out)
    proc = _cli("-m nsr reproduce", "--repo", str(repo), "--out", str(out), "--models", "mlp4",
                "--seeds", "1")
    assert f"checkpoint {folder / 'last.pt'} is truncated" in proc.err and fingerprint(out) == before
    (folder / "last.pt").unlink()  # without a checkpoint, config.yaml is what is left to read
    (folder / "config.yaml").write_text("epochs: [unclosed\n")
    before = fingerprint(out)
    proc = _cli("-m nsr reproduce", "--repo", str(repo), "--out", str(out), "--models", "mlp4",
                "--seeds", "1")
    assert f"cannot read {folder / 'config.yaml'}" in proc.err and fingerprint(out) == before
    (folder / "config.yaml").write_text("- a list\n")
    proc = _cli("-m nsr reproduce", "--repo", str(repo), "--out", str(out), "--models", "mlp4")
    assert "is not a mapping of settings" in proc.err
    # python -m nsr report: damaged metrics.json, a test error that is not a number, missing or file OUT
    (folder / "metrics.json").write_text('{"finished": true, "test_err')
    before = fingerprint(out)
    assert f"cannot read {folder / 'metrics.json'}" in _cli("-m nsr report", str(out)).err
    (folder / "metrics.json").write_text('{"finished": true, "test_error": "low"}')
    assert "test_error is 'low', not a number" in _cli("-m nsr report", str(out)).err
    (folder / "metrics.json").write_text('[]')
    assert "holds a JSON list" in _cli("-m nsr report", str(out)).err
    changed = str((folder / "metrics.json").relative_to(out))  # the file this test wrote, nothing else
    assert fingerprint(out) == {**before, changed: fingerprint(out)[changed]}
    assert "does not exist" in _cli("-m nsr report", str(tmp_path / "nowhere")).err
    assert "is not a folder" in _cli("-m nsr report", str(folder / "metrics.json")).err
    assert "no runs in" in _cli("-m nsr report", str(tmp_path / "repo")).err
    assert "no runs for mlp9" in _cli("-m nsr report", str(out), "--models", "mlp9").err
    assert "required: OUT" in _cli("-m nsr report").err
    # a file where a run folder belongs
    (out / "mlp6").write_text("not a folder")
    proc = _cli("-m nsr reproduce", "--repo", str(repo), "--out", str(out), "--models", "mlp6")
    assert f"{out / 'mlp6'} is a file, where the run folder" in proc.err


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_real_digits_runs_skip_and_rerun(tmp_path, capsys):
    """The real scripts as the runner's processes, two at once: their metrics.json make the table;
    a second call trains nothing; a lost metrics.json is trained again, alone."""
    out = tmp_path / "digits"
    args = ["--models", "mlp4", "--seeds", "1", "--dataset", "digits", "--epochs", "2", "--out", str(out)]
    assert reproduce.main(args + ["--jobs", "2"]) == 0  # 2 cores: two runs at once
    metrics = sorted(out.glob("mlp4/*/seed*/metrics.json"))
    assert len(metrics) == 2
    for path in metrics:
        m = json.loads(path.read_text())
        assert m["finished"] is True and len(m["history"]) == 2 and m["dataset"] == "digits"
        assert m["regularizer"] == ("nsr" if "/nsr/" in path.as_posix() else "none")
    vanilla = json.loads((out / "mlp4" / "vanilla" / "seed0" / "metrics.json").read_text())
    rows = (out / "table.csv").read_text().splitlines()
    assert rows[:2] == ["Model,MLP-4", f"Vanilla,{vanilla['test_error']:.2f}"]
    assert (out / "curves.png").exists()

    mtimes = {p: p.stat().st_mtime_ns for p in metrics}
    capsys.readouterr()
    assert reproduce.main(args) == 0
    assert capsys.readouterr().out.count("skipped (finished)") == 2
    assert {p: p.stat().st_mtime_ns for p in metrics} == mtimes

    target = out / "mlp4" / "vanilla" / "seed0" / "metrics.json"
    target.unlink()
    assert reproduce.main(args) == 0
    text = capsys.readouterr().out
    assert text.count("skipped (finished)") == 1 and "mlp4 vanilla seed 0: done" in text
    assert json.loads(target.read_text())["finished"] is True
    for p, t in mtimes.items():
        if p != target:
            assert p.stat().st_mtime_ns == t
