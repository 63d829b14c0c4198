"""Neuron Steadiness Regularization (NSR), as a module any PyTorch model can use.

For each regularized layer l with weight lambda_l, and labels y of the current batch:

    z      = the layer's output, flattened to B x D (per_channel: spatial mean first, D = channels)
    mu     = per-class mean of the *detached* responses over the last K batches (current one included)
    loss_l = 1/(B*D) * sum_ij (z_ij - mu[y_i, j])**2          (gradients flow through z only)

and the regularizer returns sum_l lambda_l * loss_l, to be added to the task loss.
With active_only, class means and the loss use only entries z_ij > 0 (the loss is then the mean
over the current batch's active entries, 0 when there is none).

This file and layer_outputs.py import torch only: copy the two (or the `nsr/` package) into any project.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .layer_outputs import (
    LayerOutputs,
    check_label_range,
    check_label_tensor,
    distributed,
)

__all__ = ["NeuronSteadiness", "ClassMeanMemory", "steadiness_loss"]


def steadiness_loss(z: torch.Tensor, y: torch.Tensor, class_means: torch.Tensor,
                    active: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared distance of each response to its class mean.

    z: B x D responses, y: B labels, class_means: C x D (treated as constants, no gradient).
    active: optional B x D mask (bool or 0/1); the mean is then over active entries only (0 if none).
    """
    target = class_means.detach().to(z.dtype).index_select(0, y)
    if active is None:
        return F.mse_loss(z, target)
    mask = active.to(z.dtype)
    diff = (z - target) * mask
    return (diff * diff).sum() / mask.sum().clamp_min(1)  # 0, not 0/0, when nothing is active


class ClassMeanMemory(nn.Module):
    """Per-class response sums and counts of the last K batches, for all of NSR's layers at once,
    kept as registered buffers.

    A row holds one sample's responses of every layer side by side, then its counts:
    [z_1 | ... | z_L | 1] (each sample counts once in every layer, so one count column serves all),
    or under active_only [relu(z_1) | ... | relu(z_L) | z_1 > 0 | ... | z_L > 0]. So one index_add_
    gathers a batch's sums and counts for all layers, and one all-reduce shares them.

        ring    (K+1) x C x W   one slot per batch: the K of the window, plus the free slot
        total   C x W           the sum of the K newest slots
        ptr     ()              the free slot, where the next batch goes (as MoCo's queue_ptr)
        widths  L               each layer's number of neurons D_l

    A step writes the batch into the free slot, then advance() adds it to `total` and subtracts the
    oldest slot, which becomes the free one: O(C*W) whatever K is; `total` is re-summed at each wrap
    of `ptr` to 0, so rounding never outlives K + 1 steps. The caller passes the free slot as a host
    int, so a step never reads `ptr` back (a host sync on a GPU). The buffers are made at the first
    step or by load_state_dict.
    """

    def __init__(self, num_classes: int, queue_batches: int, active_only: bool):
        super().__init__()
        self.num_classes, self.queue_batches, self.active_only = num_classes, queue_batches, active_only
        for name in ("ring", "total", "ptr", "widths"):
            self.register_buffer(name, None)
        self.register_load_state_dict_pre_hook(_allocate_for_load)

    def allocate(self, widths: list[int], dtype: torch.dtype, device: torch.device | str) -> None:
        width = 2 * sum(widths) if self.active_only else sum(widths) + 1
        self.ring = torch.zeros(self.queue_batches + 1, self.num_classes, width, dtype=dtype, device=device)
        self.total = torch.zeros(self.num_classes, width, dtype=dtype, device=device)
        self.ptr = torch.zeros((), dtype=torch.long, device=device)
        self.widths = torch.tensor(widths, dtype=torch.long, device=device)

    def neurons(self, width: int) -> int:
        """D_1 + ... + D_L, the number of sum columns of rows `width` wide."""
        return width // 2 if self.active_only else width - 1

    def rows(self, zs: list[torch.Tensor]) -> torch.Tensor:
        """B x W rows of the layers' detached B x D_l responses."""
        if self.active_only:  # relu(z) == z * (z > 0)
            return torch.cat([z.relu() for z in zs] + [(z > 0).to(z.dtype) for z in zs], dim=1)
        return F.pad(zs[0] if len(zs) == 1 else torch.cat(zs, dim=1), (0, 1), value=1.0)  # a column of ones

    def means(self, widths: list[int]) -> list[torch.Tensor]:
        """Each layer's C x D_l class means (0 where nothing was counted); `widths` is the `widths`
        buffer as a list, passed in so that a step does not read it back."""
        sums, counts = self.total.tensor_split([sum(widths)], dim=1)
        return list((sums / counts.clamp_min(1)).split(widths, dim=1))

    def write(self, rows: torch.Tensor, y: torch.Tensor, free: int) -> torch.Tensor:
        """Put the per-class sums of `rows` (labels y) in slot `free` and return that slot.
        Nothing else changes before advance(): a failed step (bad labels) leaves the K batches."""
        ring = self.ring
        if ring.shape[2] != rows.shape[1]:
            raise ValueError(f"layer outputs changed width from {self.neurons(ring.shape[2])} to "
                             f"{self.neurons(rows.shape[1])} neurons in all; NSR memory needs a fixed response "
                             "size (use per_channel=True for varying spatial size)")
        if ring.dtype != rows.dtype or ring.device != rows.device:
            ring = self.to(device=rows.device, dtype=rows.dtype).ring  # e.g. loaded on the CPU, used on a GPU
        return ring[free].zero_().index_add_(0, y, rows)

    def advance(self, newest: torch.Tensor, free: int) -> torch.Tensor:
        """Make `newest`, slot `free` as write() returned it, the newest of the K and the oldest
        slot the free one; return `total`."""
        ring, total, slots = self.ring, self.total, self.queue_batches + 1
        oldest = (free + 1) % slots
        if slots == 2:  # the window is this batch alone
            total.copy_(newest)
        elif oldest == 0:  # once per lap, the exact sum (slot 0 is free): O(K*C*W) every K + 1 steps
            ring[0].zero_()
            torch.sum(ring, dim=0, out=total)
        else:
            total.add_(newest).sub_(ring[oldest])
        self.ptr.fill_(oldest)
        return total


