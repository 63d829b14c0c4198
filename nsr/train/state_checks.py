"""The checks a checkpoint passes before anything in it is used: every part of a training state
against the run that is about to load it (names, shapes, dtypes, ranges, and that the position,
meter, history and learning rates agree with each other and with this run).

Each check raises ValueError naming the first thing that does not fit; nsr/train/checkpoint.py
turns it into one UserError line.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

from .build import replay_schedule
from .config import Config
from .errors import UserError
from .meters import Position

PARTS = ("model", "optimizer", "scheduler", "scaler", "regularizer", "rng", "position", "meter")


@dataclasses.dataclass
class RunParts:
    """What a training checkpoint holds of a run and is checked against: the engine hands these
    over (nsr/train/engine.py Trainer.parts), and nothing else of the run is read."""
    cfg: Config
    config: dict                  # cfg as recorded (config.to_dict)
    world: int                    # processes (torchrun)
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    reg: nn.Module | None         # NeuronSteadiness, CenterLoss, or None (vanilla)
    steps_per_epoch: int          # of each process
    samples_per_epoch: int        # training samples of each process in an epoch


def check_training_state(run: RunParts, path: str, state: dict) -> tuple[Position, dict]:
    """Every part of a checkpoint against the run; ValueError for the first that does not fit.
    Returns the position and the scheduler state to load (the schedule rebuilt for this run)."""
    missing = [p for p in PARTS if p not in state]
    if missing:
        raise ValueError(f"it lacks the part{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}")
    check_tensors(state["model"], run.model.state_dict(), "model")
    check_position_fields(state["position"])
    pos = Position.from_state(state["position"])
    check_position(pos, run.steps_per_epoch)
    check_meter(state["meter"], pos.step, run.cfg.batch_size, run.samples_per_epoch)
    check_optimizer(state["optimizer"], run.optimizer, pos.global_step)
    check_scaler(state["scaler"], run.scaler.state_dict())
    if not isinstance(state["regularizer"], dict):
        raise ValueError("regularizer must be a mapping (the regularizer's state_dict)")
    if run.reg is not None:
        check_regularizer(run.reg, state["regularizer"], pos.global_step)
    check_rng(state["rng"])
    last_epoch = state["scheduler"].get("last_epoch") if isinstance(state["scheduler"], dict) else None
    if last_epoch != pos.epoch or not is_int(last_epoch):
        raise ValueError(f"scheduler last_epoch {last_epoch!r} is not the position's epoch {pos.epoch}")
    lrs = [row["lr"] for row in pos.history] + [g["lr"] for g in state["optimizer"]["param_groups"][:1]]
    return pos, _check_schedule(run.cfg, path, state["config"], lrs)


def check_regularizer(reg: nn.Module, saved: dict, steps: int) -> None:
    """The library's own load checks of the regularizer's state (shapes, dtypes, values, pointers),
    run on a copy so that nothing changes yet; after training steps the state must exist (the
    regularizer makes it at its first step)."""
    if steps > 0 and not saved:
        raise ValueError(f"regularizer holds no state after {steps} steps")
    probe = copy.deepcopy(reg)  # a copy of a regularizer has its state and no hooks on the model
    probe.load_state_dict(saved)
    if steps > 0 and not probe.started:
        raise ValueError(f"regularizer holds no state after {steps} steps (a layer's memory is missing)")


def check_tensors(saved, live: dict, what: str) -> None:
    """`saved` holds exactly the tensors of `live` (a state_dict): same names, shapes, dtypes, and
    finite floating-point values."""
    if not isinstance(saved, dict):
        raise ValueError(f"{what} must be a mapping of tensors")
    missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing or unexpected:
        raise ValueError(f"{what} " + (f"lacks {missing[0]}" if missing else f"has {unexpected[0]!r}, which "
                                       "this run's model does not"))
    for name, want in live.items():
        _check_tensor(saved[name], want.shape, want.dtype, what, name)


def _check_tensor(value, shape, dtype, part: str, name: str) -> None:
    """One tensor `name` of the checkpoint's `part` (model, optimizer, rng)."""
    if not torch.is_tensor(value):
        raise ValueError(f"{part}: {name} is {type(value).__name__}, not a tensor")
    if value.shape != shape:
        raise ValueError(f"{part}: size mismatch for {name}: {tuple(value.shape)} saved, {tuple(shape)} in this run")
    if value.dtype != dtype:
        raise ValueError(f"{part}: dtype mismatch for {name}: {value.dtype} saved, {dtype} in this run")
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise ValueError(f"{part}: {name} holds NaN or infinite values")


