"""YAML sets the defaults, the command line overrides them, mistakes name the fix; a run records
only the settings it reads."""

import os

import pytest
import yaml

from nsr.search.trial import config_overrides
from nsr.train.checkpoint import load_checkpoint
from nsr.train.config import (
    SETTINGS,
    Config,
    apply_overrides,
    build_parser,
    from_dict,
    parse_args,
    to_dict,
    validate,
)
from nsr.train.errors import UserError
from tests.helpers import DIGITS_BASE, ROOT, run_vanilla_script, strict_json


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_paper_configs_hold_the_paper_lambdas():
    expected = {"mlp3": 0.02475, "mlp4": 7.4865, "mlp6": 0.0538, "mlp8": 0.2542, "mlp10": 0.4158}
    for model, lam in expected.items():
        cfg = parse_args([], default_config=os.path.join(ROOT, "configs", f"{model}.yaml"))
        assert (cfg.model, cfg.lambda_, cfg.regularized_layers, cfg.queue_batches) == (model, [lam], ["out"], 5)
        assert (cfg.lr, cfg.momentum, cfg.batch_size, cfg.epochs) == (0.01, 0.0, 100, 100)
        assert cfg.val_size is None and cfg.dataset == "mnist"


def test_cnn_configs():
    r18 = parse_args([], default_config=os.path.join(ROOT, "configs", "resnet18_cifar10.yaml"))
    assert (r18.lr, r18.momentum, r18.nesterov, r18.weight_decay, r18.batch_size) == (0.1, 0.9, True, 5e-4, 128)
    assert (r18.epochs, r18.milestones, r18.gamma, r18.augment, r18.cutout) == (200, [60, 120, 160], 0.2,
                                                                                 "crop_flip_cutout", 16)
    assert (r18.lambda_, r18.queue_batches, r18.regularized_layers) == ([0.5], 1, ["fc"])
    vgg = parse_args([], default_config=os.path.join(ROOT, "configs", "vgg19_cifar10.yaml"))
    assert vgg.lambda_ == [0.11] and vgg.model == "vgg19"
    r50 = parse_args([], default_config=os.path.join(ROOT, "configs", "resnet50_imagenet.yaml"))
    assert (r50.lr, r50.weight_decay, r50.batch_size, r50.epochs, r50.milestones) == (0.1, 1e-4, 256, 90, [30, 60])


def test_command_line_overrides_yaml_which_overrides_defaults(tmp_path):
    path = write(tmp_path, "lr: 0.5\nepochs: 7\nlambda: [1.5]\n")
    cfg = parse_args(["--config", path, "--epochs", "3", "--lambda", "2.5"])
    assert (cfg.lr, cfg.epochs, cfg.lambda_, cfg.batch_size) == (0.5, 3, [2.5], 100)
    assert Config().lr == 0.01
    # a vanilla run reads no NSR setting: flags for them are refused (tests/test_bad_input.py)
    with pytest.raises(UserError, match="--regularized-layers has no effect here"):
        parse_args(["--config", path, "--regularizer", "none", "--regularized-layers", "fc1", "out", "--lambda", "1", "2"])


def test_one_lambda_is_shared_by_all_layers():
    cfg = parse_args(["--regularized-layers", "fc1", "fc2", "--lambda", "0.3"])
    assert cfg.lambda_ == [0.3, 0.3]


def test_to_dict_uses_the_yaml_names():
    d = to_dict(parse_args(["--lambda", "0.3"]))
    assert d["lambda"] == [0.3] and "lambda_" not in d


