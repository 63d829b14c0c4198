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
With sync (by default, under a multi-rank torch.distributed group) the per-class sums and counts
are all-reduced first (one call for all layers), so every rank applies the global batch's update
and keeps identical centres.

This file and layer_outputs.py import torch only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .layer_outputs import LayerRegularizer, real_arg

__all__ = ["CenterLoss"]


class CenterLoss(LayerRegularizer):
    """Center loss on named layers of `model`.

        reg = CenterLoss(model, layers={"out": 0.1}, num_classes=10, alpha=0.5)
        logits = model(x)                          # hooks capture the named layers' outputs
        loss = F.cross_entropy(logits, y) + reg(y)  # the loss, then the centres move

    layers, lam, sync, check_labels, lambdas, last: as LayerRegularizer (nsr/layer_outputs.py).
    alpha: the centres' rate, in [0, 1].
    An empty batch (no samples) adds 0 and moves no centre, as NeuronSteadiness does.
    The centres are buffers centers_0, centers_1, ... (C x D, in the layers' order), made at the
    first call or by load_state_dict; reg.centers(name) reads one.
    """

    what = "center-loss"

    def __init__(self, model: nn.Module, layers: Mapping[str, float] | Iterable[str] | str, num_classes: int,
                 alpha: float = 0.5, lam: float = 1.0, sync: bool | None = None,
                 check_labels: bool | str = "auto"):
        alpha = real_arg("center-loss alpha", alpha, "in [0, 1]", high=1.0)
        super().__init__(model, layers, num_classes, lam, sync, check_labels)
        self.alpha = alpha
        for i in range(len(self.names)):
            self.register_buffer(f"centers_{i}", None)  # C x D, made when D is known
        self.register_load_state_dict_pre_hook(_check_loaded)

    @property
    def started(self) -> bool:
        """Whether every layer's centres exist: made at the first step, or loaded from a state saved after one."""
        return all(getattr(self, f"centers_{i}") is not None for i in range(len(self.names)))

    def centers(self, name: str | None = None) -> torch.Tensor:
        """The C x D centres of a layer (the first one by default)."""
        c = getattr(self, f"centers_{self.layer_index(name)}")
        if c is None:
            raise ValueError("center-loss centres do not exist yet: run one training step first")
        return c

    def regularize(self, zs: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """The weighted center loss (float32 at least); then the update."""
        centers = [self._centers_for(i, z) for i, z in enumerate(zs)]
        total = 0.0
        for name, z, c in zip(self.names, zs, centers):
            diff = z - c.index_select(0, y).to(z.dtype)  # the centres are a buffer: no gradient
            loss = (diff * diff).sum() * (0.5 / max(z.shape[0], 1))
            self._last[name] = loss.detach()
            total = total + self.lambdas[name] * loss
        self._update(zs, centers, y)
        return total

    def _centers_for(self, i: int, z: torch.Tensor) -> torch.Tensor:
        key = f"centers_{i}"
        c = getattr(self, key)
        if c is None:
            c = z.new_zeros(self.num_classes, z.shape[1])  # the paper's initialisation
        elif c.shape[1] != z.shape[1]:
            raise ValueError(f"center-loss layer {self.names[i]!r} gives {z.shape[1]} neurons, but its centres "
                             f"have {c.shape[1]}: the centres need a fixed response size, and loaded centres "
                             "must come from the same layers")
        elif c.device != z.device:
            c = c.to(z.device)  # e.g. loaded on CPU, used on a GPU
        else:
            return c
        setattr(self, key, c)
        return c

    @torch.no_grad()
    def _update(self, zs: list[torch.Tensor], centers: list[torch.Tensor], y: torch.Tensor) -> None:
        """c_j <- c_j - alpha * (n_j c_j - sum_{y_i=j} z_i) / (1 + n_j), from [sums | count] rows."""
        stats = [c.new_zeros(self.num_classes, c.shape[1] + 1).index_add_(
                     0, y, torch.cat([z.to(c.dtype), z.new_ones(z.shape[0], 1, dtype=c.dtype)], 1))
                 for z, c in zip(zs, centers)]
        if self.sync:
            flat = torch.cat([st.reshape(-1) for st in stats])
            dist.all_reduce(flat)
            stats = [piece.view_as(st) for piece, st in zip(flat.split([st.numel() for st in stats]), stats)]
        for c, st in zip(centers, stats):
            sums, counts = st[:, :-1], st[:, -1:]
            c.sub_((counts * c - sums) / (1 + counts), alpha=self.alpha)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"


def _check_loaded(module: CenterLoss, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: refuse centres of other shapes (before anything changes); then
    make (or drop) each centres buffer so that the load restores the saved state, also before
    the first step."""
    keys = [f"centers_{i}" for i in range(len(module.names))]
    for key, name in zip(keys, module.names):
        saved, own = state_dict.get(prefix + key), getattr(module, key)
        if saved is None:
            continue
        if not isinstance(saved, torch.Tensor) or saved.dim() != 2 or saved.shape[0] != module.num_classes:
            raise ValueError(f"center-loss centres {prefix + key!r} of layer {name!r} have shape "
                             f"{tuple(getattr(saved, 'shape', ()))}; this regularizer needs "
                             f"({module.num_classes}, D)")
        if own is not None and own.shape != saved.shape:
            raise ValueError(f"center-loss centres {prefix + key!r}: saved for {saved.shape[1]} neurons, but layer "
                             f"{name!r} gives {own.shape[1]}: load them into the same layers of the same model")
    for key in keys:
        saved = state_dict.get(prefix + key)
        if saved is None:
            setattr(module, key, None)  # saved before the first step: no centres yet
        elif getattr(module, key) is None:
            setattr(module, key, torch.zeros_like(saved))