# Per-parameter state that is a mean of squares: a negative value would be a square root of one.
_NONNEGATIVE_STATE = {"exp_avg_sq", "max_exp_avg_sq"}


def check_optimizer(saved, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """The saved optimizer has this run's parameter groups and hyperparameters (the learning rate
    is checked against the schedule) and, per parameter, the state this optimizer keeps, shaped
    like the parameter; its counters (Adam's step) are whole numbers in 0..steps (the optimizer
    steps taken; fewer when the AMP scaler skipped some)."""
    live = optimizer.state_dict()
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) \
            or not isinstance(saved.get("param_groups"), list):
        raise ValueError("optimizer must hold state and param_groups")
    if len(saved["param_groups"]) != len(live["param_groups"]):
        raise ValueError(f"optimizer has {len(saved['param_groups'])} parameter groups, this run "
                         f"{len(live['param_groups'])}")
    for group, want in zip(saved["param_groups"], live["param_groups"]):
        if not isinstance(group, dict) or set(group) != set(want):
            raise ValueError("optimizer parameter group keys differ from this run's")
        for key, value in want.items():
            if key == "lr":
                if not _is_number(group[key]) or not math.isfinite(group[key]) or group[key] < 0:
                    raise ValueError(f"optimizer lr {group[key]!r} is not a learning rate")
            elif not _same(group[key], value):
                raise ValueError(f"optimizer {key} is {group[key]!r}, this run's is {value!r}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    expected = _per_parameter_state(optimizer)
    for index, entry in saved["state"].items():
        if not is_int(index) or not 0 <= index < len(params):
            raise ValueError(f"optimizer state for parameter {index!r}, of {len(params)}")
        if not isinstance(entry, dict) or set(entry) != set(expected):
            raise ValueError(f"optimizer state of parameter {index} holds {sorted(entry) if isinstance(entry, dict) else entry!r}, "
                             f"this optimizer keeps {sorted(expected)}")
        for key, (per_parameter, dtype) in expected.items():
            shape = params[index].shape if per_parameter else torch.Size([])
            _check_tensor(entry[key], shape, params[index].dtype if per_parameter else dtype,
                          "optimizer", f"{key} of parameter {index}")
            value = entry[key]
            if not per_parameter and not (0 <= float(value) <= steps and float(value).is_integer()):
                raise ValueError(f"optimizer {key} of parameter {index} is {float(value)!r}, not a count of "
                                 f"0..{steps} steps")
            if key in _NONNEGATIVE_STATE and bool((value < 0).any()):
                raise ValueError(f"optimizer {key} of parameter {index} holds negative values")


def _per_parameter_state(optimizer: torch.optim.Optimizer) -> dict[str, tuple[bool, torch.dtype]]:
    """{key: (shaped like the parameter?, dtype)} of the state this optimizer keeps per parameter:
    read off the same optimizer class, with the same hyperparameters, after one step on a
    two-element parameter (cheap, and right for any optimizer torch has)."""
    probe = nn.Parameter(torch.zeros(2))
    hyper = {k: v for k, v in optimizer.param_groups[0].items() if k not in ("params", "initial_lr")}
    twin = type(optimizer)([probe], **hyper)
    probe.grad = torch.ones(2)
    twin.step()
    state = twin.state.get(probe, {})
    return {k: (v.dim() == 1, v.dtype) for k, v in state.items() if torch.is_tensor(v)}


def check_scaler(saved, live: dict) -> None:
    if not isinstance(saved, dict):
        raise ValueError("scaler must be a mapping")
    if not live:
        return  # the AMP scaler is off in this run (and, the amp setting being the same, was then)
    if set(saved) != set(live):
        raise ValueError(f"scaler holds {sorted(saved)}, this run's {sorted(live)}")
    scale, tracker = saved["scale"], saved["_growth_tracker"]
    if not _is_number(scale) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scaler scale {scale!r} is not a positive number")
    for key in ("growth_factor", "backoff_factor", "growth_interval"):
        if not _same(saved[key], live[key]):
            raise ValueError(f"scaler {key} is {saved[key]!r}, this run's is {live[key]!r}")
    if not is_int(tracker) or not 0 <= tracker < live["growth_interval"]:
        raise ValueError(f"scaler _growth_tracker {tracker!r} lies outside 0..{live['growth_interval'] - 1}")


def check_rng(saved) -> None:
    if not isinstance(saved, dict):
        raise ValueError("rng must be a mapping")
    _check_tensor(saved.get("torch"), torch.get_rng_state().shape, torch.uint8, "rng", "torch state")
    n = saved.get("numpy")
    if not isinstance(n, dict):
        raise ValueError("rng numpy must be a mapping")
    _check_tensor(n.get("keys"), torch.Size([624]), torch.int64, "rng", "numpy keys")
    if not bool(((n["keys"] >= 0) & (n["keys"] < 2**32)).all()):
        raise ValueError("rng numpy keys lie outside 0..2**32-1")
    if not is_int(n.get("pos")) or not 0 <= n["pos"] <= 624 or n.get("has_gauss") not in (0, 1) \
            or not _is_number(n.get("cached_gaussian")) or not math.isfinite(n["cached_gaussian"]):
        raise ValueError("rng numpy pos, has_gauss or cached_gaussian out of range")
    p = saved.get("python")
    if not isinstance(p, (list, tuple)) or len(p) != 2 or not isinstance(p[0], (list, tuple)) or len(p[0]) != 625:
        raise ValueError("rng python must be [625 ints, gauss]")
    internal, gauss = p
    if not all(is_int(v) and 0 <= v < 2**32 for v in internal) or not internal[-1] <= 624:
        raise ValueError("rng python state out of range")
    if gauss is not None and not (_is_number(gauss) and math.isfinite(gauss)):
        raise ValueError(f"rng python gauss {gauss!r} is not a number")
    if "cuda" in saved and torch.cuda.is_available():
        cuda = saved["cuda"]
        if not isinstance(cuda, (list, tuple)):
            raise ValueError("rng cuda must hold one state per GPU")
        for i, s in enumerate(cuda):
            _check_tensor(s, torch.cuda.get_rng_state(0).shape, torch.uint8, "rng", f"cuda state {i}")


def check_position_fields(state) -> None:
    """The types of a checkpoint's position: whole numbers, numbers (test accuracies may be None),
    a list of rows."""
    if not isinstance(state, dict):
        raise ValueError("position must be a mapping")
    defaults = Position()
    for name in ("epoch", "step", "global_step", "best_epoch"):
        value = state.get(name, getattr(defaults, name))
        if not is_int(value) or value < -1:
            raise ValueError(f"position {name} must be an int, got {value!r}")
    for name in ("best_val_acc", "train_time_s", "eval_time_s", "epoch_time_s", "test_acc", "test_top5_acc"):
        value = state.get(name, getattr(defaults, name))
        if not (value is None and name.startswith("test")) and (not _is_number(value) or math.isnan(value)):
            raise ValueError(f"position {name} must be a number, got {value!r}")
    history = state.get("history", [])
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise ValueError("position history must be a list of rows")


def check_position(pos: Position, steps_per_epoch: int) -> None:
    """Ranges, and what the fields say about each other: every epoch has steps_per_epoch steps
    (per process), the history has a row per finished epoch, the best epoch is the first best."""
    if pos.epoch < 0 or not 0 <= pos.step <= steps_per_epoch:
        raise ValueError(f"position epoch {pos.epoch}, step {pos.step} lies outside this run's epochs of "
                         f"{steps_per_epoch} steps")
    if pos.global_step != pos.epoch * steps_per_epoch + pos.step:
        raise ValueError(f"position global_step {pos.global_step} is not {pos.epoch} epochs of {steps_per_epoch} "
                         f"steps plus {pos.step} (another data set, batch size or process count?)")
    if len(pos.history) != pos.epoch:
        raise ValueError(f"position history has {len(pos.history)} rows for {pos.epoch} finished epochs")
    for i, row in enumerate(pos.history):
        if row.get("epoch") != i + 1:
            raise ValueError(f"history row {i + 1} is labelled epoch {row.get('epoch')!r}")
        for key, value in row.items():
            if key != "epoch" and not (_is_number(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"history epoch {i + 1}: {key} {value!r} is not a finite number >= 0")
        for key in ("val_acc", "lr"):
            if key not in row:
                raise ValueError(f"history epoch {i + 1} lacks {key}")
        for key in ("train_acc", "val_acc", "val_top5_acc"):
            if key in row and row[key] > 100:
                raise ValueError(f"history epoch {i + 1}: {key} {row[key]} is above 100 %")
    for name in ("train_time_s", "eval_time_s", "epoch_time_s"):
        if not math.isfinite(getattr(pos, name)) or getattr(pos, name) < 0:
            raise ValueError(f"position {name} {getattr(pos, name)!r} is not a duration")
    vals = [row["val_acc"] for row in pos.history]
    if pos.best_epoch == -1:
        if vals or pos.test_acc is not None or pos.best_val_acc != -1:
            raise ValueError("position has finished epochs but no best one, or a best without an epoch")
        return
    # the first such epoch, or with best_on_tie latest the last: either is an epoch of the best
    if not vals or not 1 <= pos.best_epoch <= len(vals) or pos.best_val_acc != max(vals) \
            or vals[pos.best_epoch - 1] != max(vals):
        raise ValueError(f"position best_epoch {pos.best_epoch} (val {pos.best_val_acc}) is not an "
                         "epoch of best validation accuracy in its history")
    for name, value in (("test_acc", pos.test_acc), ("test_top5_acc", pos.test_top5_acc)):
        if (value is not None or name == "test_acc") and not (value is not None and 0 <= value <= 100):
            raise ValueError(f"position {name} {value!r} is not a percentage")


def check_meter(saved, step: int, batch_size: int, samples: int) -> None:
    """The running sums of the open epoch: as many samples as `step` batches hold, sums in range."""
    if not isinstance(saved, dict) or not {"losses", "correct", "seen"} <= set(saved):
        raise ValueError("meter must hold losses, correct and seen")
    seen, correct, losses = saved["seen"], saved["correct"], saved["losses"]
    if not is_int(seen) or seen != min(step * batch_size, samples):
        raise ValueError(f"meter seen {seen!r} is not the {min(step * batch_size, samples)} samples of "
                         f"{step} steps")
    if not torch.is_tensor(correct) or correct.shape != () or correct.is_floating_point() \
            or not 0 <= int(correct) <= seen:
        raise ValueError(f"meter correct must be a count in 0..{seen}")
    if not torch.is_tensor(losses) or losses.shape != (3,) or not losses.is_floating_point() \
            or not bool(torch.isfinite(losses).all()) or bool((losses < 0).any()):
        raise ValueError("meter losses must be 3 finite sums >= 0")


def _check_schedule(cfg, path: str, saved_config: dict, lrs: list) -> dict:
    """The learning rate of every epoch so far (history, then the current one) must be what this
    run's schedule gives: then the scheduler is rebuilt for this run's length, in the state
    after those epochs, and the run continues as a straight run of that length would. A saved run
    whose rates follow only its own --epochs (cosine) cannot become a longer or shorter run: refused."""
    epochs_done = len(lrs) - 1
    ours, state = replay_schedule(cfg, epochs_done)
    if _same_rates(ours, lrs):
        return state
    saved_epochs = saved_config.get("epochs")
    if is_int(saved_epochs) and saved_epochs != cfg.epochs and saved_epochs >= 1:
        theirs, _ = replay_schedule(dataclasses.replace(cfg, epochs=saved_epochs), epochs_done)
        if _same_rates(theirs, lrs):
            k = next(i for i, (a, b) in enumerate(zip(lrs, ours)) if not _same_rates([a], [b]))
            raise UserError(f"cannot resume {path} with --epochs {cfg.epochs}: its {cfg.scheduler} schedule "
                            f"follows the run's length, and the saved run (--epochs {saved_epochs}) trained "
                            f"epoch {k + 1} at lr {lrs[k]:.6g} where a {cfg.epochs}-epoch run uses {ours[k]:.6g}; "
                            f"resume with --epochs {saved_epochs}, or train {cfg.epochs} epochs from the "
                            "start in a new --out")
    k = next((i for i, (a, b) in enumerate(zip(lrs, ours)) if not _same_rates([a], [b])), 0)
    raise ValueError(f"its learning rate in epoch {k + 1} is {lrs[k]!r}, this run's schedule gives {ours[k]!r}")


def _same_rates(a: list, b: list) -> bool:
    """Equal learning rates, up to the last bits a torch version may round differently (on one
    version they are equal bit for bit: the replay runs the scheduler's own code)."""
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-15) for x, y in zip(a, b))


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same(a, b) -> bool:
    """Equal, a tuple and a list of the same items included (pickling keeps either)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b
