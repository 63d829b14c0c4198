"""Neuron intra-class response variance, layer by layer: the measurement behind python -m nsr analyze
(the figure itself, ClassMoments, is nsr/train/steadiness.py's, shared with the live curve of training).

Each candidate layer's output is flattened to B x D neurons (N x C x H x W outputs: one neuron per
channel, the spatial mean as its response). Over all samples, per neuron j:

    intra_j = sum_c (n_c / N) * Var_c(z_j)      Var_c: population variance over class c's samples
    total_j = Var(z_j)                          over all N samples

and a layer's value is the mean of intra_j over its neurons (the largest: the suggested NSR layer).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterable

import numpy as np
import torch
from torch import nn

from nsr.train.steadiness import ClassMoments, responses

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
               nn.Softplus, nn.Hardswish, nn.Mish)
POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def candidate_layers(model: nn.Module) -> list[str]:
    """Names of the layers worth measuring, in model order (before the called-once check).

    Linear and activation modules anywhere; adaptive average pools; top-level containers
    (CNN stages such as layer1 or features) and the composite modules directly inside a
    top-level Sequential (residual blocks such as layer1.0).
    """
    top_sequential = {name for name, m in model.named_children() if isinstance(m, nn.Sequential)}
    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        parts = name.split(".")
        composite = any(True for _ in module.children())
        if isinstance(module, (nn.Linear, *ACTIVATIONS, *POOLS)):
            names.append(name)
        elif composite and len(parts) == 1:
            names.append(name)  # a stage
        elif composite and len(parts) == 2 and parts[0] in top_sequential:
            names.append(name)  # a block inside a stage
    return names


@torch.no_grad()
def layer_variances(model: nn.Module, batches: Iterable, num_classes: int,
                    layers: list[str] | None = None, device: torch.device | str | None = None,
                    max_samples: int | None = None) -> "OrderedDict[str, dict]":
    """Per-neuron intra-class/total variance of each layer's output over `batches` of (x, y).

    layers: module names (default: candidate_layers(model)); a module that runs more than once per
    forward pass (a shared activation) has no single output and is left out, unless named here,
    where it is an error. The model is put in eval mode and restored afterwards.
    """
    explicit = layers is not None
    modules = dict(model.named_modules())
    names = list(layers) if explicit else candidate_layers(model)
    unknown = [n for n in names if n not in modules or not n]
    if unknown:
        raise ValueError(f"no layer named {', '.join(map(repr, unknown))}; candidates: "
                         f"{', '.join(candidate_layers(model))}")
    moments = {n: ClassMoments(num_classes) for n in names}
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def make_hook(name):
        def hook(module, inputs, output):
            captured[name].append(responses(output))
        return hook

    handles = [modules[n].register_forward_hook(make_hook(n)) for n in names]
    was_training = model.training
    model.eval()
    dropped: set[str] = set()
    try:
        for xb, yb in _first_samples(batches, max_samples):
            if device is not None:
                xb, yb = xb.to(device), yb.to(device)
            for n in names:
                captured[n].clear()
            model(xb)
            for n in names:
                outs = captured[n]
                if len(outs) != 1:
                    if explicit:
                        raise ValueError(f"layer {n!r} ran {len(outs)} times in one forward pass; "
                                         "choose a layer that runs once")
                    dropped.add(n)
                    continue
                if n not in dropped:
                    moments[n].update(outs[0], yb)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return OrderedDict((n, {**moments[n].result(), "kind": type(modules[n]).__name__})
                       for n in names if n not in dropped and moments[n].count is not None)


def _first_samples(batches: Iterable, max_samples: int | None):
    """The batches, cut after max_samples samples (all of them when None)."""
    seen = 0
    for xb, yb in batches:
        if max_samples is not None and seen >= max_samples:
            return
        if max_samples is not None and seen + len(yb) > max_samples:
            xb, yb = xb[: max_samples - seen], yb[: max_samples - seen]
        seen += len(yb)
        yield xb, yb


def summarize_layers(per_layer: dict) -> list[dict]:
    """One row per layer: neurons, mean/median intra-class variance, total variance, share."""
    rows = []
    for name, r in per_layer.items():
        intra, total = r["intra"], r["total"]
        tot = float(total.mean())
        rows.append({"layer": name, "kind": r["kind"], "neurons": int(intra.size),
                     "intra_var_mean": float(intra.mean()), "intra_var_median": float(np.median(intra)),
                     "total_var_mean": tot,
                     "intra_share": float(intra.mean()) / tot if tot > 0 else math.nan})
    return rows


def suggest_layer(rows: list[dict]) -> str | None:
    """The layer with the largest mean intra-class variance.

    Ties within float rounding go to the earlier layer, so a CNN stage (layer4) wins over its
    last block (layer4.1) and the pooling after it, which measure the same responses.
    """
    best = None
    for row in rows:
        v = row["intra_var_mean"]
        if not math.isfinite(v):
            continue
        if best is None or v > best["intra_var_mean"] * (1 + 1e-6) + 1e-300:
            best = row
    return best["layer"] if best else None
