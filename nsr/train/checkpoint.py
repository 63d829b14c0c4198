"""Checkpoints: what they hold, written atomically, read with torch.load(weights_only=True) only.

A training checkpoint (last.pt, best.pt) holds everything a bit-exact resume needs: model,
optimizer, scheduler, AMP scaler, NSR memory, every RNG state, the config, the position in the
run and the running sums of the current epoch."""

from __future__ import annotations

import os
import pickle
import random
import zipfile

import numpy as np
import torch

from .errors import UserError
from .fileio import atomic_path
from .meters import Position

FORMAT = "nsr-checkpoint"
# The layout of what a checkpoint holds; a change to it (keys, the NSR memory's buffers) bumps it,
# and a loader refuses any other version in one line rather than guess.
VERSION = 2
# Settings that may differ between a run and its resumption; any other change is refused.
RESUMABLE_CHANGES = {"epochs", "max_steps", "out", "device", "workers", "quiet", "resume",
                     "overwrite", "data_dir", "eval_batch_size"}


def save_checkpoint(state: dict, path: str) -> None:
    """Write atomically (see fileio): a crash never leaves a half-written checkpoint under `path`."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load one of our checkpoints; anything else (truncated, foreign, unsafe) is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"refusing to load {path}: it holds objects other than tensors and plain "
                        f"data ({first[:160]}); only load checkpoints you trust") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(f"checkpoint {path} is truncated or not a PyTorch checkpoint "
                        f"({type(e).__name__}); delete it or restore it from a backup") from None
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, "nsr-checkpoint-v1"):
        raise UserError(f"{path} is not a checkpoint written by this project (no {FORMAT!r} marker)")
    version = state.get("version", 1)
    if version != VERSION:
        raise UserError(f"checkpoint {path} has format version {version!r}, and this code reads version "
                        f"{VERSION} only; use the version of the project that wrote it, or start a new --out")
    return state


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
        torch.cuda.set_rng_state_all(state["cuda"])


def load_resumable(path: str, config: dict, map_location="cpu") -> dict:
    """Read a checkpoint and check that it continues the run configured by `config`."""
    state = load_checkpoint(path, map_location=map_location)
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint {path} holds no config; it cannot be resumed")
    changed = [k for k in config if k not in RESUMABLE_CHANGES and k in saved and saved[k] != config[k]]
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {config[k]!r}" for k in changed[:4])
        raise UserError(f"cannot resume {path}: settings differ from the saved run ({diffs}); "
                        "resume with the same settings or start a new --out")
    return state


def training_state(trainer) -> dict:
    """The checkpoint of an nsr.train.engine.Trainer."""
    return {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
            "nsr": trainer.reg.state_dict() if trainer.reg is not None else {}, "rng": rng_state(),
            "config": trainer.config_dict, "position": trainer.pos.state_dict(),
            "meter": trainer.meter.state_dict()}


def restore_training_state(trainer, path: str, state: dict) -> None:
    """Load `state` (from load_resumable) into an nsr.train.engine.Trainer; anything that does not fit,
    a crafted file included, is one UserError."""
    try:
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.scaler.load_state_dict(state["scaler"])
        if trainer.reg is not None:
            trainer.reg.load_state_dict(state["nsr"])
        set_rng_state(state["rng"])
        trainer.pos = Position.from_state(state["position"])
        trainer.meter.load_state_dict(state["meter"])
        if not 0 <= trainer.pos.step <= len(trainer.data.train) or trainer.pos.epoch < 0:
            raise ValueError(f"position epoch {trainer.pos.epoch}, step {trainer.pos.step} lies outside "
                             f"this run's epochs of {len(trainer.data.train)} steps")
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
        detail = " ".join(str(e).split())[:200]  # load_state_dict's messages span several lines
        raise UserError(f"checkpoint {path} does not fit this run ({type(e).__name__}: {detail})") from None
