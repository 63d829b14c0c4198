"""The baselines as options of the training scripts: center loss, label smoothing and dropout,
through fdnn_nsr.py and fdnn_vanilla.py (recorded, resumable, checked, and against their formulas)."""

import json
import math

import pytest
import torch
import yaml

from models import MLP_HIDDEN
from nsr.train.build import setup_runtime
from nsr.train.checkpoint import load_checkpoint
from nsr.train.config import CLI_ONLY, parse_args
from nsr.train.engine import Trainer, train
from nsr.train.errors import UserError
from nsr.train.outdir import OutputFolder
from tests.helpers import DIGITS as FAST
from tests.helpers import assert_error, run_in_process, without_times


def script(name, *args):
    result = run_in_process(name, *args)
    assert result.code == 0 and result.err == "", result.err


def test_each_option_runs_through_the_script_and_is_recorded(tmp_path):
    out = tmp_path / "run"
    script("fdnn_nsr.py", *FAST, "--max-steps", "3", "--regularizer", "center", "--center-alpha", "0.3",
           "--label-smoothing", "0.1", "--dropout", "0.2", "--lambda", "0.5", "--out", str(out))
    m = json.loads((out / "metrics.json").read_text())
    assert (m["regularizer"], m["center_alpha"], m["label_smoothing"], m["dropout"]) == ("center", 0.3, 0.1, 0.2)
    assert m["lambda"] == [0.5] and m["regularized_layers"] == ["out"]
    assert m["partial_epoch"]["reg_loss"] > 0, "the center loss is reported in the reg_loss column"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["regularizer"], saved["center_alpha"], saved["label_smoothing"], saved["dropout"]) == \
        ("center", 0.3, 0.1, 0.2)
    # its keys run again (nsr: true and regularizer: center do not contradict)
    keys = {k: v for k, v in saved.items() if k not in CLI_ONLY | {"out"}}
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(keys))
    script("fdnn_nsr.py", "--config", str(tmp_path / "again.yaml"), "--out", str(tmp_path / "again"))
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert without_times([again["partial_epoch"]]) == without_times([m["partial_epoch"]])

    vanilla = tmp_path / "vanilla"
    script("fdnn_vanilla.py", *FAST, "--max-steps", "2", "--out", str(vanilla))
    v = json.loads((vanilla / "metrics.json").read_text())
    assert (v["regularizer"], v["center_alpha"], v["lambda"]) == ("none", None, [])


def test_explicit_nsr_defaults_train_exactly_like_the_default_run(tmp_path):
    default = train(parse_args([*FAST, "--max-steps", "12", "--out", str(tmp_path / "a")]))
    explicit = train(parse_args([*FAST, "--max-steps", "12", "--out", str(tmp_path / "b"), "--regularizer",
                                 "nsr", "--label-smoothing", "0", "--dropout", "0", "--regularizer", "nsr"]))
    assert without_times([default["partial_epoch"]]) == without_times([explicit["partial_epoch"]])
    a, b = (load_checkpoint(str(tmp_path / d / "last.pt")) for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["regularizer"][k], b["regularizer"][k]) for k in a["regularizer"])


def test_center_loss_with_lambda_zero_trains_the_vanilla_weights(tmp_path):
    train(parse_args([*FAST, "--max-steps", "8", "--regularizer", "none", "--out", str(tmp_path / "v")]))
    train(parse_args([*FAST, "--max-steps", "8", "--regularizer", "center", "--lambda", "0",
                      "--out", str(tmp_path / "c")]))
    v, c = (load_checkpoint(str(tmp_path / d / "last.pt")) for d in "vc")
    assert all(torch.equal(v["model"][k], c["model"][k]) for k in v["model"])
    assert c["regularizer"]["centers_0"].abs().sum() > 0, "the centres moved even though lambda is 0"


def test_one_step_losses_and_centres_match_the_formulas(tmp_path):
    """First step by hand: CE with label smoothing eps is (1-eps)(-log p_y) + eps * mean_k(-log p_k);
    center loss with the centres at 0 is lambda/2 * mean_i ||z_i||^2; then c_j = alpha sum_j z / (1+n_j)."""
    eps, lam, alpha = 0.2, 0.5, 0.3
    cfg = parse_args([*FAST, "--regularizer", "center", "--lambda", str(lam), "--center-alpha", str(alpha),
                      "--label-smoothing", str(eps), "--out", str(tmp_path / "x")])
    trainer = Trainer(cfg, setup_runtime(cfg), OutputFolder(cfg.out, writer=False))
    xb, yb = next(iter(trainer.data.train.iterate(0, 0)))
    trainer.model.eval()  # no dropout here; eval mode keeps the center-loss hook from capturing
    with torch.no_grad():
        z = trainer.model(xb).double()
    trainer.model.train()
    ce, center = 0.0, 0.0
    for row, label in zip(z.tolist(), yb.tolist()):
        log_norm = math.log(sum(math.exp(v) for v in row))
        nll = [log_norm - v for v in row]
        ce += (1 - eps) * nll[label] + eps * sum(nll) / len(nll)
        center += 0.5 * sum(v * v for v in row)
    n = len(yb)
    trainer.train_step(xb, yb)
    got = trainer.meter.summary()
    assert got["ce_loss"] == pytest.approx(ce / n, rel=1e-5)
    assert got["reg_loss"] == pytest.approx(lam * center / n, rel=1e-5)
    for j in range(10):
        rows = z[yb == j]
        expected = alpha * rows.sum(0) / (1 + len(rows))
        assert torch.allclose(trainer.reg.centers()[j].double(), expected, atol=1e-5), j


def test_dropout_puts_one_dropout_after_each_hidden_layer(tmp_path):
    cfg = parse_args([*FAST, "--dropout", "0.3", "--regularizer", "none", "--out", str(tmp_path / "x")])
    trainer = Trainer(cfg, setup_runtime(cfg), OutputFolder(cfg.out, writer=False))
    rates = [m.p for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates == [0.3] * len(MLP_HIDDEN["mlp4"])


@pytest.mark.parametrize("change", [["--label-smoothing", "0.1"], ["--dropout", "0.1"],
                                    ["--regularizer", "center"], ["--center-alpha", "0.1"]])
def test_resume_with_a_changed_baseline_setting_is_refused(tmp_path, change):
    base = [*FAST, "--max-steps", "2", "--out", str(tmp_path / "r")]
    if "--center-alpha" in change:  # an NSR run reads no center_alpha: that flag is refused there
        base += ["--regularizer", "center"]
    train(parse_args(base))
    with pytest.raises(UserError, match="settings differ"):
        train(parse_args([*base, "--max-steps", "4", "--resume", *change]))


@pytest.mark.parametrize("args, words", [
    (["--label-smoothing", "1.5"], "label_smoothing"),
    (["--label-smoothing", "1"], "label_smoothing"),
    (["--dropout", "-0.1"], "dropout"),
    (["--model", "resnet18", "--dropout", "0.1"], "dropout"),
    (["--regularizer", "foo"], "regularizer"),
    (["--center-alpha", "2"], "center_alpha"),
    (["--center-alpha", "nan"], "center_alpha"),
    (["--regularizer", "center", "--active-only"], "active_only"),
])
def test_bad_baseline_settings_are_one_error_line(tmp_path, args, words):
    out = tmp_path / "out"
    assert_error(run_in_process("fdnn_nsr.py", "--dataset", "digits", "--epochs", "1", "--out", str(out), *args),
                 words)
    assert not out.exists()
