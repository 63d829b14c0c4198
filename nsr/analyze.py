"""Which layer to regularize: neuron intra-class response variance, layer by layer.

    python -m nsr.analyze --config configs/mlp4.yaml --dataset digits          # short warm-up first
    python -m nsr.analyze --checkpoint runs/vanilla/best.pt --compare runs/nsr/best.pt --out DIR

For every candidate layer (Linear and activation layers of MLPs; stem activation, stages,
residual/conv blocks, pooling and classifier of CNNs) the layer's output is flattened to neurons
(N x C x H x W outputs: one neuron per channel, the spatial mean as its response). Over the data
set (the training split by default, in eval mode, without augmentation), per neuron j:

    intra_j = sum_c (n_c / N) * Var_c(z_j)      Var_c: population variance over class c's samples
    total_j = Var(z_j)                          over all N samples

and the layer's value is the mean of intra_j over its neurons. The layer with the largest value
is the suggested NSR target (the paper's empirical criterion). Outputs in --out: analysis.json
(all numbers, the per-neuron values of the plotted layer) and intra_class_variance.png (histogram
of per-neuron intra-class variance, checkpoint vs --compare, for the suggested or --layer layer).

Without --checkpoint a vanilla model is first trained for --warmup-epochs epochs by the engine
(its checkpoints land in OUT/warmup/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
               nn.Softplus, nn.Hardswish, nn.Mish)
POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


# ------------------------------------------------------------------------------- layers

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


def layer_kind(model: nn.Module, name: str) -> str:
    return type(dict(model.named_modules())[name]).__name__


def responses(output: torch.Tensor) -> torch.Tensor:
    """B x D float64 neuron responses: 4-D (and 3-D/5-D) outputs become per-channel spatial means."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    out = output.detach()
    if out.dim() > 2:
        out = out.flatten(2).mean(dim=2)
    elif out.dim() == 1:
        out = out[:, None]
    return out.to(torch.float64).clone()


class ClassMoments:
    """Per-class count, mean and sum of squared deviations (M2) of B x D responses, merged
    batch by batch with Chan et al.'s parallel update (stable in float64)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.count = self.mean = self.m2 = None

    def update(self, z: torch.Tensor, y: torch.Tensor) -> None:
        C = self.num_classes
        z = z.to(torch.float64)
        y = y.to(device=z.device, dtype=torch.long)
        n_b = torch.zeros(C, dtype=torch.float64, device=z.device).index_add_(
            0, y, torch.ones_like(y, dtype=torch.float64))
        sums = torch.zeros(C, z.shape[1], dtype=torch.float64, device=z.device).index_add_(0, y, z)
        mean_b = sums / n_b.clamp_min(1)[:, None]
        dev = z - mean_b.index_select(0, y)
        m2_b = torch.zeros_like(sums).index_add_(0, y, dev * dev)
        if self.count is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        if self.mean.shape[1] != z.shape[1]:
            raise ValueError(f"layer output changed from {self.mean.shape[1]} to {z.shape[1]} neurons")
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        safe = n.clamp_min(1)[:, None]
        self.mean = self.mean + delta * (n_b[:, None] / safe)
        self.m2 = self.m2 + m2_b + delta * delta * (n_a * n_b)[:, None] / safe
        self.count = n

    def result(self) -> dict:
        """Per-neuron intra-class and total variance (numpy float64 arrays of length D)."""
        if self.count is None:
            raise ValueError("no samples were seen")
        N = float(self.count.sum())
        intra = self.m2.sum(dim=0) / N
        grand = (self.count[:, None] * self.mean).sum(dim=0) / N
        between = (self.count[:, None] * (self.mean - grand) ** 2).sum(dim=0) / N
        return {"intra": intra.cpu().numpy(), "total": (intra + between).cpu().numpy(),
                "num_samples": int(N), "class_counts": self.count.cpu().numpy().astype(int).tolist()}


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
    seen = 0
    try:
        for xb, yb in batches:
            if max_samples is not None and seen >= max_samples:
                break
            if max_samples is not None and seen + len(yb) > max_samples:
                xb, yb = xb[: max_samples - seen], yb[: max_samples - seen]
            if device is not None:
                xb, yb = xb.to(device), yb.to(device)
            for n in names:
                captured[n].clear()
            model(xb)
            seen += len(yb)
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
    result = OrderedDict()
    for n in names:
        if n in dropped or moments[n].count is None:
            continue
        r = moments[n].result()
        r["kind"] = type(modules[n]).__name__
        result[n] = r
    return result


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


def format_table(rows: list[dict], compare: dict[str, dict] | None = None,
                 suggested: str | None = None) -> str:
    head = ["layer", "kind", "neurons", "intra-class var", "median", "total var", "intra/total"]
    if compare is not None:
        head += ["compare intra", "ratio"]
    lines = [head]
    for r in rows:
        cells = [r["layer"] + (" *" if r["layer"] == suggested else ""), r["kind"], str(r["neurons"]),
                 f"{r['intra_var_mean']:.4g}", f"{r['intra_var_median']:.4g}",
                 f"{r['total_var_mean']:.4g}",
                 "n/a" if math.isnan(r["intra_share"]) else f"{100 * r['intra_share']:.1f}%"]
        if compare is not None:
            c = compare.get(r["layer"])
            if c is None:
                cells += ["-", "-"]
            else:
                ratio = c["intra_var_mean"] / r["intra_var_mean"] if r["intra_var_mean"] > 0 else math.nan
                cells += [f"{c['intra_var_mean']:.4g}", f"{ratio:.3f}"]
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def plot_histogram(path: Path, layer: str, series: list[tuple[str, np.ndarray]]) -> Path:
    """Overlaid histograms of per-neuron intra-class variance (log-spaced bins if it spans >100x)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.concatenate([v for _, v in series])
    positive = values[values > 0]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    use_log = positive.size and positive.max() / positive.min() > 100
    if use_log:
        lo, hi = positive.min(), positive.max()
        bins = np.logspace(np.log10(lo), np.log10(hi) + 1e-9, 40)
        ax.set_xscale("log")
    else:
        lo, hi = float(values.min()), float(values.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 40)
    colors = ["tab:blue", "tab:red", "tab:green", "tab:orange"]
    for (label, v), color in zip(series, colors):
        shown = v[v > 0] if use_log else v
        ax.hist(shown, bins=bins, alpha=0.5, color=color,
                label=f"{label} (mean {v.mean():.3g}, n={v.size})")
    ax.set_xlabel("per-neuron intra-class variance  Σc (n_c/N)·Var_c")
    ax.set_ylabel("neurons")
    from matplotlib.ticker import MaxNLocator
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Neuron intra-class response variance: layer {layer}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------- models and data

