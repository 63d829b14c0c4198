"""Configuration: one schema; a YAML file sets the defaults and the command line overrides them.

    cfg = parse_args(["--config", "configs/mlp4.yaml", "--lr", "0.05"])

Every setting is declared once, as a field of Config made by `setting()`: its type, default, help,
choices, and when a run reads it. The parser, the YAML check, --help and what a run records all
come from that declaration. Every key is a YAML key and a flag (`batch_size` <-> `--batch-size`).
Unknown keys, wrong types and bad values raise UserError with one line that names the key and the fix.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any

import torch

from models import MODELS, check_dropout
from nsr.center_loss import CenterLoss
from nsr.layer_outputs import check_lambda
from nsr.regularizer import NeuronSteadiness

from .data import DATASETS
from .errors import ArgumentParser, UserError, closest
from .yamlfile import load_yaml

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}
REGULARIZED = ("nsr", "center")  # the values of `regularizer` that train with a regularizer


def setting(default: Any, help: str, *, choices: tuple[str, ...] = (), key: str | None = None,
            read_if: tuple[str, tuple[str, ...]] | None = None, command_line_only: bool = False,
            formerly: str | None = None) -> Any:
    """A Config field and everything the parser, the YAML check and --help need to know of it.

    choices: the values it takes. key: its YAML/flag name when the attribute cannot be
    (`lambda` is a Python keyword). read_if=(other, values): the run reads it only when setting
    `other` has one of `values` (a flag for it is refused otherwise, and nothing records it).
    command_line_only: it describes one invocation, not the experiment (no YAML, not saved).
    formerly: its old name, now an error that names this one."""
    metadata = {"help": help, "choices": choices, "key": key, "read_if": read_if,
                "command_line_only": command_line_only, "formerly": formerly}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Config:
    # what to train
    model: str = setting("mlp4", "the network", choices=tuple(MODELS))
    dataset: str = setting("mnist", "the data set", choices=tuple(DATASETS))
    data_dir: str = setting("./data", "where the data set is, or is downloaded to")
    val_size: int | None = setting(None, "validation samples cut from the training set (seeded); "
                                         "none: 10,000 for sets of 50,000 or more, a fifth of smaller ones")
    # optimisation
    epochs: int = setting(100, "training epochs")
    batch_size: int = setting(100, "training batch size")
    eval_batch_size: int = setting(1000, "batch size of validation and test")
    optimizer: str = setting("sgd", "the optimizer", choices=("sgd", "adam", "adamw"))
    lr: float = setting(0.01, "learning rate")
    momentum: float = setting(0.0, "SGD momentum", read_if=("optimizer", ("sgd",)))
    nesterov: bool = setting(False, "Nesterov momentum", read_if=("optimizer", ("sgd",)))
    weight_decay: float = setting(0.0, "L2 weight decay")
    scheduler: str = setting("none", "learning-rate schedule", choices=("none", "multistep", "cosine"))
    milestones: list[int] = setting([], "epochs after which lr is multiplied by gamma",
                                    read_if=("scheduler", ("multistep",)))
    gamma: float = setting(0.1, "lr factor at each milestone", read_if=("scheduler", ("multistep",)))
    augment: str = setting("none", "training-set augmentation",
                           choices=("none", "crop_flip", "crop_flip_cutout", "imagenet"))
    cutout: int = setting(16, "side of the Cutout square in pixels, 0 for none",
                          read_if=("augment", ("crop_flip_cutout",)))
    # the regularizer: NSR, or center loss on the same layers with the same lambdas
    regularizer: str = setting("nsr", "center: center loss (Wen et al. 2016); none: vanilla",
                               choices=("nsr", "center", "none"))
    regularized_layers: list[str] = setting(
        ["out"], "module names to regularize (NSR or center loss), from model.named_modules()",
        read_if=("regularizer", REGULARIZED), formerly="nsr_layers")
    lambda_: list[float] = setting([7.4865], "regularizer weight (NSR or center loss), one value per "
                                   "layer (or one for all)", key="lambda", read_if=("regularizer", REGULARIZED))
    queue_batches: int = setting(5, "K: recent batches that estimate the class means",
                                 read_if=("regularizer", ("nsr",)))
    active_only: bool = setting(False, "count only responses > 0 (for ReLU outputs)",
                                read_if=("regularizer", ("nsr",)))
    per_channel: bool = setting(False, "one neuron per channel of N x C x H x W outputs",
                                read_if=("regularizer", ("nsr",)))
    center_alpha: float = setting(0.5, "rate in [0, 1] at which the class centres move",
                                  read_if=("regularizer", ("center",)))
    # other baselines
    label_smoothing: float = setting(0.0, "epsilon in [0, 1) of the training cross-entropy; "
                                          "evaluation is unchanged")
    dropout: float = setting(0.0, "dropout rate in [0, 1) after each hidden activation of an MLP")
    best_on_tie: str = setting("first", "which of several epochs with the best validation accuracy gives the "
                                        "test accuracy; latest: the original code's rule",
                               choices=("first", "latest"))
    # run
    seed: int = setting(0, "seed of weights, split, shuffles and augmentation")
    out: str = setting("", "output folder (default runs/<model>-<dataset>-<nsr|center|vanilla>-s<seed>)")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    amp: str = setting("auto", "mixed precision; auto: bf16 on CUDA", choices=("auto", "bf16", "fp16", "off"))
    channels_last: str = setting("auto", "NHWC memory format; auto: on for CNNs on CUDA",
                                 choices=("auto", "on", "off"))
    workers: int = setting(8, "data-loading processes (streamed data sets)")
    threads: int = setting(0, "CPU threads; 0: 1 for MLPs (small matmuls), torch's default else")
    fake_size: int = setting(512, "training samples of the fake data set", read_if=("dataset", ("fake",)))
    max_steps: int | None = setting(None, "stop after N optimizer steps (smoke tests)")
    tensorboard: bool = setting(True, "write TensorBoard event files into OUT/tb/ while training (needs the "
                                      "tensorboard package)")
    resume: bool = setting(False, "continue from OUT/last.pt", command_line_only=True)
    overwrite: bool = setting(False, "replace the run in OUT", command_line_only=True)
    quiet: bool = setting(False, "no progress bars", command_line_only=True)


# The views of the declaration that other modules read, keyed by YAML/flag name.
SETTINGS: dict[str, Field] = {f.metadata["key"] or f.name: f for f in fields(Config)}
CLI_ONLY = frozenset(k for k, f in SETTINGS.items() if f.metadata["command_line_only"])
REGULARIZER_KEYS = tuple(k for k, f in SETTINGS.items()
                         if f.metadata["read_if"] and f.metadata["read_if"][0] == "regularizer")
RENAMED = {f.metadata["formerly"]: k for k, f in SETTINGS.items() if f.metadata["formerly"]}
SAVED = "checkpoint config"  # the source of from_dict's settings, in messages


def _closest(name: str, valid: list[str], what: str = "keys") -> str:
    match = closest(name, valid)
    return f"; did you mean {match!r}?" if match else f"; valid {what}: {', '.join(valid)}"


def _coerce(key: str, value: Any, type_str: str, source: str) -> Any:
    """Turn a YAML value or a command-line string into the key's type, or raise UserError."""
    optional = "None" in type_str
    if value is None or (isinstance(value, str) and value.lower() in {"none", "null"} and optional):
        if optional:
            return None
        raise UserError(f"{source}: {key} must not be empty")
    try:
        if type_str.startswith("list"):
            item = float if "float" in type_str else int if "int" in type_str else str
            items = value if isinstance(value, list) else [value]
            if isinstance(value, str) and "," in value:
                items = [v for v in value.split(",") if v.strip()]
            return [_scalar(item, v) for v in items]
        base = type_str.replace(" | None", "")
        return _scalar({"int": int, "float": float, "bool": bool, "str": str}[base], value)
    except (TypeError, ValueError):
        kind = type_str.replace(" | None", " or null").replace("list[", "list of ").rstrip("]")
        raise UserError(f"{source}: {key} expects {kind}, got {value!r}") from None