@pytest.mark.parametrize("argv, message", [
    (["--lamda", "3"], r"unknown option --lamda; did you mean --lambda\?"),
    (["--batchsize", "3"], r"did you mean --batch-size\?"),
    (["--lr", "fast"], r"lr expects float, got 'fast'"),
    (["--epochs", "2.5"], r"epochs expects int"),
    # λ by the library's rule (nsr/layer_outputs.check_lambda), checked before anything loads
    (["--lambda", "-1"], r"lambda for NSR layer 'out' must be a finite number >= 0, got -1.0"),
    (["--lambda", "nan"], r"lambda for NSR layer 'out' must be a finite number >= 0, got nan"),
    (["--regularizer", "center", "--regularized-layers", "fc1", "out", "--lambda", "1", "inf"],
     r"lambda for center-loss layer 'out' must be a finite number >= 0, got inf"),
    (["--regularized-layers", "fc1", "fc2", "out", "--lambda", "1", "2"],
     r"got 2 lambda values for 3 regularized layers \(fc1, fc2, out\)"),
    (["--regularized-layers"], r"expected at least one argument"),
    (["--model", "mlp5"], r"unknown model 'mlp5'; did you mean 'mlp\d'\?"),
    (["--dataset", "fashion_mnist"], r"unknown dataset 'fashion_mnist'; did you mean 'fashion-mnist'\?"),
    (["--batch-size", "0"], r"batch_size must be at least 1"),
    (["--optimizer", "sgdd"], r"unknown optimizer 'sgdd'; did you mean 'sgd'\?"),
    (["--amp", "half"], r"unknown amp 'half'; valid values: auto, bf16, fp16, off"),
    (["--nesterov", "--momentum", "0"], r"nesterov needs momentum > 0"),
    (["--seed", "-1"], r"seed must lie in 0\.\.4294967295, got -1"),
    (["--seed", str(2**32)], r"seed must lie in 0\.\.4294967295"),
    (["--cutout", "-2"], r"cutout must be >= 0"),
    (["--threads", "-1"], r"threads must lie in 0\.\.\d+ on this machine"),
    (["--device", "meta"], r"unknown device 'meta'; use auto, cpu, cuda or cuda:N"),
    (["--scheduler", "multistep", "--milestones", "0"], r"milestones are epochs \(1 or more\)"),
    (["--workers", str(10**6)], r"workers must lie in 0\.\.\d+ on this machine .*got 1000000"),
])
def test_bad_command_line_is_one_clear_error(argv, message):
    with pytest.raises(UserError, match=message):
        parse_args(argv)


def test_bad_yaml_keys_and_types(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'learning_rate'|unknown key 'lrr'; did you mean 'lr'\?"):
        parse_args(["--config", write(tmp_path, "lrr: 0.1\n")])
    with pytest.raises(UserError, match=r"batch_size expects int, got 'big'"):
        parse_args(["--config", write(tmp_path, "batch_size: big\n")])
    with pytest.raises(UserError, match=r"nesterov expects bool, got 3"):
        parse_args(["--config", write(tmp_path, "nesterov: 3\n")])
    with pytest.raises(UserError, match=r"'resume' is a command-line option only"):
        parse_args(["--config", write(tmp_path, "resume: true\n")])
    with pytest.raises(UserError, match=r"is not valid YAML at line \d"):
        parse_args(["--config", write(tmp_path, "lr: 0.1\nepochs: [1, 2\n")])
    with pytest.raises(UserError, match=r"must hold a mapping"):
        parse_args(["--config", write(tmp_path, "- 1\n- 2\n")])
    with pytest.raises(UserError, match=r"config file '.*nope.yaml' not found"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])


def test_nni_parameters_map_to_config_keys():
    assert config_overrides({"regularized_layer": "fc2", "lambda": 0.5, "lr": 0.1}) == \
        {"regularized_layers": ["fc2"], "lambda": [0.5], "lr": 0.1}
    assert config_overrides({"lambda": [1.0, 2.0]}) == {"lambda": [1.0, 2.0]}
    # one λ for a config with two NSR layers: applied to both
    cfg = apply_overrides(Config(regularized_layers=["fc1", "out"], lambda_=[1.0, 2.0]),
                          config_overrides({"lambda": 0.25}), "NNI parameters")
    validate(cfg)
    assert (cfg.regularized_layers, cfg.lambda_) == (["fc1", "out"], [0.25, 0.25])