def _config_from(args):
    """(Config, source) from the checkpoint's saved config, else from --config."""
    from .config import Config, apply_overrides, load_yaml, validate

    if args.checkpoint:
        from .checkpoint import load_checkpoint
        from .config import from_dict
        saved = load_checkpoint(args.checkpoint).get("config") or {}
        cfg = from_dict(saved)
    else:
        cfg = Config()
        if args.config:
            apply_overrides(cfg, load_yaml(args.config), f"config {args.config}")
    overrides = {k: getattr(args, k) for k in ("dataset", "data_dir", "val_size", "device")
                 if getattr(args, k, None) is not None}
    if overrides:
        apply_overrides(cfg, overrides, "command line")
    cfg.seed = args.seed if args.seed is not None else cfg.seed
    validate(cfg)
    return cfg


def _device(cfg) -> torch.device:
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def load_model(path: str, num_classes: int, in_shape, device) -> tuple[nn.Module, dict]:
    """A model rebuilt from a checkpoint's config and weights, and that config."""
    from models import build_model
    from .checkpoint import load_checkpoint

    state = load_checkpoint(path, map_location="cpu")
    saved = state.get("config") or {}
    model = build_model(saved.get("model", "mlp4"), num_classes, in_shape)
    weights = state["model"]
    if any(k.startswith("module.") for k in weights):
        weights = {k.removeprefix("module."): v for k, v in weights.items()}
    model.load_state_dict(weights)
    return model.to(device), saved


def analysis_batches(data, split: str, batch_size: int):
    """Unshuffled batches of a split, with eval preprocessing (no augmentation) when possible."""
    from .data import TensorBatches

    source = getattr(data, split)
    if isinstance(source, TensorBatches):
        transform = data.val.transform if split == "train" else source.transform
        return TensorBatches(source.x, source.y, batch_size, shuffle=False, seed=0,
                             transform=transform)
    return source  # streamed data (ImageNet): its own preprocessing


def warmup(cfg, epochs: int, out: Path) -> str:
    """Train a vanilla model for a few epochs with the engine; returns its last.pt."""
    from .engine import train

    import dataclasses

    wcfg = dataclasses.replace(cfg, nsr=False, epochs=epochs, out=str(out), overwrite=True,
                               resume=False, quiet=True, max_steps=None)
    print(f"warm-up: training vanilla {cfg.model} on {cfg.dataset} for {epochs} epoch(s) -> {out}",
          flush=True)
    train(wcfg)
    return str(out / "last.pt")


def _label(path: str, saved: dict) -> str:
    """'vanilla (seed0/best.pt)' or 'NSR out=7.49 (nsr/best.pt)'."""
    where = "/".join(Path(path).parts[-2:])
    if saved.get("nsr"):
        lam, layers = saved.get("lambda") or [], saved.get("nsr_layers") or []
        what = " ".join(f"{n}={float(v):.3g}" for n, v in zip(layers, lam))
        return f"NSR {what} ({where})".replace("  ", " ")
    return f"vanilla ({where})"


