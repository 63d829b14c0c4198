"""The training engine end to end on digits (no download): outputs, protocol, resume."""

import csv
import json
import os
import types

import numpy as np
import torch
import yaml
from sklearn.datasets import load_digits

import models
import nsr.train.build as build
import nsr.train.engine as engine
from models import build_model
from nsr.train.checkpoint import load_checkpoint
from nsr.train.config import parse_args
from nsr.train.engine import train
from tests.helpers import DIGITS, DIGITS_EPOCHS, MLP4, STEPS_PER_EPOCH, assert_error, outcome, run_in_process, without_times


def check_every_output(out, m, nsr, epochs):
    for key in ("model", "dataset", "seed", "lambda", "epochs", "num_params", "best_epoch", "best_val_acc",
                "test_acc", "test_error", "train_time_s", "history"):
        assert key in m, key
    assert (m["model"], m["dataset"], m["epochs"], m["finished"], m["regularizer"]) == \
        ("mlp4", "digits", epochs, True, "nsr" if nsr else "none")
    assert m["num_params"] == (64 * 256 + 256) + (256 * 100 + 100) + (100 * 10 + 10)
    assert m["test_acc"] > 60, "far above the 10 % of chance"
    assert abs(m["test_error"] - (100 - m["test_acc"])) < 1e-9
    assert m["lambda"] == ([7.4865] if nsr else [])
    assert len(m["history"]) == epochs
    for row in m["history"]:
        assert set(row) >= {"train_loss", "ce_loss", "reg_loss", "train_acc", "val_acc", "lr", "epoch_time_s"}
        assert abs(row["train_loss"] - row["ce_loss"] - row["reg_loss"]) < 1e-6
        assert (row["reg_loss"] > 0) == nsr
    with open(os.path.join(out, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val_acc"]) for r in rows] == [r["val_acc"] for r in m["history"]]
    with open(os.path.join(out, "config.yaml")) as f:
        saved = yaml.safe_load(f)
    assert saved["regularizer"] == ("nsr" if nsr else "none") and saved["dataset"] == "digits"
    assert {"last.pt", "best.pt"} <= set(os.listdir(out))


def test_fdnn_nsr_learns_digits_and_writes_every_output(digits_reference):
    out, m, stdout = digits_reference  # `python fdnn_nsr.py`, run in-process by the fixture
    assert "test error" in stdout
    check_every_output(out, m, nsr=True, epochs=DIGITS_EPOCHS)


def test_fdnn_vanilla_learns_digits_and_writes_every_output(tmp_path):
    out = str(tmp_path / "run")
    result = run_in_process("fdnn_vanilla.py", *DIGITS, "--epochs", "3", "--out", out)
    assert result.code == 0 and result.err == "", result.err
    assert "test error" in result.out
    with open(os.path.join(out, "metrics.json")) as f:
        check_every_output(out, json.load(f), nsr=False, epochs=3)


def test_reported_test_accuracy_is_the_one_at_the_best_validation_epoch(digits_reference):
    out, m, _ = digits_reference
    vals = [r["val_acc"] for r in m["history"]]
    assert m["best_epoch"] == vals.index(max(vals)) + 1 and m["best_val_acc"] == max(vals)
    # Re-evaluate best.pt on the test set independently of the engine.
    state = load_checkpoint(os.path.join(out, "best.pt"))
    assert state["position"]["epoch"] == m["best_epoch"]
    model = build_model("mlp4", 10, (1, 8, 8))
    model.load_state_dict(state["model"])
    d = load_digits()
    test = np.random.default_rng(12345).permutation(len(d.images))[:360]
    x = torch.from_numpy(np.round(d.images[test] * (255 / 16)).astype(np.uint8)).float().div(255)[:, None]
    acc = (model.eval()(x).argmax(1) == torch.from_numpy(d.target[test])).double().mean().item() * 100
    assert abs(acc - m["test_acc"]) < 1e-9


def assert_same_state(out, reference_out):
    a = load_checkpoint(os.path.join(reference_out, "last.pt"))
    b = load_checkpoint(os.path.join(out, "last.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["regularizer"][k], b["regularizer"][k]) for k in a["regularizer"])
    for key in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][key]["momentum_buffer"],
                           b["optimizer"]["state"][key]["momentum_buffer"])


def test_resume_at_an_epoch_end_gives_identical_history(tmp_path, digits_reference):
    out = str(tmp_path / "b")
    train(parse_args([*DIGITS, "--epochs", "2", "--out", out], default_config=MLP4))
    resumed = train(parse_args([*DIGITS, "--epochs", str(DIGITS_EPOCHS), "--out", out, "--resume"],
                               default_config=MLP4))
    assert outcome(resumed) == outcome(digits_reference[1])
    assert resumed["test_acc"] == digits_reference[1]["test_acc"]
    assert_same_state(out, digits_reference[0])


def test_max_steps_stops_inside_an_epoch_twice_and_resumes_like_a_straight_run(tmp_path, digits_reference):
    """36 steps per epoch. --max-steps 15 stops inside epoch 1; --resume --max-steps 50 runs its
    other 21 steps, then 14 of epoch 2, and stops again; --resume runs to the end. The end is the
    uninterrupted run's, bit for bit (its running sums too)."""
    out = str(tmp_path / "b")
    run = [*DIGITS, "--epochs", str(DIGITS_EPOCHS), "--out", out]
    first = run_in_process("fdnn_nsr.py", *run, "--max-steps", "15")
    assert first.code == 0, first.err
    assert "stopped by --max-steps in epoch 1 at step 15/36" in first.out
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert (m["global_steps"], m["epochs"], m["finished"], m["stopped_by"]) == (15, 0, False, "max_steps")
    assert m["history"] == [] and m["best_epoch"] == -1, "a partial epoch is not a finished one"
    partial = m["partial_epoch"]
    assert (partial["epoch"], partial["step"], partial["of"]) == (1, 15, 36)
    assert 0 <= partial["val_acc"] <= 100 and 0 <= partial["test_acc"] <= 100
    assert not os.path.exists(os.path.join(out, "best.pt"))
    position = load_checkpoint(os.path.join(out, "last.pt"))["position"]
    assert (position["epoch"], position["step"], position["global_step"]) == (0, 15, 15)

    second = run_in_process("fdnn_nsr.py", *run, "--max-steps", "50", "--resume")
    assert second.code == 0, second.err
    assert "stopped by --max-steps in epoch 2 at step 14/36" in second.out
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["global_steps"] == 50 and m["partial_epoch"]["step"] == 14
    assert without_times(m["history"]) == without_times(digits_reference[1]["history"][:1])

    resumed = train(parse_args([*run, "--resume"], default_config=MLP4))
    assert resumed["partial_epoch"] is None
    assert outcome(resumed) == outcome(digits_reference[1])
    assert_same_state(out, digits_reference[0])
    a = load_checkpoint(os.path.join(digits_reference[0], "last.pt"))
    b = load_checkpoint(os.path.join(out, "last.pt"))
    assert torch.equal(a["meter"]["losses"], b["meter"]["losses"])


def test_vanilla_builds_no_regularizer(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("vanilla must not build NeuronSteadiness")

    monkeypatch.setattr(build, "NeuronSteadiness", forbidden)
    m = train(parse_args([*DIGITS, "--regularizer", "none", "--epochs", "1", "--out", str(tmp_path / "v")]))
    assert m["history"][0]["reg_loss"] == 0.0


def test_a_model_that_cannot_take_the_data_fails_before_training(tmp_path, monkeypatch):
    three_channels = lambda classes, shape, dropout=0.0: torch.nn.Sequential(  # noqa: E731
        torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, classes))
    monkeypatch.setitem(models.MODELS, "mlp4", three_channels)
    result = run_in_process("fdnn_vanilla.py", *DIGITS, "--epochs", "1", "--out", str(tmp_path / "o"))
    assert_error(result, "model mlp4 cannot take digits's inputs of shape (1, 8, 8) (")
    assert result.err.startswith("error: model mlp4")
    assert not (tmp_path / "o").exists()


def test_train_time_counts_training_steps_only(tmp_path, monkeypatch):
    """On a clock the test moves (1 s per training step, 100 s per evaluation) the engine's
    timings come out exact, whatever the machine's speed."""
    now, evaluations = [0.0], [0]
    monkeypatch.setattr(engine, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    step, evaluate = engine.Trainer.train_step, engine.evaluate

    def timed_step(self, xb, yb):
        step(self, xb, yb)
        now[0] += 1.0

    def timed_evaluate(trainer, batches, *probe):
        now[0] += 100.0
        evaluations[0] += 1
        return evaluate(trainer, batches, *probe)

    monkeypatch.setattr(engine.Trainer, "train_step", timed_step)
    monkeypatch.setattr(engine, "evaluate", timed_evaluate)
    m = train(parse_args([*DIGITS, "--epochs", "2", "--out", str(tmp_path / "t")]))
    assert [r["epoch_time_s"] for r in m["history"]] == [36.0, 36.0]
    assert m["train_time_s"] == 72.0, "evaluations are not training time"
    assert evaluations[0] >= 3 and m["eval_time_s"] == 100.0 * evaluations[0]  # validation twice, test at least once


def test_best_on_tie_picks_the_first_or_the_latest_epoch_of_the_best_validation(tmp_path, monkeypatch):
    """Scripted validation accuracies 50, 60, 60, 55 (the test accuracy is 70 + the epoch): the
    first epoch of the best is 2, the latest (the original code's >=) is 3, and a resume of a
    'latest' run keeps its best epoch."""
    calls = {"val": 0, "test": 0}

    def scripted(trainer, batches, probe=None):  # (top-1, top-5, steadiness figures)
        if batches is trainer.data.val:
            calls["val"] += 1
            return [50.0, 60.0, 60.0, 55.0][(calls["val"] - 1) % 4], 99.0, {}
        calls["test"] += 1
        return 70.0 + trainer.pos.epoch + 1, 99.0, {}  # pos.epoch counts finished epochs

    monkeypatch.setattr(engine, "evaluate", scripted)
    for rule, best in (("first", 2), ("latest", 3)):
        calls["val"] = 0
        out = str(tmp_path / rule)
        args = (*DIGITS, "--epochs", "4", "--out", out, "--best-on-tie", rule)
        # stopped after epoch 3, then resumed: the saved best epoch passes the checkpoint's checks
        stopped = run_in_process("fdnn_nsr.py", *args, "--max-steps", str(3 * STEPS_PER_EPOCH))
        assert stopped.code == 0, stopped.err
        result = run_in_process("fdnn_nsr.py", *args, "--resume")
        assert result.code == 0, result.err
        with open(os.path.join(out, "metrics.json")) as f:
            m = json.load(f)
        assert (m["best_epoch"], m["best_val_acc"], m["test_acc"]) == (best, 60.0, 70.0 + best)
