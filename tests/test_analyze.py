"""python -m nsr analyze: intra-class variance on models where it is known by construction."""

import json
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import build_model
from nsr.experiments import analyze
from nsr.train.checkpoint import load_checkpoint, save_checkpoint
from tests.helpers import ROOT, assert_one_error_line, fingerprint, run_in_process

REPO = Path(ROOT)


def hand_model():
    """fc: z = (x1, 2*x2 + 1); relu; out: relu1 - relu2."""
    model = nn.Sequential(OrderedDict([
        ("fc", nn.Linear(2, 2)), ("relu", nn.ReLU()), ("out", nn.Linear(2, 1))]))
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        model.fc.bias.copy_(torch.tensor([0.0, 1.0]))
        model.out.weight.copy_(torch.tensor([[1.0, -1.0]]))
        model.out.bias.zero_()
    return model


# class 0: (0,0), (2,0); class 1: (1,1), (1,-1), (1,0)
X = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0], [1.0, -1.0], [1.0, 0.0]])
Y = torch.tensor([0, 1, 0, 1, 1])

# By hand (population variance within each class; weights n_c/N = 2/5 and 3/5):
# fc    class 0: z = (0,1), (2,1)          neuron 1 {0,2}: var 1;   neuron 2 {1,1}: var 0
#       class 1: z = (1,3), (1,-1), (1,1)  neuron 1 {1,1,1}: var 0; neuron 2 {3,-1,1}: mean 1, var 8/3
#       intra = (2/5*1, 3/5*8/3) = (0.4, 1.6); layer mean 1.0
# relu  class 1 becomes (1,3), (1,0), (1,1): neuron 2 {3,0,1}: mean 4/3,
#       var ((5/3)^2 + (4/3)^2 + (1/3)^2)/3 = 42/27 = 14/9
#       intra = (0.4, 3/5*14/9 = 14/15); layer mean (6/15 + 14/15)/2 = 2/3
# out   class 0: {-1, 1}: var 1; class 1: {1-3, 1-0, 1-1} = {-2, 1, 0}: mean -1/3, var 14/9
#       intra = 2/5 + 3/5*14/9 = 4/3 (the largest)
#       total over {-1,-2,1,1,0}: mean -1/5, squared deviations .64+3.24+1.44+1.44+.04 = 6.8 -> 1.36
EXPECTED = {"fc": [0.4, 1.6], "relu": [0.4, 14 / 15], "out": [4 / 3]}


def test_hand_computed_intra_class_variance():
    model = hand_model()
    result = analyze.layer_variances(model, [(X, Y)], num_classes=2)
    assert list(result) == ["fc", "relu", "out"]
    for name, expected in EXPECTED.items():
        np.testing.assert_allclose(result[name]["intra"], expected, rtol=1e-12)
    np.testing.assert_allclose(result["out"]["total"], [1.36], rtol=1e-12)
    assert result["out"]["num_samples"] == 5 and result["out"]["class_counts"] == [2, 3]
    rows = analyze.summarize_layers(result)
    means = {r["layer"]: r["intra_var_mean"] for r in rows}
    assert means == pytest.approx({"fc": 1.0, "relu": 2 / 3, "out": 4 / 3})
    assert rows[2]["intra_share"] == pytest.approx((4 / 3) / 1.36)
    assert analyze.suggest_layer(rows) == "out"


def test_batching_does_not_change_the_numbers():
    # the same samples in batches of 2, 2, 1 (a class missing from the last batch) via Chan's merge
    model = hand_model()
    batches = [(X[:2], Y[:2]), (X[2:4], Y[2:4]), (X[4:], Y[4:])]
    result = analyze.layer_variances(model, batches, num_classes=3)  # class 2 never appears
    for name, expected in EXPECTED.items():
        np.testing.assert_allclose(result[name]["intra"], expected, rtol=1e-12)
    assert result["fc"]["class_counts"] == [2, 3, 0]
    # max_samples cuts after 3 samples: class 0 {(0,0),(2,0)}, class 1 {(1,1)} -> fc neuron 1:
    # 2/3 * 1 + 1/3 * 0 = 2/3; neuron 2: 0
    cut = analyze.layer_variances(model, batches, num_classes=2, max_samples=3)
    np.testing.assert_allclose(cut["fc"]["intra"], [2 / 3, 0.0], atol=1e-12)


