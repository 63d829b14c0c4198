"""Checkpoints: written atomically, read with torch.load(weights_only=True) only."""

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