def _scalar(kind, value):
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if isinstance(value, (dict, list)):
        raise ValueError(value)
    return str(value)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _get(cfg: Config, key: str) -> Any:
    return getattr(cfg, SETTINGS[key].name)


def apply_overrides(cfg: Config, values: dict[str, Any], source: str) -> Config:
    """Set keys on cfg, checking names and types; `source` says where they came from."""
    on_command_line = source == "command line"
    valid = [k for k in SETTINGS if on_command_line or k not in CLI_ONLY]
    spelled: dict[str, str] = {}
    for given, value in values.items():
        key = str(given).replace("-", "_")
        if key in spelled:  # batch-size and batch_size: one key, and one value would be dropped
            raise UserError(f"{source}: {key!r} is given twice (as {spelled[key]!r} and {str(given)!r}); keep one")
        spelled[key] = str(given)
        if key in RENAMED:
            old, new = (_flag(key), _flag(RENAMED[key])) if on_command_line else (repr(key), repr(RENAMED[key]))
            fix = ("the checkpoint is older than the new name: read it with the version of the project that "
                   "wrote it") if source == SAVED else "rename it"
            raise UserError(f"{source}: {old} is now called {new}; {fix}")
        if key in CLI_ONLY and not on_command_line:
            raise UserError(f"{source}: {key!r} is a command-line option only ({_flag(key)}); remove it")
        if key not in valid:
            raise UserError(f"{source}: unknown key {key!r}{_closest(key, valid)}")
        setattr(cfg, SETTINGS[key].name, _coerce(key, value, SETTINGS[key].type, source))
    return cfg


