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
from typing import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["NeuronSteadiness", "ClassMeanMemory", "steadiness_loss"]

_LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _masked_loss(z: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """mean((z - target)**2), or under a 0/1 mask sum(mask * (z - target)**2) / max(sum(mask), 1)."""
    if mask is None:
        # F.mse_loss's op without its Python-level broadcasting (the shapes are equal here):
        # one op and one backward node. 1 is reduction="mean".
        return torch._C._nn.mse_loss(z, target, 1)
    diff = (z - target) * mask
    # max(count, 1) keeps "no active entry" at 0 instead of 0/0, without a host sync.
    return (diff * diff).sum() / mask.sum().clamp_min(1)


def steadiness_loss(z: torch.Tensor, y: torch.Tensor, class_means: torch.Tensor,
                    active: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared distance of each response to its class mean.

    z: B x D responses, y: B labels, class_means: C x D (treated as constants, no gradient).
    active: optional B x D boolean mask; the mean is then over active entries only (0 if none).
    """
    target = class_means.detach().to(z.dtype).index_select(0, y)
    return _masked_loss(z, target, None if active is None else active.to(z.dtype))


class _Hot:
    """Plain references for the per-step path, so it makes no nn.Module attribute lookups."""

    __slots__ = ("ring", "slots", "total", "sums", "counts", "zeros", "p", "width", "dtype", "device",
                 "rows", "rows_z", "scale_key", "scales")

    def __init__(self, ring: torch.Tensor, total: torch.Tensor, p: int, dim: int):
        self.ring, self.slots, self.total, self.p = ring, ring.unbind(0), total, p
        self.sums, self.counts = total[:, :dim], total[:, dim:]
        self.width, self.dtype, self.device = total.shape[1], total.dtype, total.device
        self.zeros = torch.zeros_like(total)  # the base of the out-of-place index_add into a slot
        self.rows = self.rows_z = None  # a B x W [z | 1] buffer, its count column filled once
        self.scale_key = self.scales = None


class ClassMeanMemory(nn.Module):
    """Per-class response sums and counts of the last K batches, kept as buffers.

    Each row of width W is [sums of the D neurons | counts]: one count column, or D count columns
    under active_only. Keeping sums and counts side by side lets one index_add gather a batch and
    one add update the totals.

    `ring` ((K + 1) x C x W) holds one slot per batch, `total` (C x W) the sum of the K newest,
    `ptr` the free slot the next batch is written to (MoCo's queue idea, plus one spare slot).
    A step writes the batch into the free slot (nothing else changes if its labels are invalid),
    adds it to `total`, and subtracts the oldest slot, which becomes the next free one: O(C*W)
    whatever K is. `total` is re-summed exactly from the ring each time the pointer wraps, so
    float rounding from add/subtract never accumulates past K + 1 steps.
    Buffers are created on the first update (D is not known before), and by load_state_dict.
    """

    def __init__(self, num_classes: int, queue_batches: int, active_only: bool):
        super().__init__()
        self.num_classes = num_classes
        self.queue_batches = queue_batches
        self.active_only = active_only
        self._hot = None  # remade whenever the buffers are (re)made or moved
        for name in ("ring", "total", "ptr"):
            self.register_buffer(name, None)  # allocated lazily

    @property
    def initialized(self) -> bool:
        return self.total is not None

    def _width_to_dim(self, width: int) -> int:
        return width // 2 if self.active_only else width - 1

    @property
    def dim(self) -> int:
        """D, the number of neurons (0 before the first update)."""
        return self._width_to_dim(self.total.shape[1]) if self.initialized else 0

    @property
    def sums(self) -> torch.Tensor:
        """C x D summed responses of the last K batches (a view of `total`)."""
        return self.total[:, :self.dim]

    @property
    def counts(self) -> torch.Tensor:
        """Counts over the last K batches: C (samples per class), or C x D under active_only."""
        c = self.total[:, self.dim:]
        return c if self.active_only else c[:, 0]

    def means(self) -> torch.Tensor:
        """C x D class means (0 for a class, or a class and neuron, with nothing counted)."""
        return self.sums / self.total[:, self.dim:].clamp_min(1)

    def _refresh(self) -> None:
        if self.total is None:
            self._hot = None
            return
        p = self._hot.p if self._hot is not None else int(self.ptr) % (self.queue_batches + 1)
        self._hot = _Hot(self.ring, self.total, p, self.dim)

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .double(), ...: buffers are new tensors
        result = super()._apply(fn, *args, **kwargs)
        self._refresh()
        return result

    def _allocate(self, width: int, dtype: torch.dtype, device: torch.device) -> None:
        K, C = self.queue_batches, self.num_classes
        self.register_buffer("ring", torch.zeros(K + 1, C, width, dtype=dtype, device=device))
        self.register_buffer("total", torch.zeros(C, width, dtype=dtype, device=device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))
        self._hot = None
        self._refresh()

    def augment(self, z: torch.Tensor) -> torch.Tensor:
        """B x W rows [z | 1], or [z * (z > 0) | (z > 0)] under active_only (a new tensor).

        Call it with detached z, or with gradients disabled (NeuronSteadiness does the latter).
        """
        if self.active_only:
            return torch.cat([z.relu(), (z > 0).to(z.dtype)], dim=1)  # relu(z) == z * (z > 0)
        return torch.cat([z, z.new_ones(z.shape[0], 1)], dim=1)

    def _hot_for(self, z: torch.Tensor) -> _Hot:
        """The per-step state, (re)made first if z's width, dtype or device does not match it."""
        hot = self._hot
        width = 2 * z.shape[1] if self.active_only else z.shape[1] + 1
        if hot is None or hot.width != width or hot.dtype is not z.dtype or hot.device != z.device:
            hot = self._prepare(width, z.dtype, z.device)
        return hot

    def _rows(self, z: torch.Tensor, hot: _Hot) -> torch.Tensor:
        """`augment(z)` for z matching `hot`, gradients off. Without active_only the rows are a
        buffer that the next call overwrites: one copy instead of a cat and a new tensor."""
        if self.active_only:
            return self.augment(z)
        rows = hot.rows
        if rows is None or rows.shape[0] != z.shape[0]:
            rows = hot.rows = z.new_ones(z.shape[0], hot.width)
            hot.rows_z = rows[:, :-1]
        hot.rows_z.copy_(z)
        return rows

    def batch_statistics(self, rows: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """C x W per-class sums of `augment` rows (to all-reduce before `push`)."""
        return rows.new_zeros(self.num_classes, rows.shape[1]).index_add_(0, y, rows)

    def _prepare(self, width: int, dtype: torch.dtype, device: torch.device) -> _Hot:
        if self.total is None:
            self._allocate(width, dtype, device)
        elif self.total.shape[1] != width:
            raise ValueError(
                f"layer output changed width from {self.dim} to {self._width_to_dim(width)} neurons; "
                "NSR memory needs a fixed response size (use per_channel=True for varying spatial size)")
        elif self.total.device != device or self.total.dtype != dtype:
            self.to(device=device, dtype=dtype)  # e.g. loaded on CPU, used on GPU
        return self._hot

    @torch.no_grad()
    def push(self, rows: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Enter one batch as the newest of the K, dropping the oldest.

        rows: `augment` rows with their labels y, or (y=None) C x W `batch_statistics`.
        With labels, an index error (a label outside [0, C)) leaves the memory as it was.
        """
        self._push(rows, y)

    def _push(self, rows: torch.Tensor, y: torch.Tensor | None, hot: _Hot | None = None) -> None:
        """push, with gradients off; `hot` when the caller has just made it match the rows."""
        if hot is None:
            hot = self._hot
            if hot is None or hot.width != rows.shape[1] or hot.dtype is not rows.dtype or hot.device != rows.device:
                hot = self._prepare(rows.shape[1], rows.dtype, rows.device)
        p, total, slots = hot.p, hot.total, hot.slots
        slot = slots[p]
        if y is None:
            slot.copy_(rows)
        else:  # slot = 0 + per-class sums of rows: one call, and it checks every label's range
            torch.index_add(hot.zeros, 0, y, rows, out=slot)
        p = (p + 1) % (self.queue_batches + 1)  # the oldest of the window: the next free slot
        if self.queue_batches == 1:
            total.copy_(slot)
        elif p == 0:  # exact re-sum once per lap: O(K*C*W) every K + 1 steps is O(C*W) per step
            slots[0].zero_()
            torch.sum(hot.ring, dim=0, out=total)
        else:
            total.add_(slot).sub_(slots[p])
        hot.p = p  # the pointer lives on the host; the `ptr` buffer gets it in state_dict()

    def means_of(self, y: torch.Tensor) -> torch.Tensor:
        """B x D: the class mean of each label of the batch just pushed."""
        hot = self._hot
        if self.active_only:  # a (class, neuron) of the batch may have no active entry: 0, not 0/0
            return (hot.sums / hot.counts.clamp_min(1)).index_select(0, y)
        # Without active_only each label of the batch was just counted, so its count is >= 1;
        # other classes may divide by 0, but they are not selected.
        return (hot.sums / hot.counts).index_select(0, y)

    def _scales(self, n: int, dtype: torch.dtype, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(lam / n, 1 / n) as 0-dim CPU tensors of `dtype`, cached while n and dtype stay the same.

        Multiplying by a tensor skips the conversion of a Python number that every op with a
        scalar argument makes, in forward and in backward.
        """
        hot = self._hot
        key = (n, dtype, lam)
        if hot.scale_key != key:
            hot.scale_key = key
            hot.scales = (torch.tensor(lam / n, dtype=dtype), torch.tensor(1.0 / n, dtype=dtype))
        return hot.scales

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._hot is not None:
            self.ptr.fill_(self._hot.p)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "ring"
        if key in state_dict:
            saved = state_dict[key]
            slots, C, W = saved.shape
            if (slots, C) != (self.queue_batches + 1, self.num_classes):
                error_msgs.append(
                    f"NSR memory {prefix!r} was saved with queue_batches={slots - 1}, num_classes={C}; "
                    f"this regularizer has queue_batches={self.queue_batches}, num_classes={self.num_classes}")
                return
            device = self.total.device if self.initialized else saved.device
            self._allocate(W, saved.dtype, device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._hot = None
        self._refresh()  # the pointer comes from the loaded `ptr` buffer


# Prefixes that wrappers add to named_modules(): DistributedDataParallel / DataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _without_wrappers(name: str) -> str:
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def _resolve_layer_names(model: nn.Module, names: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) for each name; a name may leave out or add the wrappers' prefixes."""
    modules = dict(model.named_modules())
    unwrapped = {}
    for full, module in modules.items():
        if full and _without_wrappers(full + "."):  # not the root or a wrapper itself
            unwrapped.setdefault(_without_wrappers(full), module)
    resolved = []
    for name in names:
        module = modules.get(name) if name else None
        if module is None:
            module = unwrapped.get(_without_wrappers(name))
        if module is None:
            valid = list(unwrapped)
            close = difflib.get_close_matches(name, valid, n=5, cutoff=0.4) or valid[:8]
            raise ValueError(f"NSR layer {name!r} is not a module of the model; closest valid names: "
                             f"{', '.join(close)}")
        resolved.append((name, module))
    return resolved


class NeuronSteadiness(nn.Module):
    """Neuron Steadiness Regularization for named layers of `model`.

        reg = NeuronSteadiness(model, layers={"out": 7.4865}, num_classes=10, queue_batches=5)
        logits = model(x)                         # hooks capture the named layers' outputs
        loss = F.cross_entropy(logits, y) + reg(y)

    layers: {name: lambda}, or a list of names sharing `lam`. Names come from model.named_modules();
        the prefixes that DistributedDataParallel ("module.") and torch.compile ("_orig_mod.") add
        are optional.
    queue_batches: K, how many recent batches (the current one included) estimate the class means.
    active_only: class means and loss use only entries > 0 (the original code's ReLU layers).
    per_channel: average N x C x H x W outputs over H, W first, so each channel is one neuron.
    sync: all-reduce batch statistics across ranks; default: when torch.distributed is initialised.
    check_labels: range-check label values. "auto": every call on CPU (the index_add that enters
        the batch into memory checks them anyway, so this costs nothing), on the first call only
        on accelerators, where reading values forces a host sync. True: every call, everywhere.
        False: never on accelerators. Shape and dtype of the labels are always checked.
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
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if isinstance(queue_batches, bool) or not isinstance(queue_batches, int) or queue_batches < 1:
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
        self._layers = [(name, self.lambdas[name], memory) for name, memory in zip(self.names, self.memories)]
        self._last: list = []  # (name, detached loss or sum of squares, None or 1/n) of the last call
        self._captured: dict[str, torch.Tensor] = {}
        self._labels_checked = False
        # A plain list, so the model is not registered as a submodule of the regularizer.
        self._handles = []
        for name, module in _resolve_layer_names(model, self.names):
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        captured = self._captured

        def hook(module, inputs, output):
            if not module.training:
                return
            if isinstance(output, (tuple, list)):
                output = output[0]
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"NSR layer {name!r} returned {type(output).__name__}, not a tensor")
            captured[name] = output
        return hook

    def remove(self) -> None:
        """Detach the hooks from the model and drop anything captured."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured.clear()

    def _responses(self, output: torch.Tensor) -> torch.Tensor:
        dim = output.dim()
        if dim < 2:
            raise ValueError(f"NSR needs layer outputs of shape (batch, ...), got {tuple(output.shape)}")
        # Statistics and the loss in at least float32, also under bf16/fp16 autocast.
        dtype = output.dtype
        if dtype is not torch.float32 and dtype is not torch.float64:
            dtype = torch.promote_types(dtype, torch.float32)
        if dim > 2:
            if self.per_channel:
                return output.flatten(2).mean(dim=2, dtype=dtype)
            output = output.flatten(1)
        return output if output.dtype is dtype else output.to(dtype)

    def _check_labels(self, y: torch.Tensor, batch: int) -> None:
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"NSR labels must be a tensor, got {type(y).__name__}")
        if y.dim() != 1 or y.shape[0] != batch:
            raise ValueError(f"NSR labels must have shape ({batch},) to match the batch the layers saw, "
                             f"got {tuple(y.shape)}")
        if y.dtype not in _LABEL_DTYPES:
            raise ValueError(f"NSR labels must be an integer tensor of class indices, got {y.dtype}")
        check = self.check_labels
        if check is True or (check == "auto" and not self._labels_checked and y.device.type != "cpu"):
            # Reading values from an accelerator is a host sync: "auto" does it on the first call
            # only. On CPU, the index_add that enters the batch into memory checks every label.
            self._raise_if_out_of_range(y)
            self._labels_checked = True

    def _raise_if_out_of_range(self, y: torch.Tensor) -> None:
        if y.numel():
            lo, hi = (int(v) for v in torch.aminmax(y))
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"NSR labels must lie in [0, {self.num_classes}), got values in [{lo}, {hi}]")

    def _sync_enabled(self) -> bool:
        if self.sync is not None:
            return self.sync
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        # Straight to forward: nn.Module.__call__'s hook dispatch costs more than NSR's own Python
        # on small layers, and nothing hooks a regularizer.
        return self.forward(y)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """The weighted NSR term for the last forward pass, given its labels."""
        captured, layers = self._captured, self._layers
        if len(captured) != len(layers):
            missing = [name for name, _, _ in layers if name not in captured]
            raise ValueError(f"NSR found no captured output for layer(s) {missing}: call the model "
                             "in training mode (model.train()) before each reg(y), once per step")
        outputs = [captured.pop(name) for name, _, _ in layers]  # drop the references right away
        zs = [self._responses(output) for output in outputs]
        first = zs[0]
        self._check_labels(y, first.shape[0])
        if y.dtype is not torch.int64 or y.device != first.device:
            y = y.to(device=first.device, dtype=torch.long)

        grad_mode = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # the memory sees detached responses (no detach ops)
        try:
            hots = [memory._hot_for(z) for z, (_, _, memory) in zip(zs, layers)]
            rows = [memory._rows(z, hot) for z, hot, (_, _, memory) in zip(zs, hots, layers)]
            if self._sync_enabled():
                self._push_synced(rows, y)
            else:
                for r, hot, (_, _, memory) in zip(rows, hots, layers):
                    memory._push(r, y, hot)
        except (IndexError, RuntimeError) as error:
            # A label outside [0, C)? The failed index_add wrote only scratch space.
            self._raise_if_out_of_range(y.cpu())
            raise error
        finally:
            torch._C._set_grad_enabled(grad_mode)

        total = None
        last = []
        active_only = self.active_only
        for z, r, (name, lam, memory) in zip(zs, rows, layers):
            target = memory.means_of(y)
            if active_only:
                loss = _masked_loss(z, target, r[:, z.shape[1]:])  # mask: the (z > 0) columns, as 0/1
                weighted = loss * lam
                last.append((name, loss.detach(), None))
            else:
                # The mean as sum * (1/n): the sum form of mse_loss is one kernel less than its
                # mean form, and lam/n folds into the one multiply the weighting needs anyway.
                squares = torch._C._nn.mse_loss(z, target, 2)  # 2 is reduction="sum"
                lam_n, inv_n = memory._scales(max(z.numel(), 1), squares.dtype, lam)
                weighted = squares * lam_n
                last.append((name, squares.detach(), inv_n))  # the mean is formed if asked for
            total = weighted if total is None else total + weighted
        self.__dict__["_last"] = last  # a plain attribute: skip nn.Module.__setattr__'s checks
        return total

    @property
    def last(self) -> dict[str, torch.Tensor]:
        """Per-layer NSR losses (unweighted, detached) of the last call."""
        return {name: value if scale is None else value * scale for name, value, scale in self._last}

    def _push_synced(self, rows: list[torch.Tensor], y: torch.Tensor) -> None:
        """Per-class statistics of the local batch, one all-reduce for all layers: every rank then
        enters the same global batch statistics and holds identical memories."""
        memories = [memory for _, _, memory in self._layers]
        stats = [memory.batch_statistics(r, y) for r, memory in zip(rows, memories)]
        dtype = stats[0].dtype
        for st in stats[1:]:
            dtype = torch.promote_types(dtype, st.dtype)
        flat = torch.cat([st.reshape(-1).to(dtype) for st in stats])
        dist.all_reduce(flat)
        for piece, st, memory in zip(flat.split([st.numel() for st in stats]), stats, memories):
            memory._push(piece.view_as(st).to(st.dtype), None)

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
