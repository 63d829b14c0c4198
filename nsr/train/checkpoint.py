"""Checkpoints: what they hold, written atomically, read with torch.load(weights_only=True) only,
and checked against the run before anything in them is used.

A training checkpoint (last.pt, best.pt) holds everything a bit-exact resume needs: model,
optimizer, scheduler, AMP scaler, NSR memory, every RNG state, the config, the number of
processes, the position in the run and the running sums of the current epoch.

Reading is one place each: load_checkpoint turns every way a file can fail to load into one line;
restore_training_state has every part checked (nsr/train/state_checks.py) before it loads any of it.
"""

from __future__ import annotations

import os
import pickle
import random
import warnings

import numpy as np
import torch

from .errors import UserError
from .fileio import atomic_open
from .meters import EpochMeter, Position
from .state_checks import RunParts, check_training_state, is_int

FORMAT = "nsr-checkpoint"
# The layout of what a checkpoint holds; a change to it (keys, the NSR memory's buffers) bumps it,
# and a loader refuses any other version in one line rather than guess.
VERSION = 2
# Settings that say how a run executes, not what it trains: they may differ between a run and its
# resumption, and between a saved run and the command python -m nsr reproduce would train it with.
EXECUTION_KEYS = frozenset({"out", "data_dir", "device", "workers", "threads", "channels_last",
                            "eval_batch_size", "quiet", "resume", "overwrite",
                            "tensorboard"})
# ... and the run's length: a resumption may lengthen it (never shorten it, _check_not_shrunk), and
# --epochs only where the schedule does not follow it (cosine does: _check_schedule).
LENGTH_KEYS = frozenset({"epochs", "max_steps"})


def save_checkpoint(state: dict, path: str) -> None:
    """Write atomically (see fileio): a crash never leaves a half-written checkpoint under `path`,
    and a full disk is one WriteError line with the previous file intact."""
    with atomic_open(path) as f:
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)


def load_checkpoint(path: str, map_location="cpu", mmap: bool = False) -> dict:
    """Load one of our checkpoints; anything else (truncated, foreign, unsafe) is a UserError.
    `mmap`: map the tensors instead of reading them (to read the config of a large checkpoint)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on odd pickles: the verdict is below, in one line
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
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
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint written by this project (no {FORMAT!r} marker)")
    version = state.get("version")
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
    changed = [k for k in config if k not in EXECUTION_KEYS | LENGTH_KEYS and k in saved and saved[k] != config[k]]
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {config[k]!r}" for k in changed[:4])
        raise UserError(f"cannot resume {path}: settings differ from the saved run ({diffs}); "
                        "resume with the same settings or start a new --out")
    saved_world = state.get("world_size")
    if not is_int(saved_world) or saved_world < 1:
        raise UserError(f"checkpoint {path} does not fit this run (world_size {saved_world!r} is not a "
                        "process count)")
    if saved_world != world:
        # Each process takes its share of every epoch and its own batch of batch_size: another
        # count would skip or repeat samples and change the effective batch.
        how = "python SCRIPT" if saved_world == 1 else f"torchrun --nproc_per_node={saved_world} SCRIPT"
        raise UserError(f"cannot resume {path}: it was trained by {_processes(saved_world)} and this run has "
                        f"{_processes(world)}; resume it with the same count ({how} ... --resume), or start "
                        "a new --out")
    _check_not_shrunk(path, state.get("position"), config)
    return state


def _check_not_shrunk(path: str, position, config: dict) -> None:
    """A resumption may lengthen a run, never shorten it: the checkpoint's weights would be those
    of more epochs (or steps) than config.yaml and metrics.json would then say."""
    if not isinstance(position, dict):
        return  # a damaged position is refused, with the reason, by check_training_state
    epoch, step, steps = position.get("epoch"), position.get("step"), position.get("global_step")
    epochs, max_steps = config.get("epochs"), config.get("max_steps")
    if is_int(epoch) and is_int(step) and is_int(epochs) and (epoch, step) > (epochs, 0):
        trained = f"{epoch} epochs" + (f" and {step} steps of epoch {epoch + 1}" if step else "")
        raise UserError(f"cannot resume {path} with --epochs {epochs}: it has trained {trained}; resume with "
                        f"--epochs {epoch + (1 if step else 0)} or more, or train {epochs} epoch{'s' * (epochs != 1)} "
                        "from the start in a new --out")
    if is_int(steps) and is_int(max_steps) and steps > max_steps:
        raise UserError(f"cannot resume {path} with --max-steps {max_steps}: it has taken {steps} steps; resume "
                        f"with --max-steps {steps} or more (or none), or start a new --out")


def _processes(n: int) -> str:
    return "1 process" if n == 1 else f"{n} processes (torchrun)"


def training_state(run: RunParts, pos: Position, meter: EpochMeter) -> dict:
    """The checkpoint of a run at `pos`, with the open epoch's running sums."""
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
            "regularizer": run.reg.state_dict() if run.reg is not None else {}, "rng": rng_state(),
            "config": run.config, "world_size": run.world,
            "position": pos.state_dict(), "meter": meter.state_dict()}


def restore_training_state(run: RunParts, meter: EpochMeter, path: str, state: dict) -> Position:
    """Check `state` (from load_resumable) against the run, then load it into the run's parts and
    `meter`; returns the position to continue from. Anything that does not fit, a damaged or
    crafted file included, is one UserError, and nothing of it is used; a changed --epochs that the
    schedule cannot follow is refused with the reason."""
    try:
        pos, scheduler_state = check_training_state(run, path, state)
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(scheduler_state)
        if pos.global_step > 0:
            # The run's optimizer has stepped, in the process that saved it: a step with no
            # gradients (which changes nothing) tells the scheduler so, or its next step (at once,
            # when the run stopped at an epoch's last step) warns "scheduler.step() before
            # optimizer.step()", a warning about an order this run kept.
            run.optimizer.zero_grad(set_to_none=True)
            run.optimizer.step()
        run.scaler.load_state_dict(state["scaler"])
        if run.reg is not None:
            run.reg.load_state_dict(state["regularizer"])  # the library checks its own memory
        set_rng_state(state["rng"])
        meter.load_state_dict(state["meter"])
        return pos
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
        detail = " ".join(str(e).split())[:200]  # load_state_dict's messages span several lines
        raise UserError(f"checkpoint {path} does not fit this run ({type(e).__name__}: {detail})") from None
