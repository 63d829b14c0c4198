"""Fully connected networks of the paper (MLP-3 ... MLP-10): Linear layers with ReLU between them."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

# Hidden layer sizes from the paper's table; MLP-n has n layers counting input and output.
MLP_HIDDEN = {
    "mlp3": [100],
    "mlp4": [256, 100],
    "mlp6": [256, 128, 64, 32],
    "mlp8": [256, 128, 64, 32, 32, 16],
    "mlp10": [256, 128, 64, 64, 32, 32, 16, 16],
}


class MLP(nn.Sequential):
    """Flatten, then hidden Linear+ReLU blocks named fc1, relu1, fc2, ..., and the output layer `out`.

    NSR targets read as layer names: `out` (logits), `fc2` (pre-activation) or `relu2` (post-ReLU).
    Weights are Xavier-normal and biases zero, as in the paper's original code.
    dropout: rate p of an nn.Dropout `drop<i>` after each `relu<i>` (active in train mode only);
    p = 0 adds no module, so the model is exactly the paper's. `relu<i>` is the response before
    dropout, `drop<i>` the one after it.
    """

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float = 0.0):
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a rate in [0, 1), got {dropout!r}")
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        width = in_features
        for i, size in enumerate(hidden, start=1):
            layers += [(f"fc{i}", nn.Linear(width, size)), (f"relu{i}", nn.ReLU())]
            if dropout > 0:
                layers.append((f"drop{i}", nn.Dropout(dropout)))
            width = size
        layers.append(("out", nn.Linear(width, num_classes)))
        super().__init__(OrderedDict(layers))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)
