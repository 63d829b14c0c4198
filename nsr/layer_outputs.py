"""What NSR and center loss share: forward hooks that keep named layers' outputs of a training-mode
forward pass (each acting only for the module it was registered on, so copies of the model are
never regularized), the layers' λ, the one rule for numeric and boolean arguments, the checks of
the labels the regularizer is called with, and the rules for `sync`, `check_labels` and `last`
(the base class LayerRegularizer).

This file imports torch only (as regularizer.py and center_loss.py, which use it).
"""

from __future__ import annotations

import difflib
import math
import numbers
import weakref
from collections.abc import Iterable, Mapping, MutableMapping

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
    """The module of each name of model.named_modules(); the wrappers' prefixes are optional.
    Two names of one module (e.g. "fc" and "module.fc") are refused: its output would count twice."""
    modules = dict(model.named_modules())
    bare = {}  # by name without prefixes; neither the root nor a wrapper itself
    for full, module in modules.items():
        if full and _unwrapped(full + "."):
            bare.setdefault(_unwrapped(full), module)
    found: dict[str, nn.Module] = {}
    for name in names:
        module = modules.get(name) if name else None
        module = bare.get(_unwrapped(name)) if module is None else module  # not `or`: an empty Sequential is falsy
        if module is None:
            close = difflib.get_close_matches(name, list(bare), n=5, cutoff=0.4) or list(bare)[:8]
            raise ValueError(f"{what} layer {name!r} is not a module of the model; closest valid names: "
                             f"{', '.join(close)}")
        same = [other for other, m in found.items() if m is module]
        if same:
            raise ValueError(f"{what} layers {same[0]!r} and {name!r} are the same module of the model; "
                             "name each layer once")
        found[name] = module
    return list(found.values())


class Capture:
    """The forward hook on one layer: in training mode it keeps the layer's output in `captured`.

    It acts only for the module it was registered on (held by a weak reference, so the hook does
    not keep the model alive): a copy of the model (copy.deepcopy, e.g. an EMA or mean-teacher
    model) carries a copy of the hook, and that copy, pickled through __reduce__ like torch.save
    and pickle do, is inert. So a teacher's forward never overwrites the student's output, and a
    model saved whole loads elsewhere without a live hook (and without the captured tensors)."""

    def __init__(self, captured: dict | None = None, name: str = "", what: str = "",
                 module: nn.Module | None = None):
        self.captured, self.name, self.what = captured, name, what
        self.module = weakref.ref(module) if module is not None else None

    def __call__(self, module, inputs, output) -> None:
        if self.module is None or module is not self.module() or not module.training:
            return
        output = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"{self.what} layer {self.name!r} returned {type(output).__name__}, not a tensor")
        self.captured[self.name] = output

    def __reduce__(self):
        return Capture, (None, self.name, self.what)  # a copy captures nothing (see the docstring)


class LayerOutputs:
    """Forward hooks on the named layers. take() hands over the outputs of the last training-mode
    forward pass as B x D tensors (per_channel: N x C x H x W averaged over H, W first), in float32
    at least, also under bf16/fp16 autocast. A plain object, so the model never becomes a
    submodule of the regularizer that holds it."""

    def __init__(self, model: nn.Module, names: list[str], what: str, per_channel: bool = False):
        self.names, self.what, self.per_channel = names, what, per_channel
        self._captured: dict[str, torch.Tensor] = {}
        self._handles = [module.register_forward_hook(Capture(self._captured, name, what, module))
                         for name, module in zip(names, find_layers(model, names, what))]
        self._unhooked: str | None = None  # why take() cannot work any more, once it cannot

    def __getstate__(self) -> dict:
        # What a copy of the regularizer gets (copy.deepcopy, pickle, torch.save): the model's hooks
        # write into the original's dict, so a copy would wait for outputs forever; it says so.
        return {"names": list(self.names), "what": self.what, "per_channel": self.per_channel,
                "_captured": {}, "_handles": [],
                "_unhooked": f"this {self.what} regularizer is a copy (copy.deepcopy, pickle or torch.save), "
                             "and a copy has no hooks on the model; build a new one for the copied model"}

    def take(self) -> list[torch.Tensor]:
        if self._unhooked:
            raise ValueError(self._unhooked)
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
        return output.to(dtype)

    def remove(self) -> None:
        """Detach the hooks from the model and drop anything captured."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured.clear()
        if not self._unhooked:
            self._unhooked = f"this {self.what} regularizer was removed: its hooks are gone; make a new one"


# One rule for every numeric and boolean argument of NeuronSteadiness, CenterLoss and
# ClassMeanMemory: a number is anything numbers.Integral / numbers.Real says it is (Python's int
# and float, numpy's int64 and float32, fractions), never a bool or a string; a flag is True or
# False (numpy's bool too), never a string or a number that happens to be truthy.

def _shown(value) -> str:
    try:
        return f"{value!r:.60}"
    except ValueError:  # an int of more than 4,300 digits has no repr
        return "an integer too large to print"


def count_arg(what: str, value) -> int:
    """A count: an integer (not a bool) >= 1, returned as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {_shown(value)}")
    return int(value)


