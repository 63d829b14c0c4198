"""cnn_nsr.py on `fake` data for each CNN config: a few steps, every output, resume."""

import json
import os

import pytest
import torch

from nsr.train.checkpoint import load_checkpoint
from nsr.train.config import parse_args
from nsr.train.engine import train
from tests.helpers import ROOT, run_in_process, without_times

SMALL = ["--dataset", "fake", "--fake-size", "40", "--batch-size", "4", "--eval-batch-size", "8",
         "--epochs", "1", "--workers", "0", "--quiet"]
PARAMS = {"resnet18_cifar10": 11_173_962, "vgg19_cifar10": 20_040_522, "resnet50_imagenet": 25_557_032}


@pytest.mark.parametrize("config", [
    "resnet18_cifar10", "vgg19_cifar10",
    # fake ImageNet: ResNet-50 at 224 x 224 through the ImageFolder pipeline, ~10 s on one core
    pytest.param("resnet50_imagenet", marks=[pytest.mark.slow, pytest.mark.timeout(300)])])
def test_cnn_script_runs_each_config_on_fake_data(tmp_path, config):
    out = tmp_path / config
    result = run_in_process("cnn_nsr.py", "--config", os.path.join(ROOT, "configs", f"{config}.yaml"), *SMALL,
                            "--max-steps", "2", "--out", str(out))
    assert result.code == 0 and result.err == "", result.err
    assert "stopped by --max-steps in epoch 1 at step 2/8" in result.out
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_params"] == PARAMS[config]
    assert (m["global_steps"], m["finished"], m["regularizer"], m["regularized_layers"]) == (2, False, "nsr", ["fc"])
    # 2 of the epoch's 8 steps: reported apart, the epoch stays open in last.pt
    assert m["history"] == [] and m["epochs"] == 0
    row = m["partial_epoch"]
    assert (row["epoch"], row["step"], row["of"]) == (1, 2, 8)
    # with 1000 classes and K=1 each sample is alone in its class: its mean is itself, loss 0
    assert (row["reg_loss"] > 0) == (config != "resnet50_imagenet")
    assert abs(row["train_loss"] - row["ce_loss"] - row["reg_loss"]) < 1e-5
    assert 0 <= row["test_acc"] <= 100 and 0 <= row["test_top5_acc"] <= 100
    assert sorted(os.listdir(out)) == ["config.yaml", "history.csv", "last.pt", "metrics.json", "tb"]


def test_cnn_vanilla_and_resume_match_a_straight_run(tmp_path):
    """ResNet-18: BatchNorm statistics, augmentation draws and the NSR memory across a resume;
    10 fake images, 2 held out for validation: 2 steps of 4 per epoch."""
    base = ["--config", os.path.join(ROOT, "configs", "resnet18_cifar10.yaml"), *SMALL,
            "--epochs", "2", "--fake-size", "10", "--queue-batches", "2"]
    straight = train(parse_args([*base, "--out", str(tmp_path / "a")]))
    assert straight["global_steps"] == 4 and straight["history"][1]["reg_loss"] > 0
    train(parse_args([*base, "--epochs", "1", "--out", str(tmp_path / "b")]))
    resumed = train(parse_args([*base, "--out", str(tmp_path / "b"), "--resume"]))
    assert without_times(resumed["history"]) == without_times(straight["history"])
    a = load_checkpoint(str(tmp_path / "a" / "last.pt"))["model"]
    b = load_checkpoint(str(tmp_path / "b" / "last.pt"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # without base's --queue-batches: a vanilla run refuses an NSR flag
    vanilla = train(parse_args([*base[:-2], "--regularizer", "none", "--max-steps", "1", "--out", str(tmp_path / "v")]))
    assert vanilla["partial_epoch"]["reg_loss"] == 0.0 and vanilla["lambda"] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_with_bf16_and_channels_last_resumes(tmp_path):
    # cuDNN's fastest kernels are not bit-reproducible, so on CUDA the resumed run is compared
    # with a tolerance; on CPU the test above asks for identical histories.
    base = ["--config", os.path.join(ROOT, "configs", "resnet18_cifar10.yaml"), *SMALL,
            "--epochs", "2", "--fake-size", "64", "--batch-size", "16", "--device", "cuda"]
    straight = train(parse_args([*base, "--out", str(tmp_path / "a")]))
    train(parse_args([*base, "--epochs", "1", "--out", str(tmp_path / "b")]))
    resumed = train(parse_args([*base, "--out", str(tmp_path / "b"), "--resume"]))
    assert len(resumed["history"]) == 2 and resumed["finished"]
    for got, want in zip(resumed["history"], straight["history"]):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=2e-2)
        assert got["reg_loss"] > 0