def _allocate_for_load(memory: ClassMeanMemory, state_dict, prefix, local_metadata, strict, missing_keys,
                       unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: give the buffers the saved shapes, also before the first step."""
    saved, widths = state_dict.get(prefix + "ring"), state_dict.get(prefix + "widths")
    if saved is None or widths is None:
        return
    if saved.dim() != 3 or saved.shape[:2] != (memory.queue_batches + 1, memory.num_classes):
        error_msgs.append(f"NSR memory {prefix + 'ring'!r} has shape {tuple(saved.shape)}, so it was saved with "
                          f"another queue_batches or num_classes (shape: queue_batches + 1, num_classes, width); "
                          f"this one has queue_batches={memory.queue_batches}, num_classes={memory.num_classes}")
    elif memory.ring is None or memory.ring.shape != saved.shape or memory.widths.shape != widths.shape:
        memory.allocate(widths.tolist(), saved.dtype, saved.device if memory.ring is None else memory.ring.device)


def _reread_ptr(reg: NeuronSteadiness, incompatible_keys) -> None:
    reg._free = None  # load_state_dict post-hook: the next step takes the free slot from `ptr`


class NeuronSteadiness(nn.Module):
    """Neuron Steadiness Regularization for named layers of `model`.

        reg = NeuronSteadiness(model, layers={"out": 7.4865}, num_classes=10, queue_batches=5)
        logits = model(x)                         # hooks capture the named layers' outputs
        loss = F.cross_entropy(logits, y) + reg(y)

    layers: {name: lambda}, or a list of names sharing `lam`. Names come from model.named_modules();
        the prefixes that DistributedDataParallel ("module.") and torch.compile ("_orig_mod.") add
        are optional. `reg.lambdas` is read at every call, so λ can change at any time, e.g. a
        warm-up over the first 5 epochs: reg.lambdas["out"] = 7.4865 * min(1.0, (epoch + 1) / 5)
    queue_batches: K, how many recent batches (the current one included) estimate the class means.
    active_only: class means and loss use only entries > 0 (the original code's ReLU layers).
    per_channel: average N x C x H x W outputs over H, W first, so each channel is one neuron.
    sync: all-reduce batch statistics across ranks; default (None): whether a torch.distributed group
        of more than one rank is running at the first call.
    check_labels: range-check label values. "auto": every call on CPU (free: index_add_ checks them
        anyway), the first call only on accelerators (reading values is a host sync). True: every
        call, everywhere. False: never on accelerators. Shape and dtype are always checked.
    After a call, `reg.last` gives each layer's unweighted loss (detached).
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, float] | Iterable[str],
                 num_classes: int, queue_batches: int = 1, active_only: bool = False,
                 per_channel: bool = False, lam: float = 1.0, sync: bool | None = None,
                 check_labels: bool | str = "auto"):
        super().__init__()
        layers = {layers: lam} if isinstance(layers, str) else layers
        layers = dict(layers) if isinstance(layers, Mapping) else {name: lam for name in layers}
        if not layers:
            raise ValueError("NSR needs at least one layer name, e.g. layers={'out': 0.5}")
        for what, value in (("num_classes", num_classes), ("queue_batches (K)", queue_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be a positive integer, got {value!r}")
        for name, value in layers.items():
            if not (float(value) >= 0 and math.isfinite(value)):
                raise ValueError(f"lambda for NSR layer {name!r} must be finite and >= 0, got {value}")
        if check_labels not in (True, False, "auto"):
            raise ValueError(f"check_labels must be True, False or 'auto', got {check_labels!r}")
        self.lambdas = {name: float(value) for name, value in layers.items()}
        self.names = list(self.lambdas)
        self.num_classes, self.queue_batches, self.active_only = num_classes, queue_batches, active_only
        self.per_channel, self.sync, self.check_labels = per_channel, sync, check_labels
        self.memory = ClassMeanMemory(num_classes, queue_batches, active_only)
        self.outputs = LayerOutputs(model, self.names, "NSR", per_channel)
        self._last: dict[str, tuple[torch.Tensor, int]] = {}  # (loss or sum of squares, divisor)
        self._labels_checked = False
        # The memory's `ptr` as a host int, so a step indexes the ring without reading the buffer
        # back. None until the first step and after a load_state_dict.
        self._free: int | None = None
        self.register_load_state_dict_post_hook(_reread_ptr)

    @property
    def last(self) -> dict[str, torch.Tensor]:
        """Each layer's unweighted NSR loss in the last call (detached)."""
        return {name: loss / n for name, (loss, n) in self._last.items()}

    def remove(self) -> None:
        """Detach the hooks from the model and drop anything captured."""
        self.outputs.remove()

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """The λ-weighted NSR term for the last forward pass, given its labels."""
        zs = self.outputs.take()
        check_label_tensor(y, zs, "NSR")
        auto_check = self.check_labels == "auto" and not self._labels_checked and not y.is_cpu
        if self.check_labels is True or auto_check:
            check_label_range(y, self.num_classes, "NSR")  # on an accelerator: a host sync
            self._labels_checked = True
        if y.dtype != torch.long or y.device != zs[0].device:  # skipped, .to() is one op per step
            y = y.to(device=zs[0].device, dtype=torch.long)
        free, widths = self._free, [z.shape[1] for z in zs]
        rows = self.memory.rows([z.detach() for z in zs])
        if free is None:  # the first step, or the first after a load_state_dict
            free = self._start(widths, rows)
        try:
            newest = self.memory.write(rows, y, free)
        except (IndexError, RuntimeError):
            check_label_range(y.cpu(), self.num_classes, "NSR")  # out of [0, C)? Only the free slot changed.
            raise
        if self.sync:  # all ranks enter the global batch: one all-reduce for all layers
            dist.all_reduce(newest)
        window = self.memory.advance(newest, free)  # C x W sums and counts of the K batches
        if self.active_only:
            means, actives = self.memory.means(widths), rows[:, sum(widths):].split(widths, dim=1)
            losses = [(steadiness_loss(z, y, m, a), 1) for z, m, a in zip(zs, means, actives)]
        else:  # every label of the batch was just counted, so no clamp of the counts is needed;
            # and the sum times λ/n: mse_loss's mean form costs one more division per step.
            sums, counts = window.tensor_split([sum(widths)], dim=1)
            targets = (sums / counts).index_select(0, y)
            targets = targets.split(widths, dim=1) if len(zs) > 1 else [targets]  # split is an op even into one
            losses = [(F.mse_loss(z, t, reduction="sum"), max(z.numel(), 1)) for z, t in zip(zs, targets)]
        total = None
        for name, (loss, n) in zip(self.names, losses):
            self._last[name] = (loss.detach(), n)
            weighted = loss * (self.lambdas[name] / n)
            total = weighted if total is None else total + weighted
        self._free = (free + 1) % (self.queue_batches + 1)
        return total

    def _start(self, widths: list[int], rows: torch.Tensor) -> int:
        """The free slot at the first step, or the first after a load_state_dict: make the memory,
        or check that the loaded one fits these layers; then read `ptr`, once."""
        if self.memory.ring is None:
            self.memory.allocate(widths, rows.dtype, rows.device)
        elif self.memory.widths.tolist() != widths:
            raise ValueError(f"NSR memory was saved for layers of {self.memory.widths.tolist()} neurons, but "
                             f"layers {self.names} give {widths}: load it into the same layers of the same model")
        if self.sync is None:  # the default, decided at the first call
            self.sync = distributed()
        return int(self.memory.ptr)

    def class_means(self, name: str | None = None) -> torch.Tensor:
        """Current class means (C x D) of a layer (the first one by default)."""
        if self.memory.total is None:
            raise ValueError("NSR memory is empty: run at least one training step first")
        return self.memory.means(self.memory.widths.tolist())[self.names.index(name) if name else 0]

    def extra_repr(self) -> str:
        return (f"layers={self.lambdas}, num_classes={self.num_classes}, queue_batches={self.queue_batches}, "
                f"active_only={self.active_only}, per_channel={self.per_channel}")
