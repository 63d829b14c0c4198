"""python -m nsr compare: the tuning choice, the final table's statistics and the sensitivity sweep, with a
stand-in for training that writes metrics.json from each run's real parsed config (fast and
deterministic). Training itself is tested elsewhere; the real scripts and the compare stages
meet in test_baseline_options.py's options and test_reproduce.py's end-to-end run."""

import json
import math

import pytest
from scipy import stats as scipy_stats

from nsr.experiments import compare
from nsr.train.config import parse_args as parse_config

SEEDS = 5
VANILLA = [12.0, 12.3, 11.8, 12.4, 12.1]
NSR_OFFSET = [-0.5, -0.7, -0.4, -0.9, -0.6]     # NSR = vanilla + offset, per seed
CENTER_OFFSET = [-0.2, -0.9, 0.1, -0.3, -0.6]


def fake_outcome(cfg) -> tuple[float, float] | None:
    """(validation accuracy, test error) a run 'reaches'; None: the run fails."""
    s = cfg.seed % SEEDS
    if cfg.regularizer == "nsr":
        lam = cfg.lambda_[0]
        if cfg.queue_batches != 5:
            return 80.0, 20.0 + cfg.queue_batches  # K sweep: 21, 40
        return 90 - math.log10(lam) ** 2, VANILLA[s] + NSR_OFFSET[s] + abs(math.log10(lam))
    if cfg.regularizer == "center":
        lam = cfg.lambda_[0]
        if lam == 1:
            return None  # diverges
        return 80 + 10 * lam, VANILLA[s] + CENTER_OFFSET[s]
    if cfg.label_smoothing:
        return 85.0, VANILLA[s] - 0.1  # every ε the same: the first wins the tie
    if cfg.dropout:
        return 88 - abs(cfg.dropout - 0.2), VANILLA[s] + 0.2
    return 84.0, VANILLA[s]


@pytest.fixture
def fake_training(monkeypatch):
    trained = []

    def run_all(runs, log_dir, jobs, fail_fast=False):
        failures = []
        for run in runs:
            if run.state == "finished":
                continue
            cfg = parse_config(run.command[2:])
            trained.append(cfg)
            outcome = fake_outcome(cfg)
            if outcome is None:
                failures.append(f"{run.label}: diverged")
                continue
            run.folder.mkdir(parents=True, exist_ok=True)
            val, err = outcome
            (run.folder / "metrics.json").write_text(json.dumps(
                {"finished": True, "best_val_acc": val, "test_error": err, "train_time_s": 54.0,
                 "eval_time_s": 6.0, "history": [{"val_acc": val}]}))
        return failures

    monkeypatch.setattr(compare, "run_all", run_all)
    return trained


def hand_paired_p(a, b):
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    t = mean / (sd / math.sqrt(n))
    return 2 * scipy_stats.t.sf(abs(t), n - 1)


def test_tuning_choice_table_and_sweep(tmp_path, fake_training, capsys):
    out = tmp_path / "cmp"
    code = compare.main(["--out", str(out), "--dataset", "digits", "--models", "mlp4"])
    assert code == 0  # a diverged tuning run is an outcome of the grid: a warning, never chosen
    err = capsys.readouterr().err
    assert "no finished tuning run for 1 (failed or diverged)" in err

    chosen = json.loads((out / "chosen.json").read_text())
    assert chosen["tune_epochs"] == 30 and chosen["tune_seed"] == 100
    assert chosen["chosen"]["mlp4"] == {"nsr": 1, "center": 0.3, "label_smoothing": 0.03, "dropout": 0.2}
    tuning_runs = [c for c in fake_training if c.seed == 100]
    assert len(tuning_runs) == 20 and all(c.epochs == 30 for c in tuning_runs)
    final_runs = [c for c in fake_training if c.seed < 100 and c.epochs == 100]
    assert {c.seed for c in final_runs} == set(range(5))

    table = (out / "final" / "comparison.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    nsr = [v + o for v, o in zip(VANILLA, NSR_OFFSET)]
    center = [v + o for v, o in zip(VANILLA, CENTER_OFFSET)]
    assert rows["Vanilla"][1] == "12.12±0.24"
    nsr_row = rows["Vanilla + NSR"]
    assert nsr_row[0] == "1" and nsr_row[1] == f"{sum(nsr) / 5:.2f}±{scipy_stats.tstd(nsr):.2f}"
    assert nsr_row[3] == f"{hand_paired_p(VANILLA, nsr):.3f}"
    assert rows["Center loss"][0] == "0.3"
    assert rows["Center loss"][4] == f"{hand_paired_p(nsr, center):.3f}"
    gain = 100 * (sum(VANILLA) - sum(center)) / sum(VANILLA)
    assert rows["Center loss"][2] == f"{gain:.2f}%"
    assert rows["Label smoothing"][0] == "0.03" and rows["Vanilla"][5] == "1.0"

    sweep = json.loads((out / "sweep" / "sensitivity.json").read_text())
    assert sweep["dataset"] == "digits"  # the plot's title names it (it once said Fashion-MNIST always)
    points = {(p["axis"], p["lambda"], p["queue_batches"]): p for p in sweep["points"]}
    assert len(points) == 7 + 3
    # λ=1 is the chosen one: its three seeds are the final NSR runs, not retrained
    assert not [c for c in fake_training if c.seed < 100 and c.epochs == 100 and c.regularizer == "nsr"
                and c.lambda_ == [1.0] and c.queue_batches == 5 and c.out.find("sweep") >= 0]
    assert points[("lambda", 1, 5)]["test_error_mean"] == pytest.approx(sum(nsr[:3]) / 3)
    assert points[("lambda", 0.01, 5)]["test_error_mean"] == pytest.approx(sum(nsr[:3]) / 3 + 2)
    assert points[("queue", 1, 20)]["test_error_mean"] == 40 and points[("queue", 1, 20)]["n"] == 3
    assert sweep["vanilla"]["mean"] == pytest.approx(sum(VANILLA[:3]) / 3)
    assert (out / "sweep" / "sensitivity.png").stat().st_size > 10_000
    assert "Center loss" in (out / "report.md").read_text()

    # the same command again trains only the diverged run again
    fake_training.clear()
    compare.main(["--out", str(out), "--dataset", "digits", "--models", "mlp4"])
    assert [(c.regularizer, c.lambda_) for c in fake_training] == [("center", [1.0])]


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "2"], "--sweep-seeds (3) must not exceed --seeds (2)"),
    (["--methods", "center"], "the sweep stage is NSR on MLP-4"),
    (["--jobs", "0"], "--jobs must be at least 1, got 0"),
    (["--data-dir", "/nonexistent/fashion"], "--data-dir /nonexistent/fashion is not a folder"),
])
def test_bad_arguments_are_one_line(tmp_path, argv, message):
    with pytest.raises(compare.UserError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        compare.parse_args(["--out", str(tmp_path / "x"), *argv])
    assert not (tmp_path / "x").exists()
