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

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .layer_outputs import LayerRegularizer, count_arg, flag_arg

__all__ = ["NeuronSteadiness", "ClassMeanMemory", "steadiness_loss"]


def steadiness_loss(z: torch.Tensor, y: torch.Tensor, class_means: torch.Tensor,
                    active: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared distance of each response to its class mean.

    z: B x D responses, y: B labels, class_means: C x D (treated as constants, no gradient).
    active: optional B x D mask (bool or 0/1); the mean is then over active entries only (0 if none).
    """
    target = class_means.detach().to(z.dtype).index_select(0, y)
    if not z.numel():
        return z.sum()  # an empty batch: 0 (F.mse_loss would give 0/0)
    if active is None:
        return F.mse_loss(z, target)  # 1/(B*D) * sum of squares
    mask = active.to(z.dtype)
    return ((z - target).square() * mask).sum() / mask.sum().clamp_min(1)  # 0, not 0/0, if none is active


class ClassMeanMemory(nn.Module):
    """One layer's per-class response sums and counts over the last K batches: a queue of K slots,
    one batch each, where the newest batch overwrites the oldest (as MoCo's queue does).

        sums    K x C x D  buffer: slot k, row c = the sum of class c's responses in batch k
        counts  K x C x D  buffer, active_only: how many responses > 0 each sum adds up
                K x C x 1  buffer, otherwise: how many samples of class c batch k had
        ptr     int        the slot the next batch overwrites (MoCo's queue_ptr)

    The class means are sums summed over the K slots / counts summed over the K slots (0 where
    nothing was counted). `ptr` is a plain int, so a step never reads a tensor back from a GPU (a
    host sync); get_extra_state saves it in the state_dict (as a 0-d tensor), so a resumed run
    overwrites the same slot next.

    The buffers are made at the first push, when D is known, or by load_state_dict; until then
    they are None and the state_dict holds only the pointer. torch's lazy modules
    (LazyModuleMixin with UninitializedBuffer) do the same job but do not fit here: a lazy
    module cannot be deep-copied before its first step (and a regularizer is, e.g. by the
    training engine's checkpoint check), its state_dict then holds an UninitializedBuffer that
    torch.load(weights_only=True) refuses, and once made, a lazy module cannot load a state
    saved before the first step. What the lazy machinery would save is the first branch of _fit,
    which makes the buffers, and the last lines of _check_loaded.
    """

    def __init__(self, num_classes: int, queue_batches: int, active_only: bool = False, layer: str = ""):
        super().__init__()
        self.num_classes = count_arg("num_classes", num_classes)
        self.queue_batches = count_arg("queue_batches (K)", queue_batches)
        self.active_only = flag_arg("active_only", active_only)
        self.layer = layer  # its name in messages
        self.ptr = 0
        self.register_buffer("sums", None)
        self.register_buffer("counts", None)
        self.register_load_state_dict_pre_hook(_check_loaded)

    def push(self, z: torch.Tensor, y: torch.Tensor, sync: bool = False) -> None:
        """Put one batch in the slot at `ptr`: z, B x D detached responses; y, B int64 labels.
        sync: all-reduce the slot, so every rank holds the class sums of the global batch."""
        sums, counts = self.sums, self.counts
        if sums is None or sums.shape[2] != z.shape[1] or sums.dtype != z.dtype or sums.device != z.device:
            sums, counts = self._fit(z)
        # Each sample adds to the sums of its class; with active_only only its entries > 0 count.
        if self.active_only:
            counted = (z > 0).to(z.dtype)
            z = z * counted
        else:
            counted = z.new_ones(z.shape[0], 1)
        sums, counts = sums[self.ptr].zero_(), counts[self.ptr].zero_()
        try:
            sums.index_add_(0, y, z)
            counts.index_add_(0, y, counted)
        except (IndexError, RuntimeError):  # a label out of range: leave the slot empty, not half-written
            sums.zero_(), counts.zero_()
            raise
        if sync:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        # Moved last: after a failure above (a label out of range) the next push rewrites this slot.
        self.ptr = (self.ptr + 1) % self.queue_batches

    def _fit(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers for responses like z: made at the first push; moved to z's device and dtype
        when loaded elsewhere (e.g. on the CPU for a GPU run); refused for another width D."""
        if self.sums is None:
            K, C, D = self.queue_batches, self.num_classes, z.shape[1]
            self.sums = z.new_zeros(K, C, D)
            self.counts = z.new_zeros(K, C, D if self.active_only else 1)
        elif self.sums.shape[2] != z.shape[1]:
            raise ValueError(f"NSR layer {self.layer!r} gives {z.shape[1]} neurons, but its memory holds "
                             f"{self.sums.shape[2]}: the memory needs a fixed response size (a changed input "
                             "size? use per_channel=True), and a loaded state must come from the same layers")
        else:
            self.to(device=z.device, dtype=z.dtype)
        return self.sums, self.counts

    def means(self) -> torch.Tensor:
        """The C x D class means over the K slots (0 for a class, or entry, never counted)."""
        if self.sums is None:
            raise ValueError("NSR memory is empty: run at least one training step first")
        return self.sums.sum(0) / self.counts.sum(0).clamp_min(1)

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.ptr)  # a tensor: checkpoint code may treat every entry as one

    def set_extra_state(self, state) -> None:
        if not isinstance(state, torch.Tensor) or state.numel() != 1 or state.is_floating_point() \
                or state.is_complex() or state.dtype == torch.bool:
            got = f"{state.dtype} of shape {tuple(state.shape)}" if isinstance(state, torch.Tensor) else repr(state)
            raise ValueError(f"NSR memory of layer {self.layer!r}: its saved pointer must be an integer tensor "
                             f"of one element, got {type(state).__name__} {got:.60}")
        if not 0 <= int(state) < self.queue_batches:
            raise ValueError(f"NSR memory of layer {self.layer!r}: its saved pointer {int(state)} lies outside "
                             f"[0, {self.queue_batches}) (queue_batches={self.queue_batches})")
        self.ptr = int(state)


def _check_loaded(memory: ClassMeanMemory, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: check the saved sums and counts as the memory itself would have
    made them (shapes, a floating dtype, finite sums, whole counts >= 0, sums 0 where nothing was
    counted), so that a damaged memory is refused here instead of failing, or quietly changing
    the loss, steps later. Then give a memory that has not made a step the saved shapes, or drop
    the buffers when the state was saved before the first step (a pointer at 0, nothing else)."""
    sums, counts = state_dict.get(prefix + "sums"), state_dict.get(prefix + "counts")
    where = f"NSR memory {prefix!r} of layer {memory.layer!r}"
    if sums is None and counts is None:
        ptr = state_dict.get(prefix + "_extra_state")
        if isinstance(ptr, torch.Tensor) and ptr.numel() == 1 and ptr.item() != 0:
            raise ValueError(f"{where}: its saved pointer is {ptr.item()} but it has no sums and counts; a memory "
                             "saved after a step has both (load the complete state)")
        memory.sums = memory.counts = None
        return
    K, C, active = memory.queue_batches, memory.num_classes, memory.active_only
    shapes = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in (sums, counts))
    D = shapes[0][2] if shapes[0] is not None and len(shapes[0]) == 3 else -1
    if shapes != ((K, C, D), (K, C, D if active else 1)):
        raise ValueError(f"{where}: saved sums and counts of shapes {shapes[0]} and {shapes[1]} do not fit "
                         f"queue_batches={K}, num_classes={C}, active_only={active} (sums K x C x D, counts "
                         f"K x C x {'D' if active else 1})")
    if not (sums.is_floating_point() and counts.is_floating_point()):
        raise ValueError(f"{where}: saved sums and counts are {sums.dtype} and {counts.dtype}; the memory holds "
                         "floating-point tensors (float32 or float64)")
    if not torch.isfinite(sums).all():
        raise ValueError(f"{where}: its saved sums hold NaN or infinite values")
    if not (torch.isfinite(counts).all() and (counts >= 0).all() and (counts == counts.round()).all()):
        raise ValueError(f"{where}: its saved counts must be whole numbers >= 0")
    if ((counts == 0) & (sums != 0)).any():
        raise ValueError(f"{where}: its saved sums are not 0 where nothing was counted")
    if memory.sums is not None and memory.sums.shape[2] != D:
        raise ValueError(f"NSR memory {prefix!r}: saved for {D} neurons, but layer {memory.layer!r} gives "
                         f"{memory.sums.shape[2]}: load it into the same layers of the same model")
    if memory.sums is None:
        memory.sums, memory.counts = torch.zeros_like(sums), torch.zeros_like(counts)


class NeuronSteadiness(LayerRegularizer):
    """Neuron Steadiness Regularization for named layers of `model`.

        reg = NeuronSteadiness(model, layers={"out": 7.4865}, num_classes=10, queue_batches=5)
        logits = model(x)                         # hooks capture the named layers' outputs
        loss = F.cross_entropy(logits, y) + reg(y)

    layers, lam, sync, check_labels, lambdas, last: as LayerRegularizer (nsr/layer_outputs.py),
        e.g. a λ warm-up over 5 epochs: reg.lambdas["out"] = 7.4865 * min(1.0, (epoch + 1) / 5)
    queue_batches: K, how many recent batches (the current one included) estimate the class means.
        The default, 5, is the paper's MLP setting: each class mean then comes from about 5·B/C
        samples instead of B/C (50 instead of 10 at batch 100 on 10 classes, and a class with 2
        samples in a batch is not pulled toward the mean of those 2 alone), a steadier target;
        with K = 1 the term is only the batch's own intra-class variance. A larger K costs
        K x C x D floats per layer and a sum over them each step. The paper's CNN configs use
        K = 1 (configs/resnet18_cifar10.yaml): pass queue_batches=1 to follow them.
    active_only: class means and loss use only entries > 0 (the original code's ReLU layers).
    per_channel: average N x C x H x W outputs over H, W first, so each channel is one neuron.
    Each layer has a ClassMeanMemory, in reg.memories (in the layers' order).
    An empty batch (no samples) adds 0 and leaves the memory as it was, as CenterLoss does; under
    sync every rank still takes part in the all-reduce (another rank's batch may not be empty).
    """

    what = "NSR"

    def __init__(self, model: nn.Module, layers: Mapping[str, float] | Iterable[str] | str,
                 num_classes: int, queue_batches: int = 5, active_only: bool = False,
                 per_channel: bool = False, lam: float = 1.0, sync: bool | None = None,
                 check_labels: bool | str = "auto"):
        queue_batches = count_arg("queue_batches (K)", queue_batches)
        active_only = flag_arg("active_only", active_only)
        super().__init__(model, layers, num_classes, lam, sync, check_labels, per_channel)
        self.queue_batches, self.active_only = queue_batches, active_only
        self.memories = nn.ModuleList(ClassMeanMemory(self.num_classes, queue_batches, active_only, name)
                                      for name in self.names)

    def regularize(self, zs: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        total = None
        for name, z, memory in zip(self.names, zs, self.memories):
            detached = z.detach()
            if len(y) or self.sync:
                memory.push(detached, y, self.sync)  # the current batch is one of the K
                loss = steadiness_loss(z, y, memory.means(), detached > 0 if self.active_only else None)
            else:
                loss = z.sum()  # an empty batch: 0, and nothing to remember
            self._last[name] = loss.detach()
            weighted = self.lambdas[name] * loss
            total = weighted if total is None else total + weighted
        return total

    @property
    def started(self) -> bool:
        """Whether every layer's memory exists: made at the first step, or loaded from a state saved after one."""
        return all(memory.sums is not None for memory in self.memories)

    def class_means(self, name: str | None = None) -> torch.Tensor:
        """Current class means (C x D) of a layer (the first one by default)."""
        return self.memories[self.layer_index(name)].means()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, queue_batches={self.queue_batches}, active_only={self.active_only}, "
                f"per_channel={self.per_channel}")
