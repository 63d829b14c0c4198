"""Neuron Steadiness Regularization (NSR), as a module any PyTorch model can use.

For each regularized layer l with weight lambda_l, and labels y of the current batch:

    z      = the layer's output, flattened to B x D (per_channel: spatial mean first, D = channels)
    mu     = per-class mean of the *detached* responses over the last K batches (current one included)
    loss_l = 1/(B*D) * sum_ij (z_ij - mu[y_i, j])**2          (gradients flow through z only)

and the regularizer returns sum_l lambda_l * loss_l, to be added to the task loss.
With active_only, class means and the loss use only entries z_ij > 0 (the loss is then the mean
over the current batch's active entries, 0 when there is none).

This file imports torch only: copy the `nsr/` package (or this file) into any project.
"""

from __future__ import annotations

import difflib
import math
from typing import Iterable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["NeuronSteadiness", "ClassMeanMemory", "steadiness_loss"]

_LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


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
    """Per-class response sums and counts of the last K batches, kept as registered buffers.

    A row of width W is [sums of the D neurons | counts]: rows [z | 1], or [relu(z) | z > 0] under
    active_only (D count columns), so one index_add_ gathers a batch's sums and counts together.

        ring   (K+1) x C x W   one slot per batch: the K of the window, plus the free slot
        total  C x W           the sum of the K newest slots
        ptr    ()              the free slot, where the next batch goes (as MoCo's queue_ptr)

    A step writes the batch into the free slot, adds it to `total` and subtracts the oldest slot,
    which becomes the free one: O(C*W) whatever K is. At each wrap of the pointer to 0, `total` is
    re-summed, so rounding never outlives K + 1 steps. The buffers are made at the first step (D is
    not known before) or by a load_state_dict.
    """

    def __init__(self, num_classes: int, queue_batches: int, active_only: bool):
        super().__init__()
        self.num_classes, self.queue_batches, self.active_only = num_classes, queue_batches, active_only
        for name in ("ring", "total", "ptr"):
            self.register_buffer(name, None)
        # `ptr` also as a host int, so a step indexes the ring without reading the buffer back (a host
        # sync on a GPU). None after a load_state_dict: the next step then reads it from `ptr`.
        self._free: int | None = None
        self.register_load_state_dict_post_hook(_reread_ptr)

    def allocate(self, width: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.ring = torch.zeros(self.queue_batches + 1, self.num_classes, width, dtype=dtype, device=device)
        self.total = torch.zeros(self.num_classes, width, dtype=dtype, device=device)
        self.ptr = torch.zeros((), dtype=torch.long, device=device)
        self._free = 0

    @property
    def dim(self) -> int:
        """D, the number of neurons (0 before the first step)."""
        width = 0 if self.total is None else self.total.shape[1]
        return width // 2 if self.active_only else max(width - 1, 0)

    def means(self) -> torch.Tensor:
        """C x D class means (0 where nothing was counted)."""
        sums, counts = self.total.tensor_split([self.dim], dim=1)
        return sums / counts.clamp_min(1)

    def rows(self, z: torch.Tensor) -> torch.Tensor:
        """B x W rows of detached B x D responses: [z | 1], or [relu(z) | z > 0] under active_only."""
        if self.active_only:
            return torch.cat([z.relu(), (z > 0).to(z.dtype)], dim=1)  # relu(z) == z * (z > 0)
        return F.pad(z, (0, 1), value=1.0)  # a column of ones

    def write(self, rows: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Put the per-class sums of `rows` (labels y) in the free slot and return that slot.
        Nothing else changes before advance(): a failed step (bad labels) leaves the K batches."""
        if self.ring is None:
            self.allocate(rows.shape[1], rows.dtype, rows.device)
        elif self.ring.shape[2] != rows.shape[1]:
            new = rows.shape[1] // 2 if self.active_only else rows.shape[1] - 1
            raise ValueError(f"layer output changed width from {self.dim} to {new} neurons; NSR memory needs "
                             "a fixed response size (use per_channel=True for varying spatial size)")
        elif self.ring.device != rows.device or self.ring.dtype != rows.dtype:
            self.to(device=rows.device, dtype=rows.dtype)  # e.g. loaded on the CPU, used on a GPU
        if self._free is None:
            self._free = int(self.ptr)  # once after a load_state_dict
        return self.ring[self._free].zero_().index_add_(0, y, rows)

    def advance(self, newest: torch.Tensor) -> None:
        """Make `newest` (the slot write() returned) the newest of the K, the oldest the free slot."""
        oldest = (self._free + 1) % (self.queue_batches + 1)
        if self.queue_batches == 1:  # the window is this batch alone
            self.total.copy_(newest)
        elif oldest == 0:  # once per lap, the exact sum (slot 0 is free): O(K*C*W) every K + 1 steps
            self.ring[0].zero_()
            torch.sum(self.ring, dim=0, out=self.total)
        else:
            self.total.add_(newest).sub_(self.ring[oldest])
        self.ptr.fill_(oldest)
        self._free = oldest

    def prepare_load(self, saved_ring: torch.Tensor) -> None:
        """Give the buffers the shape of a saved `ring`, so that load_state_dict can fill them."""
        slots, C, width = saved_ring.shape
        if (slots, C) != (self.queue_batches + 1, self.num_classes):
            raise RuntimeError(f"NSR memory was saved with queue_batches={slots - 1}, num_classes={C}; this "
                               f"one has queue_batches={self.queue_batches}, num_classes={self.num_classes}")
        self.allocate(width, saved_ring.dtype, saved_ring.device if self.ring is None else self.ring.device)


def _reread_ptr(memory: ClassMeanMemory, incompatible_keys) -> None:
    memory._free = None  # load_state_dict post-hook: the next step takes the free slot from `ptr`


def _find_layers(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    """The module of each name, with or without the prefixes of DistributedDataParallel ("module.")
    and torch.compile ("_orig_mod.")."""
    def unwrapped(name: str) -> str:
        while name.startswith(("module.", "_orig_mod.")):
            name = name.split(".", 1)[1]
        return name
    modules = dict(model.named_modules())
    bare = {}  # by name without prefixes; neither the root nor a wrapper itself
    for full, module in modules.items():
        if full and unwrapped(full + "."):
            bare.setdefault(unwrapped(full), module)
    found = []
    for name in names:
        module = modules.get(name) if name else None
        found.append(bare.get(unwrapped(name)) if module is None else module)
        if found[-1] is None:
            close = difflib.get_close_matches(name, list(bare), n=5, cutoff=0.4) or list(bare)[:8]
            raise ValueError(f"NSR layer {name!r} is not a module of the model; closest valid names: "
                             f"{', '.join(close)}")
    return found


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
    sync: all-reduce batch statistics across ranks; default: when torch.distributed is initialised.
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
        self.memories = nn.ModuleList(ClassMeanMemory(num_classes, queue_batches, active_only)
                                      for _ in self.names)
        self._last: dict[str, tuple[torch.Tensor, int]] = {}  # (loss or sum of squares, divisor)
        self._captured: dict[str, torch.Tensor] = {}  # the named layers' outputs of this forward pass
        self._labels_checked = False
        # Handles in a plain list: the model must not become a submodule of the regularizer.
        self._handles = [module.register_forward_hook(self._make_hook(name))
                         for name, module in zip(self.names, _find_layers(model, self.names))]

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if module.training:
                output = output[0] if isinstance(output, (tuple, list)) else output
                if not isinstance(output, torch.Tensor):
                    raise TypeError(f"NSR layer {name!r} returned {type(output).__name__}, not a tensor")
                self._captured[name] = output
        return hook

    @property
    def last(self) -> dict[str, torch.Tensor]:
        """Each layer's unweighted NSR loss in the last call (detached)."""
        return {name: loss / n for name, (loss, n) in self._last.items()}

    def remove(self) -> None:
        """Detach the hooks from the model and drop anything captured."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured.clear()

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """The λ-weighted NSR term for the last forward pass, given its labels."""
        if len(self._captured) != len(self.names):
            missing = [name for name in self.names if name not in self._captured]
            raise ValueError(f"NSR found no captured output for layer(s) {missing}: call the model "
                             "in training mode (model.train()) before each reg(y), once per step")
        zs = [self._responses(self._captured.pop(name)) for name in self.names]
        self._check_labels(y, zs[0].shape[0])
        y = y.to(device=zs[0].device, dtype=torch.long)  # no copy when it already is
        rows = [memory.rows(z.detach()) for memory, z in zip(self.memories, zs)]
        try:
            slots = [memory.write(r, y) for memory, r in zip(self.memories, rows)]
        except (IndexError, RuntimeError):
            self._raise_if_out_of_range(y.cpu())  # a label outside [0, C)? Only free slots changed.
            raise
        if self._sync_enabled():  # every rank enters the global batch, in one all-reduce for all layers
            flat = torch.cat([slot.flatten() for slot in slots])
            dist.all_reduce(flat)
            for slot, piece in zip(slots, flat.split([slot.numel() for slot in slots])):
                slot.copy_(piece.view_as(slot))
        terms = []
        for name, memory, z, r, slot in zip(self.names, self.memories, zs, rows, slots):
            memory.advance(slot)
            means = memory.means()  # 0 for a (class, neuron) with nothing counted in the window
            if self.active_only:
                loss, n = steadiness_loss(z, y, means, r[:, z.shape[1]:]), 1
            else:  # the sum times λ/n: mse_loss's mean form costs one more division per step
                loss, n = F.mse_loss(z, means.index_select(0, y), reduction="sum"), max(z.numel(), 1)
            self._last[name] = (loss.detach(), n)
            terms.append(loss * (self.lambdas[name] / n))
        return sum(terms[1:], terms[0])

    def _responses(self, output: torch.Tensor) -> torch.Tensor:
        """B x D, in float32 at least (also under bf16/fp16 autocast)."""
        if output.dim() < 2:
            raise ValueError(f"NSR needs layer outputs of shape (batch, ...), got {tuple(output.shape)}")
        dtype = output.dtype if output.dtype in (torch.float32, torch.float64) else torch.float32
        if output.dim() > 2:
            output = output.flatten(2).mean(dim=2, dtype=dtype) if self.per_channel else output.flatten(1)
        return output.to(dtype)

    def _check_labels(self, y: torch.Tensor, batch: int) -> None:
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"NSR labels must be a tensor, got {type(y).__name__}")
        if y.dim() != 1 or y.shape[0] != batch:
            raise ValueError(f"NSR labels must have shape ({batch},) to match the batch the layers saw, "
                             f"got {tuple(y.shape)}")
        if y.dtype not in _LABEL_DTYPES:
            raise ValueError(f"NSR labels must be an integer tensor of class indices, got {y.dtype}")
        first_on_accelerator = not self._labels_checked and y.device.type != "cpu"
        if self.check_labels is True or (self.check_labels == "auto" and first_on_accelerator):
            self._raise_if_out_of_range(y)  # reading values off an accelerator is a host sync
            self._labels_checked = True

    def _raise_if_out_of_range(self, y: torch.Tensor) -> None:
        lo, hi = (int(v) for v in torch.aminmax(y)) if y.numel() else (0, 0)
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(f"NSR labels must lie in [0, {self.num_classes}), got values in [{lo}, {hi}]")

    def _sync_enabled(self) -> bool:
        default = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        return default if self.sync is None else self.sync

    def class_means(self, name: str | None = None) -> torch.Tensor:
        """Current class means (C x D) of a layer (the first one by default)."""
        memory = self.memories[self.names.index(name) if name else 0]
        if memory.total is None:
            raise ValueError("NSR memory is empty: run at least one training step first")
        return memory.means()

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], *args, **kwargs):
        """nn.Module.load_state_dict, also into a regularizer that has not made a step yet."""
        for i, memory in enumerate(self.memories):
            if f"memories.{i}.ring" in state_dict:
                memory.prepare_load(state_dict[f"memories.{i}.ring"])
        return super().load_state_dict(state_dict, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"layers={self.lambdas}, num_classes={self.num_classes}, queue_batches={self.queue_batches}, "
                f"active_only={self.active_only}, per_channel={self.per_channel}")
