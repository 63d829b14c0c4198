"""Neuron Steadiness Regularization (NSR), as a module any PyTorch model can use.

For each regularized layer l with weight lambda_l, and labels y of the current batch:

    z      = the layer's output, flattened to B x D (per_channel: spatial mean first, D = channels)
    mu     = per-class mean of the *detached* responses over the last K batches (current one included)
    loss_l = 1/(B*D) * sum_ij (z_ij - mu[y_i, j])**2          (gradients flow through z only)

and the regularizer returns sum_l lambda_l * loss_l, to be added to the task loss.

This file imports torch only: copy the `nsr/` package (or this file) into any project.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["NeuronSteadiness", "ClassMeanMemory", "steadiness_loss"]


def steadiness_loss(z: torch.Tensor, y: torch.Tensor, class_means: torch.Tensor,
                    active: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared distance of each response to its class mean.

    z: B x D responses, y: B labels, class_means: C x D (treated as constants).
    active: optional B x D boolean mask; the mean is then over active entries only (0 if none).
    """
    diff = z - class_means.detach().to(z.dtype).index_select(0, y)
    sq = diff * diff
    if active is None:
        return sq.mean()
    # Dividing by max(count, 1) keeps "no active entry" at 0 instead of 0/0, with no host sync.
    return (sq * active).sum() / active.sum().clamp_min(1)


