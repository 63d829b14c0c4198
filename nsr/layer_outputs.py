"""What NSR and center loss share: forward hooks that keep named layers' outputs of a training-mode
forward pass, and the checks of the labels the regularizer is then called with.

This file imports torch only (as regularizer.py and center_loss.py, which use it).
"""

from __future__ import annotations

import difflib
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # added by DistributedDataParallel, torch.compile


def _unwrapped(name: str) -> str:
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def find_layers(model: nn.Module, names: Iterable[str], what: str = "NSR") -> list[nn.Module]:
    """The module of each name of model.named_modules(); the wrappers' prefixes are optional."""
    modules = dict(model.named_modules())
    bare = {}  # by name without prefixes; neither the root nor a wrapper itself
    for full, module in modules.items():
        if full and _unwrapped(full + "."):
            bare.setdefault(_unwrapped(full), module)
    found = []
    for name in names:
        module = modules.get(name) if name else None
        module = bare.get(_unwrapped(name)) if module is None else module  # not `or`: an empty Sequential is falsy
        if module is None:
            close = difflib.get_close_matches(name, list(bare), n=5, cutoff=0.4) or list(bare)[:8]
            raise ValueError(f"{what} layer {name!r} is not a module of the model; closest valid names: "
                             f"{', '.join(close)}")
        found.append(module)
    return found


class LayerOutputs:
    """Forward hooks on the named layers. take() hands over the outputs of the last training-mode
    forward pass as B x D tensors (per_channel: N x C x H x W averaged over H, W first), in float32
    at least, also under bf16/fp16 autocast. A plain object, so the model never becomes a
    submodule of the regularizer that holds it."""

    def __init__(self, model: nn.Module, names: list[str], what: str, per_channel: bool = False):
        self.names, self.what, self.per_channel = names, what, per_channel
        self._captured: dict[str, torch.Tensor] = {}
        self._handles = [module.register_forward_hook(self._hook(name))
                         for name, module in zip(names, find_layers(model, names, what))]

    def _hook(self, name: str):
        captured, what = self._captured, self.what  # not self: the model's hooks keep nothing else alive

        def hook(module, inputs, output):
            if module.training:
                output = output[0] if isinstance(output, (tuple, list)) else output
                if not isinstance(output, torch.Tensor):
                    raise TypeError(f"{what} layer {name!r} returned {type(output).__name__}, not a tensor")
                captured[name] = output
        return hook

    def take(self) -> list[torch.Tensor]:
        if len(self._captured) < len(self.names):  # it holds only these names
            missing = [name for name in self.names if name not in self._captured]
            self._captured.clear()
            raise ValueError(f"{self.what} found no captured output for layer(s) {missing}: call the model "
                             "in training mode (model.train()) before each reg(y), once per step")
        return [self._responses(self._captured.pop(name)) for name in self.names]

    def _responses(self, output: torch.Tensor) -> torch.Tensor:
        if output.dim() < 2:
            raise ValueError(f"{self.what} needs layer outputs of shape (batch, ...), got {tuple(output.shape)}")
        dtype = output.dtype if output.dtype in (torch.float32, torch.float64) else torch.float32
        if output.dim() > 2:
            output = output.flatten(2).mean(dim=2, dtype=dtype) if self.per_channel else output.flatten(1)
        return output if output.dtype == dtype else output.to(dtype)  # .to() is an op even when a no-op

    def remove(self) -> None:
        """Detach the hooks from the model and drop anything captured."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured.clear()


def check_label_tensor(y, zs: list[torch.Tensor], what: str) -> None:
    """Labels for the batch the layers saw: a 1-D integer tensor of its size."""
    batch = zs[0].shape[0]
    if any(z.shape[0] != batch for z in zs):
        raise ValueError(f"{what} layers saw different batch sizes {[z.shape[0] for z in zs]}")
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{what} labels must be a tensor, got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != batch:
        raise ValueError(f"{what} labels must have shape ({batch},) to match the batch the layers saw, "
                         f"got {tuple(y.shape)}")
    if y.dtype not in LABEL_DTYPES:
        raise ValueError(f"{what} labels must be an integer tensor of class indices, got {y.dtype}")


def check_label_range(y: torch.Tensor, num_classes: int, what: str) -> None:
    """Label values in [0, num_classes); reading them off an accelerator is a host sync."""
    lo, hi = (int(v) for v in torch.aminmax(y)) if y.numel() else (0, 0)
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{what} labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]")


def distributed() -> bool:
    """Whether a multi-rank torch.distributed group is running (the default of `sync`)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
