"""The training engine end to end on digits (no download): outputs, protocol, resume."""

import csv
import json
import os
import time

import pytest
import torch
import yaml

from models import build_model
from nsr.train.checkpoint import load_checkpoint
from nsr.train.config import parse_args
from nsr.train.engine import train

TIMES = {"epoch_time_s", "train_time_s"}
FAST = ["--dataset", "digits", "--batch-size", "32", "--lr", "0.05", "--momentum", "0.9", "--quiet"]


def without_times(history):
    return [{k: v for k, v in row.items() if k not in TIMES} for row in history]


@pytest.mark.parametrize("script_name, nsr", [("fdnn_vanilla.py", False), ("fdnn_nsr.py", True)])
def test_scripts_learn_digits_and_write_every_output(tmp_path, script, script_name, nsr):
    out = tmp_path / "run"
    proc = script(script_name, *FAST, "--epochs", "3", "--out", str(out))
    assert "test error" in proc.stdout
    m = json.loads((out / "metrics.json").read_text())
    for key in ("model", "dataset", "seed", "lambda", "epochs", "num_params", "best_epoch", "best_val_acc",
                "test_acc", "test_error", "train_time_s", "history"):
        assert key in m, key
    assert (m["model"], m["dataset"], m["epochs"], m["finished"], m["regularizer"]) == ("mlp4", "digits", 3, True, "nsr" if nsr else "none")
    assert m["num_params"] == (64 * 256 + 256) + (256 * 100 + 100) + (100 * 10 + 10)
    assert m["test_acc"] > 60, "far above the 10 % of chance after 3 epochs"
    assert abs(m["test_error"] - (100 - m["test_acc"])) < 1e-9
    assert m["lambda"] == ([7.4865] if nsr else [])
    assert len(m["history"]) == 3
    for row in m["history"]:
        assert set(row) >= {"train_loss", "ce_loss", "nsr_loss", "train_acc", "val_acc", "lr", "epoch_time_s"}
        assert abs(row["train_loss"] - row["ce_loss"] - row["nsr_loss"]) < 1e-6
        assert (row["nsr_loss"] > 0) == nsr
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val_acc"]) for r in rows] == [r["val_acc"] for r in m["history"]]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["regularizer"] == ("nsr" if nsr else "none") and saved["dataset"] == "digits"
    assert {"last.pt", "best.pt"} <= set(os.listdir(out))


def test_reported_test_accuracy_is_the_one_at_the_best_validation_epoch(tmp_path):
    out = tmp_path / "run"
    m = train(parse_args([*FAST, "--epochs", "4", "--out", str(out)]))
    vals = [r["val_acc"] for r in m["history"]]
    assert m["best_epoch"] == vals.index(max(vals)) + 1 and m["best_val_acc"] == max(vals)
    # Re-evaluate best.pt on the test set independently of the engine.
    state = load_checkpoint(str(out / "best.pt"))
    assert state["position"]["epoch"] == m["best_epoch"]
    model = build_model("mlp4", 10, (1, 8, 8))
    model.load_state_dict(state["model"])
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    test = np.random.default_rng(12345).permutation(len(d.images))[:360]
    x = torch.from_numpy(np.round(d.images[test] * (255 / 16)).astype(np.uint8)).float().div(255)[:, None]
    acc = (model.eval()(x).argmax(1) == torch.from_numpy(d.target[test])).double().mean().item() * 100
    assert abs(acc - m["test_acc"]) < 1e-9


