"""build_model options: MLP dropout, CNN input channels from in_shape, one-line errors for shapes."""

import math

import pytest
import torch
from torch import nn

from models import MLP_HIDDEN, build_model


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def built(name, *args, seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_model(name, *args, **kwargs)


# -- MLP dropout

def test_dropout_zero_is_exactly_the_plain_mlp():
    plain, zero = built("mlp4", 10, (1, 28, 28)), built("mlp4", 10, (1, 28, 28), dropout=0.0)
    assert [n for n, _ in zero.named_children()] == [n for n, _ in plain.named_children()]
    assert not any(isinstance(m, nn.Dropout) for m in zero.modules())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), zero.state_dict().values()))
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(plain.train()(x), zero.train()(x))


@pytest.mark.parametrize("name", ["mlp4", "mlp10"])
def test_dropout_layers_names_and_init(name):
    hidden = MLP_HIDDEN[name]
    plain, dropped = built(name, 10, (1, 28, 28)), built(name, 10, (1, 28, 28), dropout=0.3)
    names = [n for n, _ in dropped.named_children()]
    want = ["flatten"] + [f"{k}{i}" for i in range(1, len(hidden) + 1) for k in ("fc", "relu", "drop")] + ["out"]
    assert names == want
    assert all(m.p == 0.3 for m in dropped.modules() if isinstance(m, nn.Dropout))
    # Dropout has no parameters and draws no random numbers at construction: same weights.
    assert n_params(dropped) == n_params(plain)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), dropped.state_dict().values()))


def capture(model, names):
    seen = {}
    for name in names:
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    return seen


def test_dropout_is_active_in_train_mode_and_off_in_eval_mode():
    p = 0.3
    plain, model = built("mlp4", 10, (1, 28, 28)), built("mlp4", 10, (1, 28, 28), dropout=p)
    seen = capture(model, ["relu1", "drop1"])
    x = torch.rand(64, 1, 28, 28)

    model.train()
    out = model(x)
    relu, drop = seen["relu1"], seen["drop1"]
    alive = relu > 0
    zeroed = (drop == 0) & alive
    # Each unit is either zeroed or scaled by 1 / (1 - p) (inverted dropout), by hand:
    kept = alive & ~zeroed
    assert torch.allclose(drop[kept], relu[kept] / (1 - p), rtol=1e-6, atol=0)
    rate = zeroed.sum().item() / alive.sum().item()
    assert abs(rate - p) < 0.03, rate  # about 8,000 live units: the std of the rate is ~0.005
    assert not torch.equal(out, plain.train()(x))
    assert not torch.equal(model(x), out)  # a new mask on every call

    model.eval()
    out = model(x)
    assert torch.equal(seen["drop1"], seen["relu1"])
    assert torch.equal(out, plain.eval()(x))


# -- CNN input channels

@pytest.mark.parametrize("name", ["resnet18", "vgg19", "resnet50"])
@pytest.mark.parametrize("channels", [1, 3])
def test_cnn_forward_for_1_and_3_channels(name, channels):
    shape = (channels, 28, 28) if channels == 1 else (channels, 32, 32)
    model = built(name, 7, shape).train()
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()


def test_resnet50_stem_follows_the_channel_count():
    from torchvision.models import resnet50

    # 3 channels: exactly torchvision's model (same weights under the same seed).
    ours = built("resnet50", 10, (3, 32, 32), seed=3)
    torch.manual_seed(3)
    theirs = resnet50(weights=None, num_classes=10)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    # 1 channel: the 7x7 stem loses 64 * 2 * 7 * 7 weights; 25,557,032 is the 1000-class count.
    gray = built("resnet50", 1000, (1, 64, 64))
    assert n_params(gray) == 25_557_032 - 64 * 2 * 7 * 7
    assert gray.conv1.weight.shape == (64, 1, 7, 7) and gray.conv1.bias is None
    want_std = math.sqrt(2 / (64 * 7 * 7))  # Kaiming normal, fan_out, as torchvision's other convs
    assert abs(gray.conv1.weight.std().item() / want_std - 1) < 0.1


# -- errors: one line, ValueError, naming the model, the value and the fix

@pytest.mark.parametrize("args,kwargs,match", [
    (("resnet18", 10, (1, 28, 28)), {"dropout": 0.5}, r"dropout is only for MLPs \(mlp3.*'resnet18'.*set dropout to 0"),
    (("mlp4", 10, (1, 28, 28)), {"dropout": 1.0}, r"dropout must be a rate in \[0, 1\), got 1.0"),
    (("mlp4", 10, (1, 28, 28)), {"dropout": -0.1}, r"rate in \[0, 1\)"),
    (("mlp4", 10, (1, 28, 28)), {"dropout": "0.5"}, r"rate in \[0, 1\), got '0.5'"),
    (("resnet50", 10, (784,)), {}, r"'resnet50' needs images of shape \(channels, height, width\), got \(784,\); use an MLP"),
    (("vgg19", 10, (28, 28)), {}, r"'vgg19' needs images .* got \(28, 28\)"),
    (("resnet18", 10, (1, 0, 28)), {}, r"'resnet18' cannot take input shape \(1, 0, 28\)"),
    (("mlp4", 10, ()), {}, r"'mlp4' cannot take input shape \(\)"),
    (("mlp4", 0, (1, 28, 28)), {}, r"'mlp4' needs a positive integer number of classes, got 0"),
])
def test_bad_options_are_one_line_value_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        build_model(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_cnns_take_any_spatial_size_from_1x1():
    # No minimum size to refuse: 3x3 convs pad, pools use ceil_mode or adaptive pooling.
    for name in ("resnet18", "vgg19", "resnet50"):
        model = built(name, 3, (2, 1, 5)).train()
        assert model(torch.randn(2, 2, 1, 5)).shape == (2, 3)