def test_suggested_layer_is_the_largest():
    rows = [{"layer": "a", "intra_var_mean": 0.5}, {"layer": "b", "intra_var_mean": 2.0},
            {"layer": "c", "intra_var_mean": float("nan")}, {"layer": "d", "intra_var_mean": 1.0}]
    assert analyze.suggest_layer(rows) == "b"
    # a stage, its last block and the pooling after it measure the same responses: the stage wins
    tie = [{"layer": "layer4", "intra_var_mean": 2.0}, {"layer": "layer4.1", "intra_var_mean": 2.0},
           {"layer": "avgpool", "intra_var_mean": 2.0 * (1 + 1e-12)}, {"layer": "fc", "intra_var_mean": 1.0}]
    assert analyze.suggest_layer(tie) == "layer4"
    assert analyze.suggest_layer([]) is None
    # scale a layer up: the suggestion follows it
    model = hand_model()
    with torch.no_grad():
        model.fc.weight.mul_(10)  # fc intra x100: (40, 160), mean 100; relu x100: mean 66.7
        model.out.weight.div_(100)  # out: inputs x10, weights /100 -> x0.1, intra 4/3 * 0.01
    rows = analyze.summarize_layers(analyze.layer_variances(model, [(X, Y)], num_classes=2))
    assert analyze.suggest_layer(rows) == "fc"
    assert rows[0]["intra_var_mean"] == pytest.approx(100.0)


def test_cnn_outputs_use_per_channel_spatial_means():
    # 1x1 conv with weight 1: each image's response is its spatial mean (channel 0) and
    # 2 x spatial mean (channel 1).
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
        conv.bias.zero_()
    model = nn.Sequential(OrderedDict([("conv", conv), ("act", nn.ReLU())]))
    x = torch.zeros(4, 1, 3, 3)
    x[0] = 1.0                 # class 0, mean 1
    x[1, 0, 0, :] = 9.0        # class 0, mean 3 (one row of 9s in a 3x3 image)
    x[2] = 2.0                 # class 1, mean 2
    x[3] = 2.0                 # class 1, mean 2
    y = torch.tensor([0, 0, 1, 1])
    # channel 0: class 0 {1, 3}: var 1; class 1 {2, 2}: var 0 -> 2/4 * 1 = 0.5; channel 1: 4x -> 2.0
    result = analyze.layer_variances(model, [(x, y)], num_classes=2, layers=["conv", "act"])
    np.testing.assert_allclose(result["conv"]["intra"], [0.5, 2.0])
    np.testing.assert_allclose(result["act"]["intra"], [0.5, 2.0])


def test_candidate_layers_of_the_project_models():
    mlp = build_model("mlp4", 10, (1, 8, 8))
    assert analyze.candidate_layers(mlp) == ["fc1", "relu1", "fc2", "relu2", "out"]
    resnet = build_model("resnet18", 10, (3, 32, 32))
    names = analyze.candidate_layers(resnet)
    for expected in ("relu", "layer1", "layer1.0", "layer4.1", "avgpool", "fc"):
        assert expected in names
    assert "conv1" not in names and "layer1.0.conv1" not in names
    # each BasicBlock's relu runs twice per forward: measured layers leave it out
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 0, 1])
    result = analyze.layer_variances(resnet, [(x, y)], num_classes=2)
    assert "layer1.0.relu" in names and "layer1.0.relu" not in result
    assert result["layer4"]["intra"].shape == (512,) and result["fc"]["intra"].shape == (10,)
    with pytest.raises(ValueError, match="ran 2 times"):
        analyze.layer_variances(resnet, [(x, y)], num_classes=2, layers=["layer1.0.relu"])
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        analyze.layer_variances(resnet, [(x, y)], num_classes=2, layers=["nope"])
    vgg = build_model("vgg19", 10, (3, 32, 32))
    vnames = analyze.candidate_layers(vgg)
    assert vnames[0] == "features" and "features.2" in vnames and vnames[-2:] == ["avgpool", "fc"]
    assert sum(n.startswith("features.") for n in vnames) == 16  # one ReLU per conv block