def real_arg(what: str, value, bounds: str = ">= 0", low: float = 0.0, high: float = math.inf) -> float:
    """A real number (not a bool or a string), finite and in [low, high], returned as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number (int or float), got {_shown(value)} of type {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        number = math.inf
    if not (math.isfinite(number) and low <= number <= high):
        raise ValueError(f"{what} must be a finite number {bounds}, got {_shown(value)}")
    return number


def flag_arg(what: str, value, also: tuple = ()) -> bool:
    """True or False (numpy's bool too, recognised by its type so that numpy stays optional); the
    values in `also` (e.g. None, "auto") are returned as they are."""
    if any(value is v or (isinstance(value, str) and value == v) for v in also):
        return value
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    choices = [*map(repr, also), "True", "False"]
    raise ValueError(f"{what} must be {', '.join(choices[:-1])} or {choices[-1]}, got {_shown(value)} of type "
                     f"{type(value).__name__}")


def check_lambda(name: str, value, what: str) -> float:
    """A layer's λ: a real number, finite and >= 0."""
    return real_arg(f"lambda for {what} layer {name!r}", value)


class Lambdas(MutableMapping):
    """{layer: λ}, checked on every set (check_lambda). Its layers are fixed: setting an unknown
    one or deleting one is an error (set λ to 0 to switch a layer's term off)."""

    def __init__(self, values: Mapping[str, float], what: str):
        self._what = what
        self._values = {name: check_lambda(name, value, what) for name, value in values.items()}

    def __getitem__(self, name: str) -> float:
        return self._values[name]

    def __setitem__(self, name: str, value) -> None:
        if name not in self._values:
            raise ValueError(f"{name!r} is not one of the {self._what} layers {list(self._values)}")
        self._values[name] = check_lambda(name, value, self._what)

    def __delitem__(self, name: str) -> None:
        raise ValueError(f"the {self._what} layers are fixed; set lambdas[{name!r}] = 0 to switch a layer off")

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return repr(self._values)


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


class LayerRegularizer(nn.Module):
    """A regularizer on named layers of `model`, called as reg(y) after each training forward pass.

    layers: {name: λ}, a list of names sharing `lam`, or one name. Names come from
        model.named_modules(); the prefixes "module." (DistributedDataParallel) and "_orig_mod."
        (torch.compile) are optional. `reg.lambdas` is read at every call and checked on every set.
    sync: all-reduce batch statistics across ranks. None (default): decided at the first call,
        on when a torch.distributed group of more than one rank is running.
    check_labels: range-check label values before anything changes. "auto": the first call
        (reading values off an accelerator is a host sync, and on the CPU it costs ~2 % of a small
        MLP's step). True: every call. False: never. Shape and dtype are always checked. On the
        CPU an unchecked bad label still fails with the same error: torch's own index check finds
        it, after the memory slot the call would have written was cleared (its pointer has not
        moved, so the next call rewrites that slot). On an accelerator it is a device-side assert.
    After a call, `reg.last` gives each layer's unweighted loss (detached).
    Subclasses compute their term in regularize(zs, y).
    """

    what = "regularizer"  # the name in messages

    def __init__(self, model: nn.Module, layers: Mapping[str, float] | Iterable[str] | str, num_classes: int,
                 lam: float = 1.0, sync: bool | None = None, check_labels: bool | str = "auto",
                 per_channel: bool = False):
        super().__init__()
        if isinstance(layers, str):
            layers = [layers]
        if not isinstance(layers, Mapping):
            layers = list(layers)
            twice = [name for name in layers if layers.count(name) > 1]
            if twice:
                raise ValueError(f"{self.what} layer {twice[0]!r} is named twice; name each layer once")
            layers = {name: lam for name in layers}
        if not layers:
            raise ValueError(f"{self.what} needs at least one layer name, e.g. layers={{'out': 0.5}}")
        num_classes = count_arg("num_classes", num_classes)
        check_labels = flag_arg("check_labels", check_labels, also=("auto",))
        sync = flag_arg("sync", sync, also=(None,))
        self.per_channel = flag_arg("per_channel", per_channel)
        self.names = list(layers)
        self.lambdas = layers
        self.num_classes, self.sync, self.check_labels = num_classes, sync, check_labels
        self.outputs = LayerOutputs(model, self.names, self.what, self.per_channel)
        self._last: dict[str, torch.Tensor] = {}
        self._labels_checked = False

    @property
    def lambdas(self) -> Lambdas:
        """{layer: λ}; set one entry (reg.lambdas["fc"] = 0.5) or a whole dict of the same layers."""
        return self._lambdas

    @lambdas.setter
    def lambdas(self, value: Mapping[str, float]) -> None:
        if not isinstance(value, Mapping) or set(value) != set(self.names):
            raise ValueError(f"lambdas must name exactly the {self.what} layers {self.names}, got {value!r}")
        self._lambdas = Lambdas({name: value[name] for name in self.names}, self.what)

    @property
    def last(self) -> dict[str, torch.Tensor]:
        """Each layer's unweighted loss in the last call (detached)."""
        return dict(self._last)

    def remove(self) -> None:
        """Detach the hooks from the model and drop anything captured; the regularizer is done."""
        self.outputs.remove()

    def layer_index(self, name: str | None) -> int:
        """The position of layer `name` in self.names (the first one for None)."""
        if name is None:
            return 0
        if name not in self.names:
            raise ValueError(f"{name!r} is not one of the {self.what} layers {self.names}")
        return self.names.index(name)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """The λ-weighted term for the last training forward pass, given its labels."""
        zs = self.outputs.take()
        check_label_tensor(y, zs, self.what)
        if self.check_labels is True or (self.check_labels == "auto" and not self._labels_checked):
            check_label_range(y, self.num_classes, self.what)
            self._labels_checked = True
        if self.sync is None:
            self.sync = distributed()
        try:
            return self.regularize(zs, y.to(device=zs[0].device, dtype=torch.long))
        except (IndexError, RuntimeError):
            check_label_range(y, self.num_classes, self.what)  # torch's index check found a bad label: say so
            raise

    def regularize(self, zs: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """The λ-weighted term from the layers' responses zs (B x D each) and int64 labels y."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"layers={self.lambdas!r}, num_classes={self.num_classes}"