def test_resume_gives_identical_history(tmp_path):
    straight = train(parse_args([*FAST, "--epochs", "4", "--out", str(tmp_path / "a")]))
    train(parse_args([*FAST, "--epochs", "2", "--out", str(tmp_path / "b")]))
    resumed = train(parse_args([*FAST, "--epochs", "4", "--out", str(tmp_path / "b"), "--resume"]))
    assert without_times(resumed["history"]) == without_times(straight["history"])
    assert resumed["test_acc"] == straight["test_acc"]
    a = load_checkpoint(str(tmp_path / "a" / "last.pt"))
    b = load_checkpoint(str(tmp_path / "b" / "last.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["nsr"][k], b["nsr"][k]) for k in a["nsr"])


def test_max_steps_stop_inside_an_epoch_resumes_like_a_straight_run(tmp_path):
    """digits at batch 32: 36 steps per epoch. --max-steps 15 stops inside epoch 1; resuming with
    --max-steps 50 must run the other 21 steps of epoch 1, then 14 of epoch 2, as a straight run does."""
    straight = train(parse_args([*FAST, "--epochs", "5", "--max-steps", "50", "--out", str(tmp_path / "a")]))
    first = train(parse_args([*FAST, "--epochs", "5", "--max-steps", "15", "--out", str(tmp_path / "b")]))
    assert (first["global_steps"], first["epochs"], first["finished"], first["stopped_by"]) == (15, 0, False, "max_steps")
    assert first["history"] == [] and first["best_epoch"] == -1, "a partial epoch is not a finished one"
    partial = first["partial_epoch"]
    assert (partial["epoch"], partial["step"], partial["of"]) == (1, 15, 36)
    assert 0 <= partial["val_acc"] <= 100 and 0 <= partial["test_acc"] <= 100
    assert not (tmp_path / "b" / "best.pt").exists()
    position = load_checkpoint(str(tmp_path / "b" / "last.pt"))["position"]
    assert (position["epoch"], position["step"], position["global_step"]) == (0, 15, 15)
    resumed = train(parse_args([*FAST, "--epochs", "5", "--max-steps", "50", "--out", str(tmp_path / "b"),
                                "--resume"]))
    assert resumed["global_steps"] == straight["global_steps"] == 50
    assert without_times(resumed["history"]) == without_times(straight["history"])
    assert len(straight["history"]) == 1 and straight["partial_epoch"]["step"] == 14
    assert {k: v for k, v in resumed["partial_epoch"].items()} == straight["partial_epoch"]
    a = load_checkpoint(str(tmp_path / "a" / "last.pt"))
    b = load_checkpoint(str(tmp_path / "b" / "last.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["nsr"][k], b["nsr"][k]) for k in a["nsr"])
    assert torch.equal(a["meter"]["losses"], b["meter"]["losses"])


def test_vanilla_builds_no_regularizer(tmp_path, monkeypatch):
    import nsr.train.build as build

    def forbidden(*args, **kwargs):
        raise AssertionError("vanilla must not build NeuronSteadiness")

    monkeypatch.setattr(build, "NeuronSteadiness", forbidden)
    m = train(parse_args([*FAST, "--regularizer", "none", "--epochs", "1", "--out", str(tmp_path / "v")]))
    assert m["history"][0]["nsr_loss"] == 0.0


def test_a_model_that_cannot_take_the_data_fails_before_training(tmp_path, capsys, monkeypatch):
    import models
    from nsr.train.engine import main

    three_channels = lambda classes, shape, dropout=0.0: torch.nn.Sequential(  # noqa: E731
        torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, classes))
    monkeypatch.setitem(models.MODELS, "mlp4", three_channels)
    with pytest.raises(SystemExit) as exit_info:
        main(argv=[*FAST, "--regularizer", "none", "--epochs", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: model mlp4 cannot take digits's inputs of shape (1, 8, 8) (")
    assert not (tmp_path / "o").exists()


def test_train_time_counts_training_steps_only(tmp_path, monkeypatch):
    import nsr.train.engine as engine

    evaluate = engine.evaluate

    def slow_evaluate(trainer, batches):
        time.sleep(0.3)
        return evaluate(trainer, batches)

    monkeypatch.setattr(engine, "evaluate", slow_evaluate)
    m = train(parse_args([*FAST, "--epochs", "2", "--out", str(tmp_path / "t")]))
    assert m["eval_time_s"] >= 0.3 * 3 - 1e-3  # validation in both epochs, test at least once
    assert m["train_time_s"] == pytest.approx(sum(r["epoch_time_s"] for r in m["history"]))
    assert m["train_time_s"] < 0.9, "counting the evaluations would make it 0.9 s or more"
