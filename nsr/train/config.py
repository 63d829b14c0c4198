"""Configuration: one schema; a YAML file sets the defaults and the command line overrides them.

    cfg = parse_args(["--config", "configs/mlp4.yaml", "--lr", "0.05"])

Every key is a YAML key and a flag (`batch_size` <-> `--batch-size`). Unknown keys, wrong types
and bad values raise UserError with one line that names the key and the fix.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import yaml

from models import MODELS, is_mlp

from .data import DATASETS
from .errors import ArgumentParser, UserError, closest

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


@dataclass
class Config:
    # what to train
    model: str = "mlp4"
    dataset: str = "mnist"
    data_dir: str = "./data"
    val_size: int | None = None         # None: 10,000 for MNIST-sized sets, 20 % for digits
    # optimisation
    epochs: int = 100
    batch_size: int = 100
    eval_batch_size: int = 1000
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    scheduler: str = "none"             # none | multistep | cosine
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    augment: str = "none"               # none | crop_flip | crop_flip_cutout | imagenet
    cutout: int = 16
    regularizer: str = "nsr"            # nsr | center | none (vanilla)
    nsr_layers: list[str] = field(default_factory=lambda: ["out"])
    lambda_: list[float] = field(default_factory=lambda: [7.4865])
    queue_batches: int = 5
    active_only: bool = False
    per_channel: bool = False
    center_alpha: float = 0.5           # center loss: rate at which the class centres move
    # other baselines
    label_smoothing: float = 0.0        # epsilon of the training cross-entropy (evaluation unchanged)
    dropout: float = 0.0                # rate after each hidden activation; MLPs only
    # run
    seed: int = 0
    out: str = ""                       # empty: runs/<model>-<dataset>-<nsr|vanilla>-s<seed>
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    amp: str = "auto"                   # auto (bf16 on CUDA) | bf16 | fp16 | off
    channels_last: str = "auto"         # auto (on for CNNs on CUDA) | on | off
    workers: int = 8
    threads: int = 0                    # CPU threads; 0: 1 for MLPs (small matmuls), torch's default else
    fake_size: int = 512                # training samples of the `fake` data set
    max_steps: int | None = None        # stop after this many optimizer steps (smoke tests)
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False


# Keys whose YAML/flag name differs from the attribute ("lambda" is a Python keyword).
_ATTR = {"lambda": "lambda_"}
_KEY = {v: k for k, v in _ATTR.items()}
# Keys that describe one invocation, not the experiment: allowed on the command line only.
CLI_ONLY = {"resume", "overwrite", "quiet"}
# The settings of the regularizers (NSR and center loss); a run with regularizer none reads none.
REGULARIZER_KEYS = ("nsr_layers", "lambda", "queue_batches", "active_only", "per_channel", "center_alpha")

CHOICES = {
    "optimizer": ["sgd", "adam", "adamw"],
    "scheduler": ["none", "multistep", "cosine"],
    "augment": ["none", "crop_flip", "crop_flip_cutout", "imagenet"],
    "amp": ["auto", "bf16", "fp16", "off"],
    "channels_last": ["auto", "on", "off"],
    "regularizer": ["nsr", "center", "none"],
}
HELP = {
    "config": "YAML file whose keys set the defaults below",
    "model": "mlp3 | mlp4 | mlp6 | mlp8 | mlp10 | resnet18 | vgg19 | resnet50",
    "dataset": "mnist | fashion-mnist | digits | fake | cifar10 | imagenet",
    "data_dir": "where the data set is, or is downloaded to",
    "val_size": "validation samples cut from the training set (seeded)",
    "lambda": "regularizer weight (NSR or center loss), one value per layer (or one for all)",
    "nsr_layers": "module names to regularize (NSR or center loss), from model.named_modules()",
    "regularizer": "nsr | center (center loss, Wen et al. 2016) | none",
    "center_alpha": "center loss: rate in [0, 1] at which the class centres move",
    "label_smoothing": "epsilon in [0, 1) of the training cross-entropy",
    "dropout": "dropout rate in [0, 1) after each hidden activation (MLPs only)",
    "queue_batches": "K: recent batches that estimate the class means",
    "max_steps": "stop after N optimizer steps (smoke tests)",
    "resume": "continue from OUT/last.pt",
    "overwrite": "replace a finished run in OUT",
    "quiet": "no progress bars",
}


def key_names() -> list[str]:
    return [_KEY.get(f.name, f.name) for f in fields(Config)]


def _field_types() -> dict[str, Any]:
    defaults = Config()
    return {_KEY.get(f.name, f.name): (f.type, getattr(defaults, f.name)) for f in fields(Config)}


def _closest(name: str, valid: list[str]) -> str:
    match = closest(name, valid)
    return f"; did you mean {match!r}?" if match else f"; valid keys: {', '.join(valid)}"


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML would
    keep the last value and drop the first without a word."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: its keys merge in below (construct_mapping), later keys win
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: construct_mapping's own error says so
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first at line {first.start_mark.line + 1}); "
                    "keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(stream) -> Any:
    """yaml.safe_load that refuses duplicate keys (a yaml.YAMLError naming the key and its lines)."""
    return yaml.load(stream, Loader=_UniqueKeyLoader)  # safe: a SafeLoader subclass


def load_yaml(path: str) -> dict[str, Any]:
    if os.path.isdir(path):
        raise UserError(f"config file {path!r} is a folder; pass a YAML file to --config")
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} not found; pass an existing YAML file to --config")
    try:
        with open(path) as f:
            data = safe_load_unique(f)
    except UnicodeDecodeError:
        raise UserError(f"config file {path!r} is not a text YAML file; pass a YAML file to --config") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise UserError(f"config file {path!r} is not valid YAML{line}: "
                        f"{getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path!r} must hold a mapping of keys to values, "
                        f"got {type(data).__name__}")
    return data


def apply_overrides(cfg: Config, values: dict[str, Any], source: str) -> Config:
    """Set keys on cfg, checking names and types; `source` says where they came from."""
    types = _field_types()
    valid = [k for k in types if k not in CLI_ONLY or source == "command line"]
    spelled: dict[str, str] = {}
    for given, value in values.items():
        key = str(given).replace("-", "_") if str(given) != "lambda" else "lambda"
        if key in spelled:  # batch-size and batch_size: one key, and one value would be dropped
            raise UserError(f"{source}: {key!r} is given twice (as {spelled[key]!r} and {str(given)!r}); keep one")
        spelled[key] = str(given)
        if key in CLI_ONLY and key not in valid:
            raise UserError(f"{source}: {key!r} is a command-line option only (--{key}); remove it")
        if key not in valid:
            raise UserError(f"{source}: unknown key {key!r}{_closest(key, valid)}")
        setattr(cfg, _ATTR.get(key, key), _coerce(key, value, types[key][0], source))
    return cfg


class _Once(argparse.Action):
    """--config: one file sets the defaults; a second one would silently replace the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        first = getattr(namespace, self.dest, None)
        if first is not None:
            parser.error(f"{option_string} given twice ({first}, {values}); one YAML file sets the defaults: "
                         "merge them into one, and put single changes on the command line")
        setattr(namespace, self.dest, values)


