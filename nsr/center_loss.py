"""Center loss (Wen et al., ECCV 2016), used like NeuronSteadiness: hooks on named layers.

For each layer l with weight lambda_l, labels y and the batch's responses z (flattened to B x D):

    loss_l = 1/2 * 1/B * sum_i ||z_i - c[y_i]||**2        (sum over the D neurons, mean over the batch)

and reg(y) returns sum_l lambda_l * loss_l. The paper writes L_C = 1/2 * sum_i ||x_i - c_yi||**2
(a sum over the batch) and trains on L_S + lambda * L_C; here the batch is averaged, as the Caffe
CenterLoss layer does (dot / M / 2), so our lambda is the paper's lambda * B for its sum form.

Centres c (C x D) start at 0 and are not learned by the optimizer: after the loss is formed, each
class j seen in the batch moves by the paper's rule (z detached)

    delta_j = sum_{i: y_i = j} (c_j - z_i) / (1 + n_j),     c_j <- c_j - alpha * delta_j

with n_j the number of samples of class j in the batch; classes absent from the batch stay put.
Under torch.distributed the per-class sums and counts are all-reduced first (one call for all
layers), so every rank applies the global batch's update and keeps identical centres.

This file and layer_outputs.py import torch only.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .layer_outputs import (
    LayerOutputs,
    check_label_range,
    check_label_tensor,
    distributed,
)

__all__ = ["CenterLoss"]


class CenterLoss(nn.Module):
    """Center loss on named layers of `model`.

        reg = CenterLoss(model, layers={"out": 0.1}, num_classes=10, alpha=0.5)
        logits = model(x)                          # hooks capture the named layers' outputs
        loss = F.cross_entropy(logits, y) + reg(y)  # the loss, then the centres move

    layers: {name: lambda}, or a list of names sharing `lam`. alpha: the centres' rate, in [0, 1].
    sync: all-reduce the centre update across ranks; default: when torch.distributed is initialised.
    check_labels: range-check labels: "auto" (every call on CPU, the first call on accelerators,
        where reading values is a host sync), True (every call) or False (never).
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, float] | Iterable[str], num_classes: int,
                 alpha: float = 0.5, lam: float = 1.0, sync: bool | None = None,
                 check_labels: bool | str = "auto"):
        super().__init__()
        if isinstance(layers, str):
            layers = [layers]
        if not isinstance(layers, Mapping):
            layers = {name: lam for name in layers}
        if not layers:
            raise ValueError("center loss needs at least one layer name, e.g. layers={'out': 0.1}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"center loss alpha must be a number in [0, 1], got {alpha!r}")
        if check_labels not in (True, False, "auto"):
            raise ValueError(f"check_labels must be True, False or 'auto', got {check_labels!r}")
        self.names = list(layers)
        self.lambdas = layers
        self.num_classes, self.alpha, self.sync, self.check_labels = num_classes, float(alpha), sync, check_labels
        for i in range(len(self.names)):
            self.register_buffer(f"centers_{i}", None)  # C x D, made when D is known
        self.register_load_state_dict_pre_hook(_allocate_for_load)
        self.outputs = LayerOutputs(model, self.names, "center-loss")
        self._last: dict[str, torch.Tensor] = {}
        self._labels_checked = False

    @property
    def lambdas(self) -> dict[str, float]:
        """{layer: lambda}; set a new dict, or one entry, to change the weights (read each call)."""
        return self._lambdas

    @lambdas.setter
    def lambdas(self, value: Mapping[str, float]) -> None:
        if set(value) != set(self.names):
            raise ValueError(f"lambdas must name exactly the layers {self.names}, got {list(value)}")
        checked = {}
        for name in self.names:
            try:
                weight = float(value[name])
            except (TypeError, ValueError):
                weight = float("nan")
            if not 0 <= weight < float("inf"):
                raise ValueError(f"lambda for center-loss layer {name!r} must be a finite number >= 0, "
                                 f"got {value[name]!r}")
            checked[name] = weight
        self._lambdas = checked

    def set_lambda(self, name: str, value: float) -> None:
        """Change one layer's lambda (checked), e.g. for a warm-up; takes effect at the next call."""
        if name not in self._lambdas:
            raise ValueError(f"{name!r} is not a center-loss layer; the layers are {self.names}")
        self.lambdas = {**self._lambdas, name: value}

    def remove(self) -> None:
        """Detach the hooks from the model and drop anything captured."""
        self.outputs.remove()

    @property
    def last(self) -> dict[str, torch.Tensor]:
        """Per-layer center losses (unweighted, detached) of the last call."""
        return dict(self._last)

    def centers(self, name: str | None = None) -> torch.Tensor:
        """The C x D centres of a layer (the first one by default)."""
        c = getattr(self, f"centers_{self.names.index(name) if name else 0}")
        if c is None:
            raise ValueError("center-loss centres do not exist yet: run one training step first")
        return c

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """The weighted center loss of the last forward pass (float32 at least); then the update."""
        zs = self.outputs.take()
        check_label_tensor(y, zs, "center-loss")
        every_call = self.check_labels is True or (self.check_labels == "auto" and y.device.type == "cpu")
        if every_call or (self.check_labels == "auto" and not self._labels_checked):
            check_label_range(y, self.num_classes, "center-loss")  # on an accelerator: a host sync
            self._labels_checked = True
        y = y.to(device=zs[0].device, dtype=torch.long)
        centers = [self._centers_for(i, z) for i, z in enumerate(zs)]
        total = None
        for name, z, c in zip(self.names, zs, centers):
            diff = z - c.index_select(0, y).to(z.dtype)  # the centres are a buffer: no gradient
            loss = (diff * diff).sum() * (0.5 / max(z.shape[0], 1))
            self._last[name] = loss.detach()
            weighted = loss * self._lambdas[name]
            total = weighted if total is None else total + weighted
        self._update(zs, centers, y)
        return total

    def _centers_for(self, i: int, z: torch.Tensor) -> torch.Tensor:
        key = f"centers_{i}"
        c = getattr(self, key)
        if c is None:
            c = z.new_zeros(self.num_classes, z.shape[1])  # the paper's initialisation
        elif c.shape[1] != z.shape[1]:
            raise ValueError(f"center-loss layer {self.names[i]!r} changed width from {c.shape[1]} "
                             f"to {z.shape[1]} neurons; the centres need a fixed response size")
        elif c.device != z.device:
            c = c.to(z.device)  # e.g. loaded on CPU, used on a GPU
        else:
            return c
        self.register_buffer(key, c)
        return c

    @torch.no_grad()
    def _update(self, zs: list[torch.Tensor], centers: list[torch.Tensor], y: torch.Tensor) -> None:
        """c_j <- c_j - alpha * (n_j c_j - sum_{y_i=j} z_i) / (1 + n_j), from [sums | count] rows."""
        stats = [c.new_zeros(self.num_classes, c.shape[1] + 1).index_add_(
                     0, y, torch.cat([z.to(c.dtype), z.new_ones(z.shape[0], 1, dtype=c.dtype)], 1))
                 for z, c in zip(zs, centers)]
        if distributed() if self.sync is None else self.sync:
            flat = torch.cat([st.reshape(-1) for st in stats])
            dist.all_reduce(flat)
            stats = [piece.view_as(st) for piece, st in zip(flat.split([st.numel() for st in stats]), stats)]
        for c, st in zip(centers, stats):
            sums, counts = st[:, :-1], st[:, -1:]
            c.sub_((counts * c - sums) / (1 + counts), alpha=self.alpha)

    def extra_repr(self) -> str:
        return f"layers={self._lambdas}, num_classes={self.num_classes}, alpha={self.alpha}"


def _allocate_for_load(module, state_dict, prefix, local_metadata, strict, missing_keys,
                       unexpected_keys, error_msgs) -> None:
    """Make (or drop) each centres buffer so that load_state_dict restores the saved state."""
    for i in range(len(module.names)):
        key = f"centers_{i}"
        saved = state_dict.get(prefix + key)
        if saved is None:
            module.register_buffer(key, None)  # saved before the first step: no centres yet
        elif saved.dim() != 2 or saved.shape[0] != module.num_classes:
            error_msgs.append(f"center-loss centres {prefix + key!r} have shape {tuple(saved.shape)}; "
                              f"this regularizer needs ({module.num_classes}, D)")
        elif getattr(module, key) is None or getattr(module, key).shape != saved.shape:
            module.register_buffer(key, torch.zeros_like(saved))
