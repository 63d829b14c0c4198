"""The paper's MLPs: sizes from its table, parameter counts, names, initialisation."""

import math

import pytest
import torch
from torch import nn

from models import MLP_HIDDEN, build_model

# (784 inputs, 10 classes): sum over layers of in*out + out, written out by hand.
EXPECTED = {
    "mlp3": 784 * 100 + 100 + 100 * 10 + 10,                                            # 79,510
    "mlp4": 784 * 256 + 256 + 256 * 100 + 100 + 100 * 10 + 10,                          # 227,670
    "mlp6": 784 * 256 + 256 + 256 * 128 + 128 + 128 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10,
    "mlp8": (784 * 256 + 256 + 256 * 128 + 128 + 128 * 64 + 64 + 64 * 32 + 32 + 32 * 32 + 32
             + 32 * 16 + 16 + 16 * 10 + 10),
    "mlp10": (784 * 256 + 256 + 256 * 128 + 128 + 128 * 64 + 64 + 64 * 64 + 64 + 64 * 32 + 32
              + 32 * 32 + 32 + 32 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10),
}


def test_parameter_counts_match_the_hand_count():
    assert EXPECTED == {"mlp3": 79_510, "mlp4": 227_670, "mlp6": 244_522, "mlp8": 245_946, "mlp10": 250_378}
    for name, count in EXPECTED.items():
        model = build_model(name, 10, (1, 28, 28))
        assert sum(p.numel() for p in model.parameters()) == count, name


@pytest.mark.parametrize("name", list(MLP_HIDDEN))
def test_layer_names_shapes_and_init(name):
    torch.manual_seed(0)
    model = build_model(name, 10, (1, 28, 28))
    hidden = MLP_HIDDEN[name]
    names = [n for n, _ in model.named_children()]
    expected = ["flatten"] + [f"{kind}{i}" for i in range(1, len(hidden) + 1) for kind in ("fc", "relu")] + ["out"]
    assert names == expected
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == hidden + [10]
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    for module in model:
        if isinstance(module, nn.Linear):
            assert torch.count_nonzero(module.bias) == 0
            # Xavier-normal: std = sqrt(2 / (fan_in + fan_out)), checked loosely on the sample std
            want = math.sqrt(2.0 / (module.in_features + module.out_features))
            assert abs(module.weight.std().item() / want - 1) < 0.15


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'mlp5'; choose one of mlp3, mlp4"):
        build_model("mlp5", 10, (1, 28, 28))