def build_parser(description: str = "") -> argparse.ArgumentParser:
    parser = ArgumentParser(description=description, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", action=_Once, help=HELP["config"])
    for key, (type_str, default) in _field_types().items():
        flag = "--" + key.replace("_", "-")
        helptext = HELP.get(key, "") + (f" (default {default})" if key not in CLI_ONLY else "")
        if type_str == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=helptext)
        elif type_str.startswith("list"):
            parser.add_argument(flag, nargs="+", metavar=key.upper(), help=helptext)
        else:
            parser.add_argument(flag, metavar=key.upper(), choices=CHOICES.get(key), help=helptext)
    return parser


def parse_args(argv: list[str] | None = None, default_config: str | None = None,
               defaults: dict[str, Any] | None = None, description: str = "",
               fixed: dict[str, Any] | None = None) -> Config:
    """Config from (schema defaults) < `defaults` < YAML file < command line.

    `fixed`: settings the script decides (fdnn_vanilla.py: regularizer none); a YAML file or flag
    that sets one of them otherwise is refused, not overridden in silence. A flag the resulting
    run would not read (unused_settings) is refused too: it would change nothing."""
    args = vars(build_parser(description).parse_args(argv))
    cfg = Config()
    fixed = fixed or {}
    if defaults or fixed:
        apply_overrides(cfg, {**(defaults or {}), **fixed}, "script defaults")
    config_path = args.pop("config", default_config)
    sources = [(load_yaml(config_path), f"config {config_path}")] if config_path else []
    for values, source in [*sources, (args, "command line")]:
        apply_overrides(cfg, values, source)
        for key, value in fixed.items():
            if getattr(cfg, _ATTR.get(key, key)) != value:
                given = f"--{key.replace('_', '-')} {getattr(cfg, _ATTR.get(key, key))}" \
                    if source == "command line" else f"{source} sets {key}: {getattr(cfg, _ATTR.get(key, key))}"
                raise UserError(f"{given}: this script always trains with {key} {value!r}; drop it, or use "
                                "the script made for that setting (fdnn_nsr.py, cnn_nsr.py)")
    validate(cfg)
    unused = unused_settings(cfg)
    for key in args:
        if key in unused:
            raise UserError(f"--{key.replace('_', '-')} has no effect here: {unused[key]}; drop it")
    return cfg