# ------------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m nsr.analyze", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML config (model, data set) for the warm-up run; with "
                                    "--checkpoint the checkpoint's saved config is used instead")
    p.add_argument("--checkpoint", help="model to analyse (default: a short vanilla warm-up run)")
    p.add_argument("--compare", help="second checkpoint (e.g. the NSR run) for the histogram")
    p.add_argument("--dataset", help="override the config's data set")
    p.add_argument("--data-dir", dest="data_dir", help="override the config's data folder")
    p.add_argument("--val-size", dest="val_size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--split", choices=["train", "val", "test"], default="train",
                   help="data the variances are measured on (default train)")
    p.add_argument("--layer", help="layer for the histogram (default: the suggested one)")
    p.add_argument("--layers", nargs="+", help="measure only these module names")
    p.add_argument("--max-samples", type=int, help="use at most N samples of the split")
    p.add_argument("--batch-size", type=int, default=500, help="analysis batch size (default 500)")
    p.add_argument("--warmup-epochs", type=int, default=3, help="warm-up epochs without --checkpoint")
    p.add_argument("--seed", type=int, help="seed of the warm-up run")
    p.add_argument("--out", type=Path, help="output folder (default runs/analyze-<model>-<dataset>)")
    args = p.parse_args(argv)
    if not args.checkpoint and not args.config:
        p.error("give --config (a warm-up run is trained) or --checkpoint")
    if args.warmup_epochs < 1:
        p.error("--warmup-epochs must be at least 1")
    return args


def run(args) -> dict:
    from .data import load_data

    cfg = _config_from(args)
    out = args.out or Path("runs") / f"analyze-{cfg.model}-{cfg.dataset}"
    out.mkdir(parents=True, exist_ok=True)
    device = _device(cfg)
    checkpoint = args.checkpoint or warmup(cfg, args.warmup_epochs, out / "warmup")

    torch.manual_seed(cfg.seed)
    data = load_data(cfg, device)
    batches = lambda: analysis_batches(data, args.split, args.batch_size)  # noqa: E731
    model, saved = load_model(checkpoint, data.num_classes, data.in_shape, device)
    per_layer = layer_variances(model, batches(), data.num_classes, args.layers, device,
                                args.max_samples)
    rows = summarize_layers(per_layer)
    suggested = suggest_layer(rows)

    compare_rows = compare_layer = None
    if args.compare:
        cmodel, csaved = load_model(args.compare, data.num_classes, data.in_shape, device)
        cmp_layers = args.layers or [r["layer"] for r in rows
                                     if r["layer"] in dict(cmodel.named_modules())]
        compare_layer = layer_variances(cmodel, batches(), data.num_classes, cmp_layers, device,
                                        args.max_samples)
        compare_rows = {r["layer"]: r for r in summarize_layers(compare_layer)}

    plotted = args.layer or suggested
    if plotted not in per_layer:
        # a layer outside the measured set: measure it on its own
        extra = layer_variances(model, batches(), data.num_classes, [plotted], device, args.max_samples)
        per_layer[plotted] = extra[plotted]
    series = [(_label(checkpoint, saved), per_layer[plotted]["intra"])]
    if args.compare:
        if plotted not in compare_layer:
            compare_layer.update(layer_variances(cmodel, batches(), data.num_classes, [plotted],
                                                 device, args.max_samples))
        series.append((_label(args.compare, csaved), compare_layer[plotted]["intra"]))

    print(f"\nneuron intra-class variance on the {args.split} split of {cfg.dataset} "
          f"({per_layer[plotted]['num_samples']} samples), model {saved.get('model', cfg.model)} "
          f"from {checkpoint}" + (f"; compare: {args.compare}" if args.compare else ""))
    print(format_table(rows, compare_rows, suggested))
    if suggested:
        best = next(r for r in rows if r["layer"] == suggested)
        print(f"\nsuggested NSR target: {suggested} (largest mean intra-class variance, "
              f"{best['intra_var_mean']:.4g}); e.g. --nsr-layers {suggested}")

    png = plot_histogram(out / "intra_class_variance.png", plotted, series)
    report = {
        "checkpoint": checkpoint, "compare": args.compare, "model": saved.get("model", cfg.model),
        "dataset": cfg.dataset, "split": args.split, "num_samples": per_layer[plotted]["num_samples"],
        "definition": "per neuron: sum_c (n_c/N) * Var_c(response), population variance within "
                      "class c; CNN outputs: per channel, spatial mean; layer value: mean over neurons",
        "suggested_layer": suggested, "plotted_layer": plotted,
        "layers": rows,
        "compare_layers": list(compare_rows.values()) if compare_rows is not None else None,
        "per_neuron_intra_var": {"checkpoint": per_layer[plotted]["intra"].tolist(),
                                 "compare": (compare_layer[plotted]["intra"].tolist()
                                             if args.compare else None)},
        "histogram": str(png),
    }
    with open(out / "analysis.json", "w") as f:
        json.dump(_json_safe(report), f, indent=2)
        f.write("\n")
    print(f"wrote {out / 'analysis.json'} and {png}")
    return report


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def main(argv=None) -> int:
    from .errors import UserError

    args = parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
