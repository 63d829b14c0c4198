"""The NNI experiment config python -m nsr search runs: configs/nni/*.yml read with NNI's own loader, the
command line's overrides applied (--max-trials, --trial-args, --gpu-indices, --cpu, ...), and
every check that can be made before NNI starts, the search space included."""

from __future__ import annotations

import argparse
import os
import re
import shlex
from pathlib import Path

from nsr.train.config import parse_args as parse_training_args
from nsr.train.yamlfile import safe_load_unique
from nsr.train.errors import UserError, one_line

from . import workarounds as nw


def _read_yaml(p: Path, path: str) -> None:
    """Clear messages for what NNI's loader reports badly: a missing, unreadable or v1 file."""
    import yaml

    if not p.is_file():
        raise UserError(f"NNI config {path!r} not found; pass one of configs/nni/*.yml")
    try:
        data = safe_load_unique(p.read_text(encoding="utf-8"))  # a key given twice is refused, not dropped
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"NNI config {path!r} is not valid YAML{where}: "
                        f"{getattr(e, 'problem', None) or one_line(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read NNI config {path!r}: {one_line(e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"NNI config {path!r} must be a mapping (NNI's v2 experiment config)")
    if "trainingServicePlatform" in data:
        raise UserError(f"NNI config {path!r} is in NNI's legacy v1 format; use the v2 format "
                        "of configs/nni/*.yml")


def load_config(path: str, args: argparse.Namespace):
    """ExperimentConfig from the YAML file, with the command line's overrides applied and checked
    (the search space too: NNI 3.0 checks it only once the experiment runs)."""
    from nni.experiment.config import ExperimentConfig

    p = Path(path)
    _read_yaml(p, path)
    try:
        # load() resolves relative paths (trialCodeDirectory) against the YAML file's folder.
        config = ExperimentConfig.load(str(p))
    except Exception as e:  # NNI raises assorted types for unknown or mistyped fields
        nw.forget_config_base_path()
        raise UserError(f"NNI config {path!r}: {one_line(e)}") from None

    if args.max_trials is not None:
        config.max_trial_number = args.max_trials
    if args.concurrency is not None:
        config.trial_concurrency = args.concurrency
    if args.max_duration is not None:
        config.max_experiment_duration = args.max_duration
    if args.experiment_dir is not None:
        config.experiment_working_directory = str(Path(args.experiment_dir).expanduser().resolve())
    platform = getattr(config.training_service, "platform", None)  # None: missing, or a list
    if platform is None and not isinstance(config.training_service, list):
        raise UserError(f"NNI config {path!r} has no trainingService; add "
                        "`trainingService: {platform: local}`")
    if platform != "local":
        raise UserError(f"NNI config {path!r}: python -m nsr search runs the local training service only; "
                        "use nnictl for other platforms")
    command = field(config, "trial_command")
    if not command:
        raise UserError(f"NNI config {path!r} has no trialCommand")
    if args.trial_args:
        try:
            extra = shlex.split(args.trial_args)
        except ValueError as e:
            raise UserError(f"--trial-args {args.trial_args!r}: {e}") from None
        code_dir = p.parent / str(field(config, "trial_code_directory") or ".")  # (an absolute one stays)
        _check_trial_args(command, extra, code_dir, args.trial_args)
        _set_field(config, "trial_command", f"{command} {shlex.join(extra)}")
    _apply_gpu_options(config, args)
    try:
        config.validate()
        space = config.canonical_copy().search_space
    except Exception as e:
        raise UserError(f"NNI config {path!r}: {one_line(e)}") from None
    nw.check_search_space(space, f"NNI config {path!r}")
    return config


def _check_trial_args(command: str, extra: list[str], code_dir, given: str) -> None:
    """--trial-args parsed with the trial command's own options, as its training script will parse
    them, so that a bad flag fails here, before NNI starts (python -m nsr reproduce checks --extra
    so too). $VARIABLES of the command stand for a value; a relative --config is the trial's."""
    try:
        tokens = shlex.split(command)
    except ValueError:
        return  # the command itself is NNI's to run and report
    script = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
    flags = [] if script is None else [re.sub(r"\$\{?\w+\}?", "trial", t) for t in tokens[script + 1:]
                                       if not re.fullmatch(r"\$\{?\w+\}?", t)]
    for i, token in enumerate(flags[:-1]):
        if token == "--config" and not os.path.isabs(flags[i + 1]):
            flags[i + 1] = os.path.join(str(code_dir), flags[i + 1])
    try:
        parse_training_args([*flags, *extra])
    except UserError as e:
        raise UserError(f"--trial-args {given!r}: {e}") from None


def field(config, name: str):
    """A training-service field, set either under trainingService or at the top level."""
    from nni.experiment.config.utils import is_missing

    value = getattr(config.training_service, name, None)
    if value is None or is_missing(value):
        value = getattr(config, name, None)
    return None if is_missing(value) else value


def _set_field(config, name: str, value) -> None:
    setattr(config, name, value)
    setattr(config.training_service, name, value)


def _parse_gpu_indices(text: str) -> list[int]:
    try:
        indices = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        indices = []
    if not indices or any(i < 0 for i in indices):
        raise UserError(f"--gpu-indices expects GPU numbers like 0 or 0,1; got {text!r}")
    return indices


def _apply_gpu_options(config, args: argparse.Namespace) -> None:
    ts = config.training_service
    if args.cpu:
        # trialGpuNumber 0: NNI sets CUDA_VISIBLE_DEVICES="" for the trial, so it trains on CPU.
        _set_field(config, "trial_gpu_number", 0)
        ts.gpu_indices = None
    elif args.gpu_indices is not None:
        indices = _parse_gpu_indices(args.gpu_indices)
        _set_field(config, "trial_gpu_number", field(config, "trial_gpu_number") or 1)
        ts.gpu_indices = indices
        if ts.use_active_gpu is None:
            ts.use_active_gpu = True