def test_cli_warmup_then_compare_checkpoints(tmp_path, capsys):
    out = tmp_path / "a"
    assert analyze.main(["--config", str(REPO / "configs" / "mlp4.yaml"), "--dataset", "digits",
                         "--warmup-epochs", "1", "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "analysis.json").read_text())
    means = {r["layer"]: r["intra_var_mean"] for r in report["layers"]}
    assert list(means) == ["fc1", "relu1", "fc2", "relu2", "out"]
    assert report["suggested_layer"] == max(means, key=means.get) == report["plotted_layer"]
    assert f"suggested NSR target: {report['suggested_layer']}" in text
    assert report["num_samples"] == 1437 - 287  # digits: 1437 train images, 20 % held out
    assert (out / "intra_class_variance.png").stat().st_size > 1000
    last = out / "warmup" / "last.pt"
    assert last.is_file()

    # two checkpoints and a chosen layer
    out2 = tmp_path / "b"
    assert analyze.main(["--checkpoint", str(out / "warmup" / "best.pt"), "--compare", str(last),
                         "--dataset", "digits", "--layer", "relu2", "--out", str(out2),
                         "--device", "cpu"]) == 0
    report2 = json.loads((out2 / "analysis.json").read_text())
    assert report2["plotted_layer"] == "relu2"
    per = report2["per_neuron_intra_var"]
    assert len(per["checkpoint"]) == len(per["compare"]) == 100  # MLP-4: [256, 100]
    # after one epoch best.pt and last.pt are the same weights: identical numbers
    np.testing.assert_allclose(per["checkpoint"], per["compare"])
    assert "compare intra" in capsys.readouterr().out


# ------------------------------------------------------------------------------- bad input

def _cli(*args, expect=2):
    """`python -m nsr analyze` in-process, in the current folder; with expect=2 exactly one
    `error:` line on stderr, no traceback."""
    result = run_in_process("-m nsr analyze", *args)
    assert result.code == expect, (args, result.code, result.out, result.err)
    if expect == 2:
        assert_one_error_line(result.err)
    return result


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, digits_reference):
    monkeypatch.chdir(tmp_path)
    shutil.copy(f"{digits_reference[0]}/best.pt", tmp_path / "best.pt")  # MLP-4 trained on digits
    (tmp_path / "folder").mkdir()
    state = load_checkpoint(str(tmp_path / "best.pt"))
    crafted = {  # a checkpoint's format marker with the wrong insides
        "config_list": {**state, "config": [1, 2]},
        "weights_text": {**state, "model": {"fc1.weight": "x"}},
        "model_name": {**state, "config": {**state["config"], "model": "nope"}},
        "epochs_text": {**state, "config": {**state["config"], "epochs": "many"}},
        "wrong_shape": {**state, "model": {**state["model"], "out.weight": torch.zeros(3, 100)}},
    }
    for name, value in crafted.items():
        save_checkpoint({k: v for k, v in value.items() if k not in ("format", "version")}, str(tmp_path / f"{name}.pt"))
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "best.pt").read_bytes()[:300])
    (tmp_path / "a_file").write_text("x")
    best = "best.pt"
    cases = {
        "unknown option --seeds; did you mean --seed?": ["--checkpoint", best, "--seeds", "3"],
        "argument --batch-size: invalid int value: 'x'": ["--checkpoint", best, "--batch-size", "x"],
        "argument --split: invalid choice": ["--checkpoint", best, "--split", "all"],
        "give --config": [],
        "--max-samples must be at least 1": ["--checkpoint", best, "--max-samples", "0"],
        "--warmup-epochs must be at least 1": ["--config", best, "--warmup-epochs", "0"],
        "a_file is a file; give a folder": ["--checkpoint", best, "--out", "a_file"],
        "lies under the file": ["--checkpoint", best, "--out", "a_file/sub"],
        "is a folder; give a checkpoint file": ["--checkpoint", "folder"],
        "not found": ["--checkpoint", "missing.pt"],
        "truncated or not a PyTorch checkpoint": ["--checkpoint", "truncated.pt"],
        "config_list.pt holds no model weights and config": ["--checkpoint", "config_list.pt"],
        "weights_text.pt holds no model weights": ["--checkpoint", "weights_text.pt"],
        "model_name.pt: unknown model 'nope'": ["--checkpoint", "model_name.pt"],
        "epochs expects int, got 'many'": ["--checkpoint", "epochs_text.pt"],
        # a checkpoint of another model, class count or input shape than the data
        "does not fit a mlp4 for 10 classes and inputs (1, 8, 8): out.weight is (3, 100) there":
            ["--checkpoint", "wrong_shape.pt"],
        "does not fit a mlp4 for 10 classes and inputs (1, 28, 28): fc1.weight is (256, 64) there":
            ["--checkpoint", best, "--dataset", "fake"],
        "wrong_shape.pt does not fit a mlp4": ["--checkpoint", best, "--compare", "wrong_shape.pt"],
        "has no layer named 'nope'; candidates: fc1, relu1, fc2, relu2, out": ["--checkpoint", best,
                                                                               "--layer", "nope"],
        "unknown device 'tpu'": ["--checkpoint", best, "--device", "tpu"],
        "val_size must be at least 1": ["--checkpoint", best, "--val-size", "-3"],
    }
    before = fingerprint(tmp_path)
    for expected, args in cases.items():
        result = _cli(*args)
        assert expected in result.err, (args, result.err)
    assert fingerprint(tmp_path) == before  # no runs/ folder, no warm-up, nothing replaced
    # the same checkpoint on the data it was trained on works
    _cli("--checkpoint", best, "--max-samples", "100", "--out", "ok", expect=0)
    assert json.loads((tmp_path / "ok" / "analysis.json").read_text())["num_samples"] == 100


def test_binary_config_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "binary.yaml").write_bytes(b"model: mlp4\n\x80\x81\xff\n")
    result = _cli("--config", "binary.yaml")
    assert "binary.yaml" in result.err and not (tmp_path / "runs").exists()
