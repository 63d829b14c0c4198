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

FORMAT = "nsr-checkpoint-v1"
# Settings that may differ between a run and its resumption; any other change is refused.
RESUMABLE_CHANGES = {"epochs", "max_steps", "out", "device", "workers", "quiet", "resume",
                     "overwrite", "data_dir", "eval_batch_size"}


def save_checkpoint(state: dict, path: str) -> None:
    """Write atomically (see fileio): a crash never leaves a half-written checkpoint under `path`."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


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
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint written by this project (no {FORMAT!r} marker)")
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
    # A checkpoint from before the baseline keys trained without them: resuming with one is a change.
    saved = {"label_smoothing": 0.0, "dropout": 0.0, "center_alpha": 0.5,
             "regularizer": "nsr" if saved.get("nsr", True) else "none", **saved}
    changed = [k for k in config if k not in RESUMABLE_CHANGES and k in saved and saved[k] != config[k]]
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {config[k]!r}" for k in changed[:4])
        raise UserError(f"cannot resume {path}: settings differ from the saved run ({diffs}); "
                        "resume with the same settings or start a new --out")
    return state


def training_state(trainer) -> dict:
    """The checkpoint of an nsr.engine.Trainer."""
    return {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
            "nsr": trainer.reg.state_dict() if trainer.reg is not None else {}, "rng": rng_state(),
            "config": trainer.config_dict, "position": trainer.pos.state_dict(),
            "meter": trainer.meter.state_dict()}


def restore_training_state(trainer, path: str, state: dict) -> None:
    """Load `state` (from load_resumable) into an nsr.engine.Trainer; anything that does not fit,
    a crafted file included, is one UserError."""
    from .meters import Position

    try:
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.scaler.load_state_dict(state["scaler"])
        if trainer.reg is not None:
            trainer.reg.load_state_dict(_old_nsr_memory(state["nsr"], getattr(trainer.reg, "active_only", False)))
        set_rng_state(state["rng"])
        trainer.pos = Position.from_state(state["position"])
        trainer.meter.load_state_dict(state["meter"] if "meter" in state else _old_meter(state["position"]))
        if not 0 <= trainer.pos.step <= len(trainer.data.train) or trainer.pos.epoch < 0:
            raise ValueError(f"position epoch {trainer.pos.epoch}, step {trainer.pos.step} lies outside "
                             f"this run's epochs of {len(trainer.data.train)} steps")
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
        detail = " ".join(str(e).split())[:200]  # load_state_dict's messages span several lines
        raise UserError(f"checkpoint {path} does not fit this run ({type(e).__name__}: {detail})") from None


def _old_meter(position: dict) -> dict:
    """Checkpoints written before the meter had its own entry kept its sums in the position."""
    sums = position.get("sums") or {}
    return {"losses": sums.get("losses", torch.zeros(3, dtype=torch.float64)),
            "correct": sums.get("correct", torch.zeros((), dtype=torch.int64)), "seen": position.get("seen", 0)}


def _old_nsr_memory(state: dict, active_only: bool) -> dict:
    """Checkpoints written before NSR's layers shared one memory kept one per layer, memories.N.*,
    each row [sums | counts]: put the layers' columns side by side as ClassMeanMemory does, sums
    first, then the counts (one column for all layers, or every layer's under active_only)."""
    layers = sorted(int(k.split(".")[1]) for k in state if k.startswith("memories.") and k.endswith(".ring"))
    if not layers:
        return state

    rings = [state[f"memories.{i}.ring"] for i in layers]
    widths = [r.shape[-1] // 2 if active_only else r.shape[-1] - 1 for r in rings]

    def fused(buffer: str) -> torch.Tensor:
        parts = [state[f"memories.{i}.{buffer}"] for i in layers]
        sums = [t[..., :d] for t, d in zip(parts, widths)]
        counts = [t[..., d:] for t, d in zip(parts, widths)]
        return torch.cat(sums + (counts if active_only else counts[:1]), dim=-1)

    new = {k: v for k, v in state.items() if not k.startswith("memories.")}
    new.update({"memory.ring": fused("ring"), "memory.total": fused("total"), "memory.ptr": state["memories.0.ptr"],
                "memory.widths": torch.tensor(widths, dtype=torch.long)})
    return new
