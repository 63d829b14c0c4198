"""The link between a training run and NNI: hyper-parameters in, validation accuracy out.

The scripts pass `nni_hooks()` to the engine. Inside a trial (started by `nnictl create` or
`python -m nsr search`) it is a RunHooks that applies the tuner's parameters to the config,
reports each epoch's validation accuracy and the final result. Outside a trial it is None and
`nni` is never imported (importing it costs about a second, and its trial API prints a
"without runtime" warning). The engine itself knows nothing of NNI.

The final metric is {"default": best_val_acc, "test_acc": test_acc}: the tuner maximises
"default", the best validation accuracy; the test accuracy is carried along for the record
and never optimised.
"""

from __future__ import annotations

import math
import os
from typing import Any

from nsr.train.config import Config, apply_overrides, validate
from nsr.train.engine import RunHooks
from nsr.train.errors import UserError

__all__ = ["in_trial", "nni_hooks", "NNITrial", "get_trial_parameters", "config_overrides", "report_intermediate",
           "report_final"]


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
    """The tuner's parameters as config keys. A search space names one layer (`regularized_layer`)
    and one λ, which the config holds as lists: `regularized_layer: fc` becomes
    `regularized_layers: [fc]`, and a single λ is applied to every regularized layer (config
    validation repeats a one-value list per layer)."""
    overrides = dict(params)
    if "nsr_layer" in overrides:
        raise UserError("the search-space parameter 'nsr_layer' is now called 'regularized_layer'; "
                        "rename it in searchSpace")
    if "regularized_layer" in overrides:
        overrides["regularized_layers"] = [overrides.pop("regularized_layer")]
    if "lambda" in overrides and not isinstance(overrides["lambda"], list):
        overrides["lambda"] = [overrides["lambda"]]
    return overrides


def _finite(name: str, value: float) -> float:
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


class NNITrial(RunHooks):
    """The engine's hooks inside an NNI trial."""

    def configure(self, cfg: Config) -> None:
        params = get_trial_parameters()
        if params:  # the tuner's parameters override the config, and are checked like it
            apply_overrides(cfg, config_overrides(params), "NNI parameters")
            validate(cfg)

    def epoch_end(self, row: dict) -> None:
        report_intermediate(row["val_acc"])

    def run_end(self, metrics: dict) -> None:
        report_final(metrics["best_val_acc"], metrics["test_acc"])


def nni_hooks() -> NNITrial | None:
    """The hooks to pass to the engine: NNITrial inside an NNI trial, None (nothing) outside."""
    return NNITrial() if in_trial() else None