class _Once(argparse.Action):
    """--config: one file sets the defaults; a second one would silently replace the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        first = getattr(namespace, self.dest, None)
        if first is not None:
            parser.error(f"{option_string} given twice ({first}, {values}); one YAML file sets the defaults: "
                         "merge them into one, and put single changes on the command line")
        setattr(namespace, self.dest, values)


def _help(f: Field) -> str:
    """The declared help, then the choices, when the run reads it and the default."""
    meta, notes = f.metadata, []
    if meta["choices"]:
        notes.append(" | ".join(meta["choices"]))
    if meta["read_if"]:
        other, values = meta["read_if"]
        notes.append(f"read with {_flag(other)} {' or '.join(values)}")
    default = f.default_factory() if callable(f.default_factory) else f.default
    if not meta["command_line_only"] and default != "":  # out: its help says what empty means
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        notes.append(f"default {'none' if shown in ('', None) else shown}")
    return meta["help"] + (f" ({'; '.join(notes)})" if notes else "")


def _add_flag(parser: argparse.ArgumentParser, key: str, f: Field, helptext: str) -> None:
    if f.type == "bool":
        parser.add_argument(_flag(key), action=argparse.BooleanOptionalAction, help=helptext)
    elif f.type.startswith("list"):
        parser.add_argument(_flag(key), nargs="+", metavar=key.upper(), help=helptext)
    else:
        parser.add_argument(_flag(key), metavar=key.upper(), help=helptext)


def build_parser(description: str = "") -> argparse.ArgumentParser:
    parser = ArgumentParser(description=description, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", action=_Once, help="YAML file whose keys set the defaults below")
    for key, f in SETTINGS.items():
        _add_flag(parser, key, f, _help(f))
    for old, new in RENAMED.items():  # hidden: apply_overrides refuses them, naming the new flag
        _add_flag(parser, old, SETTINGS[new], argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None, default_config: str | None = None, description: str = "",
               fixed: dict[str, Any] | None = None) -> Config:
    """Config from (schema defaults) < YAML file < command line.

    `fixed`: settings the script decides (fdnn_vanilla.py: regularizer none); a YAML file or flag
    that sets one of them otherwise is refused, not overridden in silence. A flag the resulting
    run would not read (unused_settings) is refused too: it would change nothing."""
    args = vars(build_parser(description).parse_args(argv))
    cfg = apply_overrides(Config(), fixed or {}, "script defaults")
    config_path = args.pop("config", default_config)
    sources = [(load_yaml(config_path), f"config {config_path}")] if config_path else []
    for values, source in [*sources, (args, "command line")]:
        apply_overrides(cfg, values, source)
        for key, value in (fixed or {}).items():
            if _get(cfg, key) != value:
                given = f"{_flag(key)} {_get(cfg, key)}" if source == "command line" \
                    else f"{source} sets {key}: {_get(cfg, key)}"
                raise UserError(f"{given}: this script always trains with {key} {value!r}; drop it, or use "
                                "the script made for that setting (fdnn_nsr.py, cnn_nsr.py)")
    validate(cfg)
    unused = unused_settings(cfg)
    for key in args:
        if key in unused:
            raise UserError(f"{_flag(key)} has no effect here: {unused[key]}; drop it")
    return cfg


def unused_settings(cfg: Config) -> dict[str, str]:
    """{key: why} of the settings this run does not read (their `read_if`). A flag for one of them
    is refused by parse_args, and config.yaml and checkpoints leave them out (to_dict): nothing
    records them as used."""
    unused = {}
    for key, f in SETTINGS.items():
        if f.metadata["read_if"]:
            other, values = f.metadata["read_if"]
            if _get(cfg, other) not in values:
                unused[key] = f"only {_flag(other)} {' or '.join(values)} uses it (this run: {_get(cfg, other)})"
    return unused


def validate(cfg: Config) -> None:
    """Checks that need several keys or value ranges; each failure is one actionable line."""
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other: --resume continues the run in "
                        "--out, --overwrite replaces it; pass one of them")
    for key, f in SETTINGS.items():
        choices, value = list(f.metadata["choices"]), _get(cfg, key)
        if choices and value not in choices:
            raise UserError(f"unknown {key} {value!r}{_closest(str(value), choices, 'values')}")
    for key in ("epochs", "batch_size", "eval_batch_size", "queue_batches", "fake_size"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    for key in ("max_steps", "val_size"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise UserError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    _check_machine_counts(cfg)
    if not 0 <= cfg.seed < 2**32:
        raise UserError(f"seed must lie in 0..{2**32 - 1}, got {cfg.seed}")
    if cfg.cutout < 0:
        raise UserError(f"cutout must be >= 0 (0: no Cutout), got {cfg.cutout}")
    for key in ("lr", "momentum", "weight_decay", "gamma"):
        value = getattr(cfg, key)
        if not math.isfinite(value) or value < 0:
            raise UserError(f"{key} must be a finite number >= 0, got {value}")
    _check_device(cfg.device)
    if any(m < 1 for m in cfg.milestones):
        raise UserError(f"milestones are epochs (1 or more) after which lr is multiplied by gamma, "
                        f"got {cfg.milestones}")
    if cfg.optimizer == "sgd" and cfg.nesterov and cfg.momentum == 0:
        raise UserError("nesterov needs momentum > 0; set momentum (e.g. --momentum 0.9) or --no-nesterov")
    _check_baselines(cfg)
    if cfg.regularizer != "none":
        _check_regularized_layers(cfg)


def _check_regularized_layers(cfg: Config) -> None:
    """One lambda per layer (a single one is repeated for every layer). Each lambda is checked by
    the library's own rule, here, before anything loads; a layer named twice is refused by the
    library when the run builds the regularizer (nsr/train/build.py)."""
    layers = cfg.regularized_layers
    if not layers:
        raise UserError(f"regularizer {cfg.regularizer} is on but regularized_layers is empty; name a layer "
                        "(e.g. --regularized-layers out) or train vanilla with --regularizer none")
    if len(cfg.lambda_) == 1 and len(layers) > 1:
        cfg.lambda_ = cfg.lambda_ * len(layers)
    if len(cfg.lambda_) != len(layers):
        raise UserError(f"got {len(cfg.lambda_)} lambda values for {len(layers)} regularized layers "
                        f"({', '.join(layers)}); give one value per layer or a single value")
    what = CenterLoss.what if cfg.regularizer == "center" else NeuronSteadiness.what
    try:
        for name, lam in zip(layers, cfg.lambda_):
            check_lambda(name, lam, what)
    except ValueError as e:
        raise UserError(str(e)) from None


def _check_baselines(cfg: Config) -> None:
    """The regularizer's options and the other baselines; dropout by the models' own rule."""
    if cfg.regularizer == "center" and (cfg.active_only or cfg.per_channel):
        raise UserError("active_only and per_channel are NSR options; center loss takes neither: "
                        "drop them or use --regularizer nsr")
    if not (math.isfinite(cfg.center_alpha) and 0 <= cfg.center_alpha <= 1):
        raise UserError(f"center_alpha must lie in [0, 1], got {cfg.center_alpha}")
    if not (math.isfinite(cfg.label_smoothing) and 0 <= cfg.label_smoothing < 1):
        raise UserError(f"label_smoothing must lie in [0, 1) (0: off), got {cfg.label_smoothing}")
    try:
        check_dropout(cfg.model, cfg.dropout)
    except ValueError as e:
        raise UserError(str(e)) from None


def _check_device(device: str) -> None:
    """A device this torch, on this machine, can train on: refused here, in one line, rather than
    by the first tensor moved there."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "it was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserError(f"device {device!r} asked for, but this torch cannot use CUDA here ({why}); "
                            "use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if ":" in device and int(device.split(":")[1]) >= count:
            raise UserError(f"device {device!r} asked for, but this machine has {count} CUDA GPU(s): "
                            f"cuda:0..cuda:{count - 1}; choose one of them, or --device cuda")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' asked for, but this torch cannot use Apple's MPS here; use --device cpu "
                        "(or auto)")


def _check_machine_counts(cfg: Config) -> None:
    """threads and workers start OS threads and processes: a number far beyond the machine's CPUs
    would exhaust it (torch even crashes at exit with threads=10**6) instead of running faster."""
    limit = 4 * (os.cpu_count() or 1) + 32
    for key, meaning in (("threads", "0 picks automatically"), ("workers", "data-loading processes")):
        value = getattr(cfg, key)
        if not 0 <= value <= limit:
            raise UserError(f"{key} must lie in 0..{limit} on this machine ({os.cpu_count()} CPUs; "
                            f"{meaning}), got {value}")


def to_dict(cfg: Config) -> dict[str, Any]:
    """The settings of the run as YAML/JSON keys (`lambda`, not `lambda_`), without those it does
    not read (unused_settings): what config.yaml and checkpoints record."""
    unused, values = unused_settings(cfg), asdict(cfg)
    return {key: values[f.name] for key, f in SETTINGS.items() if key not in unused}


def from_dict(values: dict[str, Any]) -> Config:
    """The Config of a checkpoint's saved settings (to_dict's output)."""
    return apply_overrides(Config(), {k: v for k, v in values.items() if k not in CLI_ONLY}, SAVED)