def test_yaml_choices_are_checked_like_flags(tmp_path):
    with pytest.raises(UserError, match=r"unknown scheduler 'cosin'; did you mean 'cosine'\?"):
        parse_args(["--config", write(tmp_path, "scheduler: cosin\n")])
    with pytest.raises(UserError, match=r"regularizer nsr is on but regularized_layers is empty"):
        parse_args(["--config", write(tmp_path, "regularized_layers: []\n")])


def test_dropout_is_checked_by_the_models_rule():
    with pytest.raises(UserError, match=r"dropout must be a rate in \[0, 1\), got 1.0"):
        parse_args(["--dropout", "1"])
    with pytest.raises(UserError, match=r"dropout is only for MLPs \(mlp3, .*\); model 'vgg19' has none"):
        parse_args(["--model", "vgg19", "--regularized-layers", "fc", "--dropout", "0.1"])


def test_the_old_name_of_a_renamed_setting_names_the_new_one(tmp_path):
    with pytest.raises(UserError, match=r"^command line: --nsr-layers is now called --regularized-layers; rename it$"):
        parse_args(["--nsr-layers", "out"])
    with pytest.raises(UserError, match=r"config .*c.yaml: 'nsr_layers' is now called 'regularized_layers'; rename it"):
        parse_args(["--config", write(tmp_path, "nsr_layers: [out]\n")])
    with pytest.raises(UserError, match=r"checkpoint config: 'nsr_layers' is now called 'regularized_layers'; "
                                        r"the checkpoint is older than the new name"):
        from_dict({**to_dict(Config()), "nsr_layers": ["out"]})
    with pytest.raises(UserError, match=r"search-space parameter 'nsr_layer' is now called 'regularized_layer'"):
        config_overrides({"nsr_layer": "out", "lambda": 0.5})
    # the hidden old flag is never offered as the closest match, nor shown in --help
    with pytest.raises(UserError, match=r"unknown option --nsr-layer; ") as info:
        parse_args(["--nsr-layer", "out"])
    assert "--nsr-layers" not in str(info.value)
    assert "nsr-layers" not in build_parser().format_help()


def test_help_lists_every_setting_with_its_default_choices_and_condition():
    text = " ".join(build_parser().format_help().split())  # argparse wraps lines
    for key in SETTINGS:
        assert f" --{key.replace('_', '-')}" in text.split("options:")[1], key  # its own help entry
    assert "--no-per-channel" in text
    assert "--lambda LAMBDA [LAMBDA ...] regularizer weight" in text
    assert "(sgd | adam | adamw; default sgd)" in text
    assert "(read with --regularizer nsr; default 5)" in text  # queue_batches
    assert "(read with --regularizer nsr or center; default out)" in text
    assert "continue from OUT/last.pt --overwrite" in text  # command-line only: no default shown


def test_settings_a_run_does_not_read_are_not_recorded_as_used(tmp_path, capsys, monkeypatch):
    """fdnn_vanilla.py on configs/mlp4.yaml (lambda, regularized_layers, queue_batches set there for the
    NSR script): config.yaml, the checkpoint and metrics.json show none of them as used."""
    out = tmp_path / "v"
    assert run_vanilla_script(capsys, monkeypatch, [*DIGITS_BASE, "--max-steps", "2", "--out", str(out)])[0] == 0
    unread = {"regularized_layers", "lambda", "queue_batches", "active_only", "per_channel", "center_alpha",
              "milestones", "gamma", "cutout", "fake_size"}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["regularizer"] == "none" and not unread & set(saved) and saved["lr"] == 0.01
    assert not unread & set(load_checkpoint(str(out / "last.pt"))["config"])
    m = strict_json(out / "metrics.json")
    assert (m["lambda"], m["regularized_layers"], m["queue_batches"], m["center_alpha"]) == ([], [], None, None)