class ClassMeanMemory(nn.Module):
    """Per-class response sums and counts of the last K batches, kept as buffers.

    A ring of K slots with a write pointer (MoCo's queue idea), plus running totals so a step
    costs O(C*D) whatever K is. Totals are re-summed from the ring each time the pointer wraps,
    so float rounding from add/subtract never accumulates past K steps.
    Buffers are created on the first update (D is not known before), and by load_state_dict.
    """

    def __init__(self, num_classes: int, queue_batches: int, active_only: bool):
        super().__init__()
        self.num_classes = num_classes
        self.queue_batches = queue_batches
        self.active_only = active_only
        self._ptr = 0  # host copy of the pointer buffer: indexing with it never syncs
        for name in ("ring_sums", "ring_counts", "sums", "counts", "ptr"):
            self.register_buffer(name, None)  # allocated lazily

    @property
    def initialized(self) -> bool:
        return self.sums is not None

    def _allocate(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        K, C = self.queue_batches, self.num_classes
        count_shape = (C, dim) if self.active_only else (C,)
        self.register_buffer("ring_sums", torch.zeros(K, C, dim, dtype=dtype, device=device))
        self.register_buffer("ring_counts", torch.zeros(K, *count_shape, dtype=dtype, device=device))
        self.register_buffer("sums", torch.zeros(C, dim, dtype=dtype, device=device))
        self.register_buffer("counts", torch.zeros(*count_shape, dtype=dtype, device=device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))
        self._ptr = 0

    def batch_statistics(self, z: torch.Tensor, y: torch.Tensor,
                         active: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class sums (C x D) and counts (C, or C x D when active_only) of detached z."""
        C = self.num_classes
        z = z.detach()
        if active is None:
            sums = z.new_zeros(C, z.shape[1]).index_add_(0, y, z)
            counts = z.new_zeros(C).index_add_(0, y, z.new_ones(y.shape[0]))
        else:
            mask = active.to(z.dtype)
            sums = z.new_zeros(C, z.shape[1]).index_add_(0, y, z * mask)
            counts = z.new_zeros(C, z.shape[1]).index_add_(0, y, mask)
        return sums, counts

    @torch.no_grad()
    def push(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Write one batch's statistics into the ring, replacing the oldest slot."""
        if not self.initialized:
            self._allocate(sums.shape[1], sums.dtype, sums.device)
        elif sums.shape[1] != self.sums.shape[1]:
            raise ValueError(
                f"layer output changed width from {self.sums.shape[1]} to {sums.shape[1]} neurons; "
                "NSR memory needs a fixed response size (use per_channel=True for varying spatial size)")
        p = self._ptr
        self.sums.sub_(self.ring_sums[p]).add_(sums)
        self.counts.sub_(self.ring_counts[p]).add_(counts)
        self.ring_sums[p].copy_(sums)
        self.ring_counts[p].copy_(counts)
        p = (p + 1) % self.queue_batches
        if p == 0:  # exact re-sum once per lap: O(K*C*D) every K steps is O(C*D) per step
            torch.sum(self.ring_sums, dim=0, out=self.sums)
            torch.sum(self.ring_counts, dim=0, out=self.counts)
        self._ptr = p
        self.ptr.fill_(p)

    def means(self) -> torch.Tensor:
        counts = self.counts if self.active_only else self.counts.unsqueeze(1)
        return self.sums / counts.clamp_min(1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "ring_sums"
        if key in state_dict:
            saved = state_dict[key]
            K, C, D = saved.shape
            if (K, C) != (self.queue_batches, self.num_classes):
                error_msgs.append(
                    f"NSR memory {prefix!r} was saved with queue_batches={K}, num_classes={C}; "
                    f"this regularizer has queue_batches={self.queue_batches}, num_classes={self.num_classes}")
                return
            device = self.sums.device if self.initialized else saved.device
            self._allocate(D, saved.dtype, device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.initialized:
            self._ptr = int(self.ptr)


def _resolve_layer_names(model: nn.Module, names: Iterable[str]) -> list[tuple[str, nn.Module]]:
    modules = dict(model.named_modules())
    resolved = []
    for name in names:
        candidates = [name, "module." + name]
        if name.startswith("module."):
            candidates.append(name[len("module."):])
        found = next((c for c in candidates if c and c in modules), None)
        if found is None:
            valid = [n for n in modules if n]
            close = difflib.get_close_matches(name, valid, n=5, cutoff=0.4) or valid[:8]
            raise ValueError(f"NSR layer {name!r} is not a module of the model; closest valid names: "
                             f"{', '.join(close)}")
        resolved.append((name, modules[found]))
    return resolved


class NeuronSteadiness(nn.Module):
    """Neuron Steadiness Regularization for named layers of `model`.

        reg = NeuronSteadiness(model, layers={"out": 7.4865}, num_classes=10, queue_batches=5)
        logits = model(x)                         # hooks capture the named layers' outputs
        loss = F.cross_entropy(logits, y) + reg(y)

    layers: {name: lambda}, or a list of names sharing `lam`. Names come from model.named_modules();
        with DistributedDataParallel the "module." prefix is optional.
    queue_batches: K, how many recent batches (the current one included) estimate the class means.
    active_only: class means and loss use only entries > 0 (the original code's ReLU layers).
    per_channel: average N x C x H x W outputs over H, W first, so each channel is one neuron.
    sync: all-reduce batch statistics across ranks; default: when torch.distributed is initialised.
    check_labels: validate label values ("auto": every call on CPU, first call elsewhere, since
        reading values from an accelerator forces a host sync).
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, float] | Iterable[str],
                 num_classes: int, queue_batches: int = 1, active_only: bool = False,
                 per_channel: bool = False, lam: float = 1.0, sync: bool | None = None,
                 check_labels: bool | str = "auto"):
        super().__init__()
        if isinstance(layers, str):
            layers = [layers]
        if not isinstance(layers, Mapping):
            layers = {name: lam for name in layers}
        if not layers:
            raise ValueError("NSR needs at least one layer name, e.g. layers={'out': 0.5}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not isinstance(queue_batches, int) or queue_batches < 1:
            raise ValueError(f"queue_batches (K) must be a positive integer, got {queue_batches!r}")
        for name, weight in layers.items():
            weight = float(weight)
            if not weight >= 0 or weight == float("inf"):
                raise ValueError(f"lambda for NSR layer {name!r} must be finite and >= 0, got {weight}")
        if check_labels not in (True, False, "auto"):
            raise ValueError(f"check_labels must be True, False or 'auto', got {check_labels!r}")

        self.num_classes = num_classes
        self.queue_batches = queue_batches
        self.active_only = active_only
        self.per_channel = per_channel
        self.sync = sync
        self.check_labels = check_labels
        self.lambdas = {name: float(w) for name, w in layers.items()}
        self.names = list(self.lambdas)
        self.memories = nn.ModuleList(
            ClassMeanMemory(num_classes, queue_batches, active_only) for _ in self.names)
        self.last: dict[str, torch.Tensor] = {}
        self._captured: dict[str, torch.Tensor] = {}
        self._labels_checked = False
        # A plain list, so the model is not registered as a submodule of the regularizer.
        self._handles = []
        for name, module in _resolve_layer_names(model, self.names):
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if not module.training:
                return
            if isinstance(output, (tuple, list)):
                output = output[0]
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"NSR layer {name!r} returned {type(output).__name__}, not a tensor")
            self._captured[name] = output
        return hook

    def remove(self) -> None:
        """Detach the hooks from the model and drop anything captured."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured.clear()

    def _responses(self, output: torch.Tensor) -> torch.Tensor:
        if self.per_channel and output.dim() > 2:
            output = output.flatten(2).mean(dim=2)
        # Statistics and the loss in at least float32, also under bf16/fp16 autocast.
        dtype = torch.promote_types(output.dtype, torch.float32)
        return output.flatten(1).to(dtype)

    def _check_labels(self, y: torch.Tensor, batch: int) -> None:
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"NSR labels must be a tensor, got {type(y).__name__}")
        if y.dim() != 1 or y.shape[0] != batch:
            raise ValueError(f"NSR labels must have shape ({batch},) to match the batch the layers saw, "
                             f"got {tuple(y.shape)}")
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"NSR labels must be an integer tensor of class indices, got {y.dtype}")
        if self.check_labels is True or (self.check_labels == "auto" and
                                         (y.device.type == "cpu" or not self._labels_checked)):
            if batch and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"NSR labels must lie in [0, {self.num_classes}), got values in "
                                 f"[{int(y.min())}, {int(y.max())}]")
            self._labels_checked = True

    def _sync_enabled(self) -> bool:
        if self.sync is not None:
            return self.sync
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """The weighted NSR term for the last forward pass, given its labels."""
        missing = [n for n in self.names if n not in self._captured]
        if missing:
            raise ValueError(f"NSR found no captured output for layer(s) {missing}: call the model "
                             "in training mode (model.train()) before each reg(y), once per step")
        outputs = [self._captured.pop(n) for n in self.names]
        batch = outputs[0].shape[0]
        self._check_labels(y, batch)
        y = y.to(device=outputs[0].device, dtype=torch.long)

        responses, stats = [], []
        for output, memory in zip(outputs, self.memories):
            z = self._responses(output)
            active = (z > 0) if self.active_only else None
            responses.append((z, active))
            stats.append(memory.batch_statistics(z, y, active))
        if self._sync_enabled():
            # One all-reduce for all layers: every rank then holds identical memories.
            tensors = [t for pair in stats for t in pair]
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.all_reduce(flat)
            pieces = iter(p.view_as(t) for p, t in zip(flat.split([t.numel() for t in tensors]), tensors))
            stats = [(next(pieces), next(pieces)) for _ in stats]

        total = None
        self.last = {}
        for name, (z, active), (sums, counts), memory in zip(self.names, responses, stats, self.memories):
            if memory.initialized and memory.sums.device != z.device:
                memory.to(z.device)
            memory.push(sums, counts)
            loss = steadiness_loss(z, y, memory.means(), active)
            self.last[name] = loss.detach()
            term = self.lambdas[name] * loss
            total = term if total is None else total + term
        return total

    def class_means(self, name: str | None = None) -> torch.Tensor:
        """Current class means (C x D) of a layer (the first one by default)."""
        memory = self.memories[self.names.index(name) if name else 0]
        if not memory.initialized:
            raise ValueError("NSR memory is empty: run at least one training step first")
        return memory.means()

    def extra_repr(self) -> str:
        return (f"layers={self.lambdas}, num_classes={self.num_classes}, "
                f"queue_batches={self.queue_batches}, active_only={self.active_only}, "
                f"per_channel={self.per_channel}")