def unused_settings(cfg: Config) -> dict[str, str]:
    """{key: why} of the settings this run does not read (they depend on another setting: the
    regularizer, the optimizer, the scheduler, ...). A flag for one of them is refused by parse_args,
    and config.yaml and checkpoints leave them out (to_dict): nothing records them as used."""
    unused = {}

    def mark(keys, why):
        unused.update(dict.fromkeys(keys, why))

    if cfg.regularizer == "none":
        mark(REGULARIZER_KEYS, "a run with regularizer 'none' (vanilla) has no regularizer")
    elif cfg.regularizer == "center":
        mark(("queue_batches", "active_only", "per_channel"), "it is an NSR setting; center loss does not use it")
    else:
        mark(("center_alpha",), "it is a center-loss setting; NSR does not use it (--regularizer center does)")
    if cfg.scheduler != "multistep":
        mark(("milestones", "gamma"), f"only --scheduler multistep uses it (this run: {cfg.scheduler})")
    if cfg.optimizer != "sgd":
        mark(("momentum", "nesterov"), f"only --optimizer sgd uses it ({cfg.optimizer} has no such setting)")
    if cfg.augment != "crop_flip_cutout":
        mark(("cutout",), f"only --augment crop_flip_cutout uses it (this run: {cfg.augment})")
    if cfg.dataset != "fake":
        mark(("fake_size",), f"only --dataset fake uses it (this run: {cfg.dataset})")
    return unused


def validate(cfg: Config) -> None:
    """Checks that need several keys or value ranges; each failure is one actionable line."""
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other: --resume continues the run in "
                        "--out, --overwrite replaces it; pass one of them")
    if cfg.model not in MODELS:
        raise UserError(f"unknown model {cfg.model!r}{_closest(cfg.model, list(MODELS))}")
    if cfg.dataset not in DATASETS:
        raise UserError(f"unknown dataset {cfg.dataset!r}{_closest(cfg.dataset, list(DATASETS))}")
    for key in ("epochs", "batch_size", "eval_batch_size", "queue_batches", "fake_size"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    for key in ("max_steps",):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise UserError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.val_size is not None and cfg.val_size < 1:
        raise UserError(f"val_size must be at least 1, got {cfg.val_size}")
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
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise UserError(f"{key} must be one of {', '.join(choices)}, got {getattr(cfg, key)!r}")
    _check_baselines(cfg)
    if cfg.regularizer != "none":
        if not cfg.nsr_layers:
            raise UserError("nsr is on but nsr_layers is empty; name a layer (e.g. --nsr-layers out) "
                            "or train vanilla with --regularizer none")
        for lam in cfg.lambda_:
            if not math.isfinite(lam) or lam < 0:
                raise UserError(f"lambda must be finite and >= 0, got {lam}")
        repeated = sorted({n for n in cfg.nsr_layers if cfg.nsr_layers.count(n) > 1})
        if repeated:
            raise UserError(f"NSR layer {repeated[0]!r} is named twice in nsr_layers; name each layer once")
        if len(cfg.lambda_) == 1 and len(cfg.nsr_layers) > 1:
            cfg.lambda_ = cfg.lambda_ * len(cfg.nsr_layers)
        if len(cfg.lambda_) != len(cfg.nsr_layers):
            raise UserError(f"got {len(cfg.lambda_)} lambda values for {len(cfg.nsr_layers)} NSR layers "
                            f"({', '.join(cfg.nsr_layers)}); give one value per layer or a single value")


def _check_baselines(cfg: Config) -> None:
    """The regularizer and the other baselines (issue 14)."""
    if cfg.regularizer == "center" and (cfg.active_only or cfg.per_channel):
        raise UserError("active_only and per_channel are NSR options; center loss takes neither: "
                        "drop them or use --regularizer nsr")
    if not (math.isfinite(cfg.center_alpha) and 0 <= cfg.center_alpha <= 1):
        raise UserError(f"center_alpha must lie in [0, 1], got {cfg.center_alpha}")
    for key in ("label_smoothing", "dropout"):
        value = getattr(cfg, key)
        if not (math.isfinite(value) and 0 <= value < 1):
            raise UserError(f"{key} must lie in [0, 1) (0: off), got {value}")
    if cfg.dropout and not is_mlp(cfg.model):
        raise UserError(f"dropout is for the MLPs only; model {cfg.model} has none: set dropout to 0")


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
    unused = unused_settings(cfg)
    return {_KEY.get(k, k): v for k, v in asdict(cfg).items() if _KEY.get(k, k) not in unused}


def from_dict(values: dict[str, Any]) -> Config:
    return apply_overrides(Config(), {k: v for k, v in values.items() if k not in CLI_ONLY},
                           "checkpoint config")
