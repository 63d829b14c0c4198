"""The training engine's link to NNI: hyper-parameters in, validation accuracy out.

Outside an NNI trial every function here is a silent no-op and `nni` is never imported
(importing it costs about a second, and its trial API prints a "without runtime" warning).

Inside a trial (started by `nnictl create` or `python -m nsr.search`):

    params = get_trial_parameters()     # e.g. {"lambda": 0.37} from the tuner
    ...
    report_intermediate(val_acc)        # every epoch, percent
    report_final(best_val_acc, test_acc)

The final metric is {"default": best_val_acc, "test_acc": test_acc}: the tuner maximises
"default", the best validation accuracy; the test accuracy is carried along for the record
and never optimised.
"""

from __future__ import annotations

import math
import os
from typing import Any

__all__ = ["in_trial", "get_trial_parameters", "config_overrides", "apply_trial_parameters", "report_intermediate", "report_final"]


def in_trial() -> bool:
    """True when this process was started by an NNI training service as a trial.

    NNI 3.0's trial keeper sets NNI_PLATFORM ("local", "remote", ...), NNI_TRIAL_JOB_ID,
    NNI_EXP_ID, NNI_OUTPUT_DIR and NNI_TRIAL_COMMAND_CHANNEL for every trial. NNI itself treats
    a missing NNI_PLATFORM, or "unittest", as "no runtime"; we also require the trial id.
    """
    platform = os.environ.get("NNI_PLATFORM", "")
    return platform not in ("", "unittest") and bool(os.environ.get("NNI_TRIAL_JOB_ID"))


def get_trial_parameters() -> dict[str, Any] | None:
    """The tuner's parameters for this trial, or None when not running as an NNI trial."""
    if not in_trial():
        return None
    import nni

    params = nni.get_next_parameter()
    return dict(params) if params else {}


def config_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """The tuner's parameters as config keys. A search space names one layer (`nsr_layer`) and one
    λ, which the config holds as lists: `nsr_layer: fc` becomes `nsr_layers: [fc]`, and a single
    λ is applied to every NSR layer (config validation repeats a one-value list per layer)."""
    overrides = dict(params)
    if "nsr_layer" in overrides:
        overrides["nsr_layers"] = [overrides.pop("nsr_layer")]
    if "lambda" in overrides and not isinstance(overrides["lambda"], list):
        overrides["lambda"] = [overrides["lambda"]]
    return overrides


def apply_trial_parameters(cfg) -> None:
    """Under an NNI trial, the tuner's parameters override `cfg` (an nsr.config.Config)."""
    params = get_trial_parameters()
    if params:
        from .config import apply_overrides, validate

        apply_overrides(cfg, config_overrides(params), "NNI parameters")
        validate(cfg)


def _finite(name: str, value: float) -> float:
    from .errors import UserError  # plain Python, no torch

    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        # NNI stores metrics as JSON, where NaN is not a number: fail the trial instead.
        raise UserError(f"{name} is {value}; not reporting a non-finite metric to NNI")
    return value


def report_intermediate(val_acc: float) -> None:
    """Report one epoch's validation accuracy (percent); no-op outside NNI."""
    if not in_trial():
        return
    import nni

    nni.report_intermediate_result(_finite("validation accuracy", val_acc))


def report_final(best_val_acc: float, test_acc: float | None) -> None:
    """Report {"default": best_val_acc, "test_acc": test_acc}; no-op outside NNI.

    A missing or non-finite test accuracy is reported as null (it is only carried along);
    a non-finite validation accuracy fails the trial, since the tuner would learn from it.
    """
    if not in_trial():
        return
    import nni

    best = _finite("best validation accuracy", best_val_acc)
    try:
        test = float(test_acc) if test_acc is not None else None
    except (TypeError, ValueError):
        test = None
    if test is not None and not math.isfinite(test):
        test = None
    nni.report_final_result({"default": best, "test_acc": test})
