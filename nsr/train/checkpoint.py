"""Checkpoints: what they hold, written atomically, read with torch.load(weights_only=True) only,
and checked against the run before anything in them is used.

A training checkpoint (last.pt, best.pt) holds everything a bit-exact resume needs: model,
optimizer, scheduler, AMP scaler, NSR memory, every RNG state, the config, the number of
processes, the position in the run and the running sums of the current epoch.

Reading is one place each: load_checkpoint turns every way a file can fail to load into one line;
restore_training_state checks every part (shapes, dtypes, ranges, and that the position, meter,
history and learning rates agree with each other and with this run) before it loads any of it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import random
import warnings

import numpy as np
import torch
from torch import nn

from .build import replay_schedule
from .errors import UserError
from .fileio import atomic_open
from .meters import Position

FORMAT = "nsr-checkpoint"
# The layout of what a checkpoint holds; a change to it (keys, the NSR memory's buffers) bumps it,
# and a loader refuses any other version in one line rather than guess. (world_size, added later,
# is optional: a checkpoint without it is checked by its position, which counts steps per process.)
VERSION = 2
# Settings that may differ between a run and its resumption; any other change is refused. A
# changed --epochs is refused too when the schedule depends on it (cosine), see _check_schedule.
RESUMABLE_CHANGES = {"epochs", "max_steps", "out", "device", "workers", "quiet", "resume",
                     "overwrite", "data_dir", "eval_batch_size"}
PARTS = ("model", "optimizer", "scheduler", "scaler", "nsr", "rng", "position", "meter")


def save_checkpoint(state: dict, path: str) -> None:
    """Write atomically (see fileio): a crash never leaves a half-written checkpoint under `path`,
    and a full disk is one WriteError line with the previous file intact."""
    with atomic_open(path) as f:
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load one of our checkpoints; anything else (truncated, foreign, unsafe) is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on odd pickles: the verdict is below, in one line
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # not a forbidden object: bytes that are no pickle of ours
            raise _not_a_checkpoint(path, e) from None
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "")
        raise UserError(f"refusing to load {path}: it holds objects other than tensors and plain "
                        f"data ({detail[:160]}); only load checkpoints you trust") from None
    except OSError as e:
        if not os.access(path, os.R_OK) or isinstance(e, (PermissionError, IsADirectoryError)):
            raise UserError(f"cannot read checkpoint {path} ({e.strerror or e})") from None
        raise _not_a_checkpoint(path, e) from None
    except Exception as e:  # noqa: BLE001 -- whatever a damaged or foreign file makes torch.load raise
        raise _not_a_checkpoint(path, e) from None
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, "nsr-checkpoint-v1"):
        raise UserError(f"{path} is not a checkpoint written by this project (no {FORMAT!r} marker)")
    version = state.get("version", 1)
    if version != VERSION:
        raise UserError(f"checkpoint {path} has format version {version!r}, and this code reads version "
                        f"{VERSION} only; use the version of the project that wrote it, or start a new --out")
    return state


def _not_a_checkpoint(path: str, e: BaseException) -> UserError:
    return UserError(f"checkpoint {path} is truncated or not a PyTorch checkpoint "
                     f"({type(e).__name__}); delete it or restore it from a backup")


def rng_state() -> dict:
    """All global RNG states, as plain data that weights_only loading accepts."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    internal, gauss = state["python"]
    random.setstate((3, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        # a run resumed on a machine with fewer GPUs (--device may change) needs only theirs
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def load_resumable(path: str, config: dict, world: int = 1, map_location="cpu") -> dict:
    """Read a checkpoint and check that it continues the run configured by `config` on `world`
    processes."""
    state = load_checkpoint(path, map_location=map_location)
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint {path} holds no config; it cannot be resumed")
    changed = [k for k in config if k not in RESUMABLE_CHANGES and k in saved and saved[k] != config[k]]
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {config[k]!r}" for k in changed[:4])
        raise UserError(f"cannot resume {path}: settings differ from the saved run ({diffs}); "
                        "resume with the same settings or start a new --out")
    saved_world = state.get("world_size", world)
    if not _is_int(saved_world) or saved_world < 1:
        raise UserError(f"checkpoint {path} does not fit this run (world_size {saved_world!r} is not a "
                        "process count)")
    if saved_world != world:
        # Each process takes its share of every epoch and its own batch of batch_size: another
        # count would skip or repeat samples and change the effective batch.
        how = "python SCRIPT" if saved_world == 1 else f"torchrun --nproc_per_node={saved_world} SCRIPT"
        raise UserError(f"cannot resume {path}: it was trained by {_processes(saved_world)} and this run has "
                        f"{_processes(world)}; resume it with the same count ({how} ... --resume), or start "
                        "a new --out")
    return state


def _processes(n: int) -> str:
    return "1 process" if n == 1 else f"{n} processes (torchrun)"


def training_state(trainer) -> dict:
    """The checkpoint of an nsr.train.engine.Trainer."""
    return {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
            "nsr": trainer.reg.state_dict() if trainer.reg is not None else {}, "rng": rng_state(),
            "config": trainer.config_dict, "world_size": trainer.rt.world,
            "position": trainer.pos.state_dict(), "meter": trainer.meter.state_dict()}


def restore_training_state(trainer, path: str, state: dict) -> None:
    """Check `state` (from load_resumable) against an nsr.train.engine.Trainer, then load it.
    Anything that does not fit, a damaged or crafted file included, is one UserError, and nothing
    of it is used; a changed --epochs that the schedule cannot follow is refused with the reason."""
    try:
        pos, scheduler_state = check_training_state(trainer, path, state)
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(scheduler_state)
        trainer.scaler.load_state_dict(state["scaler"])
        if trainer.reg is not None:
            trainer.reg.load_state_dict(state["nsr"])  # the library checks its own memory
        set_rng_state(state["rng"])
        trainer.pos = pos
        trainer.meter.load_state_dict(state["meter"])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
        detail = " ".join(str(e).split())[:200]  # load_state_dict's messages span several lines
        raise UserError(f"checkpoint {path} does not fit this run ({type(e).__name__}: {detail})") from None


# ---------------------------------------------------------------------------------- checks

def check_training_state(trainer, path: str, state: dict) -> tuple[Position, dict]:
    """Every part of a checkpoint against the run; ValueError for the first that does not fit.
    Returns the position and the scheduler state to load (the schedule rebuilt for this run)."""
    missing = [p for p in PARTS if p not in state]
    if missing:
        raise ValueError(f"it lacks {', '.join(missing)}")
    check_tensors(state["model"], trainer.model.state_dict(), "model")
    pos = Position.from_state(state["position"])
    check_position(pos, len(trainer.data.train))
    check_meter(state["meter"], pos.step, trainer.cfg.batch_size, trainer.data.train.num_samples)
    check_optimizer(state["optimizer"], trainer.optimizer, pos.global_step)
    check_scaler(state["scaler"], trainer.scaler.state_dict())
    if not isinstance(state["nsr"], dict):
        raise ValueError("nsr must be a mapping of the regularizer's state")
    if trainer.reg is not None and pos.global_step > 0 and not state["nsr"]:
        # the regularizer's memory is made at the first step; its content the library checks on load
        raise ValueError(f"nsr holds no regularizer state after {pos.global_step} steps")
    check_rng(state["rng"])
    last_epoch = state["scheduler"].get("last_epoch") if isinstance(state["scheduler"], dict) else None
    if last_epoch != pos.epoch or not _is_int(last_epoch):
        raise ValueError(f"scheduler last_epoch {last_epoch!r} is not the position's epoch {pos.epoch}")
    lrs = [row["lr"] for row in pos.history] + [g["lr"] for g in state["optimizer"]["param_groups"][:1]]
    return pos, _check_schedule(trainer.cfg, path, state["config"], lrs)


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
        if not _is_int(index) or not 0 <= index < len(params):
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
    if not _is_int(tracker) or not 0 <= tracker < live["growth_interval"]:
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
    if not _is_int(n.get("pos")) or not 0 <= n["pos"] <= 624 or n.get("has_gauss") not in (0, 1) \
            or not _is_number(n.get("cached_gaussian")) or not math.isfinite(n["cached_gaussian"]):
        raise ValueError("rng numpy pos, has_gauss or cached_gaussian out of range")
    p = saved.get("python")
    if not isinstance(p, (list, tuple)) or len(p) != 2 or not isinstance(p[0], (list, tuple)) or len(p[0]) != 625:
        raise ValueError("rng python must be [625 ints, gauss]")
    internal, gauss = p
    if not all(_is_int(v) and 0 <= v < 2**32 for v in internal) or not internal[-1] <= 624:
        raise ValueError("rng python state out of range")
    if gauss is not None and not (_is_number(gauss) and math.isfinite(gauss)):
        raise ValueError(f"rng python gauss {gauss!r} is not a number")
    if "cuda" in saved and torch.cuda.is_available():
        cuda = saved["cuda"]
        if not isinstance(cuda, (list, tuple)):
            raise ValueError("rng cuda must hold one state per GPU")
        for i, s in enumerate(cuda):
            _check_tensor(s, torch.cuda.get_rng_state(0).shape, torch.uint8, "rng", f"cuda state {i}")


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
    if not vals or pos.best_epoch != vals.index(max(vals)) + 1 or pos.best_val_acc != max(vals):
        raise ValueError(f"position best_epoch {pos.best_epoch} (val {pos.best_val_acc}) is not the first "
                         "epoch of best validation accuracy in its history")
    for name, value in (("test_acc", pos.test_acc), ("test_top5_acc", pos.test_top5_acc)):
        if (value is not None or name == "test_acc") and not (value is not None and 0 <= value <= 100):
            raise ValueError(f"position {name} {value!r} is not a percentage")


def check_meter(saved, step: int, batch_size: int, samples: int) -> None:
    """The running sums of the open epoch: as many samples as `step` batches hold, sums in range."""
    if not isinstance(saved, dict) or not {"losses", "correct", "seen"} <= set(saved):
        raise ValueError("meter must hold losses, correct and seen")
    seen, correct, losses = saved["seen"], saved["correct"], saved["losses"]
    if not _is_int(seen) or seen != min(step * batch_size, samples):
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
    if _is_int(saved_epochs) and saved_epochs != cfg.epochs and saved_epochs >= 1:
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


def _is_int(value) -> bool:
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
