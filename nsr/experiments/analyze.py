"""Which layer to regularize: neuron intra-class response variance, layer by layer.

    python -m nsr analyze --config configs/mlp4.yaml --dataset digits          # short warm-up first
    python -m nsr analyze --checkpoint runs/vanilla/best.pt --compare runs/nsr/best.pt --out DIR

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
import dataclasses
import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from nsr.train.batches import TensorBatches
from nsr.train.build import build_checked_model, setup_runtime
from nsr.train.checkpoint import load_checkpoint
from nsr.train.config import Config, apply_overrides, from_dict, validate
from nsr.train.yamlfile import load_yaml
from nsr.train.data import load_data
from nsr.train.engine import train
from nsr.train.errors import ArgumentParser, UserError, one_line, run_cli
from nsr.train.fileio import write_json

from .layer_variance import (
    candidate_layers,
    layer_variances,
    suggest_layer,
    summarize_layers,
)
from .report import check_writable, nonempty, path_arg, plot_histogram, print_variance

# ------------------------------------------------------------------------------- checkpoints and data

def read_checkpoint(path: str):
    """(checkpoint, the Config it was trained with); UserError for anything else."""

    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; give a checkpoint file (a run's best.pt or last.pt)")
    state = load_checkpoint(path)
    saved, weights = state.get("config"), state.get("model")
    if (not isinstance(saved, dict) or not isinstance(weights, dict)
            or not all(torch.is_tensor(v) for v in weights.values())):
        raise UserError(f"{path} holds no model weights and config; give a run's best.pt or last.pt")
    try:
        return state, from_dict(saved)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def load_model(path: str, state: dict | None, cfg, data, device) -> nn.Module:
    """The model of `cfg` for the data's classes and input shape, with the checkpoint's weights
    (none: fresh weights); UserError when they do not fit (another model or data set)."""
    model = build_checked_model(dataclasses.replace(cfg, regularizer="none"), data.num_classes, data.in_shape)
    if state is None:
        return model
    weights = state["model"]  # the engine saves the unwrapped model: names as model.state_dict() has them
    expected = model.state_dict()
    problems = [f"{k} is {tuple(weights[k].shape)} there, {tuple(v.shape)} here"
                for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    problems += [f"{k} is missing" for k in expected if k not in weights]
    problems += [f"{k} is not a weight of {cfg.model}" for k in weights if k not in expected]
    if problems:
        raise UserError(f"{path} does not fit a {cfg.model} for {data.num_classes} classes and inputs "
                        f"{tuple(data.in_shape)}: {problems[0]}; analyse it on the data set it was "
                        "trained on (--dataset)")
    model.load_state_dict(weights)
    return model.to(device)


def analysis_batches(data, split: str, batch_size: int):
    """Unshuffled batches of a split, with eval preprocessing (no augmentation) when possible."""
    source = getattr(data, split)
    if isinstance(source, TensorBatches):
        transform = data.val.transform if split == "train" else source.transform
        return TensorBatches(source.x, source.y, batch_size, shuffle=False, seed=0, transform=transform)
    return source  # streamed data (ImageNet): its own preprocessing


def warmup(cfg, epochs: int, out: Path) -> str:
    """Train a vanilla model for a few epochs with the engine; returns its last.pt."""
    print(f"warm-up: training vanilla {cfg.model} on {cfg.dataset} for {epochs} epoch(s) -> {out}",
          flush=True)
    train(dataclasses.replace(cfg, regularizer="none", epochs=epochs, out=str(out), overwrite=True,
                              resume=False, quiet=True, max_steps=None))
    return str(out / "last.pt")


def _label(path: str, cfg) -> str:
    """'vanilla (seed0/best.pt)' or 'NSR out=7.49 (nsr/best.pt)'."""
    lambdas = (f"{n}={v:.3g}" for n, v in zip(cfg.regularized_layers, cfg.lambda_))
    method = "center loss" if cfg.regularizer == "center" else "NSR"
    what = " ".join([method, *lambdas]) if cfg.regularizer != "none" else "vanilla"
    return f"{what} ({'/'.join(Path(path).parts[-2:])})"


# ------------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = ArgumentParser(prog="python -m nsr analyze", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=nonempty, help="YAML config (model, data set) of the warm-up "
                   "run; with --checkpoint the checkpoint's saved config is used instead")
    p.add_argument("--checkpoint", type=nonempty, help="model to analyse (default: a warm-up run)")
    p.add_argument("--compare", type=nonempty, help="second checkpoint (e.g. NSR's) for the histogram")
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
    p.add_argument("--out", type=path_arg, help="output folder (default runs/analyze-<model>-<dataset>)")
    args = p.parse_args(argv)
    if not args.checkpoint and not args.config:
        raise UserError("give --config (a warm-up run is trained) or --checkpoint")
    for flag in ("batch_size", "warmup_epochs", "max_samples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    args.named = (args.layers or []) + ([args.layer] if args.layer is not None else [])
    return args


def load_config(args):
    """(Config, checkpoint or None): the checkpoint's config, else --config's, with the command
    line's overrides."""
    state = None
    if args.checkpoint:
        state, cfg = read_checkpoint(args.checkpoint)
    else:
        cfg = apply_overrides(Config(), load_yaml(args.config), f"config {args.config}")
    overrides = {k: getattr(args, k) for k in ("dataset", "data_dir", "val_size", "device", "seed")
                 if getattr(args, k) is not None}
    apply_overrides(cfg, overrides, "command line")
    try:
        validate(cfg)
    except UserError as e:
        raise UserError(f"{args.checkpoint}: {e}" if args.checkpoint else str(e)) from None
    return cfg, state


def check_layers(model: nn.Module, names: list[str], whose: str) -> None:
    modules = dict(model.named_modules())
    unknown = [n for n in names if not n or n not in modules]
    if unknown:
        raise UserError(f"{whose} has no layer named {unknown[0]!r}; candidates: "
                        f"{', '.join(candidate_layers(model))}")


def measure(model: nn.Module, data, args, device, layers: list[str] | None) -> OrderedDict:
    try:
        return layer_variances(model, analysis_batches(data, args.split, args.batch_size),
                               data.num_classes, layers, device, args.max_samples)
    except ValueError as e:  # a named layer that runs twice per forward pass
        raise UserError(one_line(e)) from None


def analyse(args, models: list[tuple[str, nn.Module, object]], data, device) -> dict:
    """Measure the checkpoint (and --compare); the numbers of analysis.json and the histogram's."""
    (path, model, cfg), compare = models[0], models[1:]
    per_layer = measure(model, data, args, device, args.layers)
    rows = summarize_layers(per_layer)
    suggested = suggest_layer(rows)
    plotted = args.layer or suggested
    if plotted is None:
        raise UserError(f"no layer of {path} has a finite intra-class variance (are its weights "
                        "finite?); name one with --layer")
    if plotted not in per_layer:
        per_layer.update(measure(model, data, args, device, [plotted]))
    series = [(_label(path, cfg), per_layer[plotted]["intra"])]
    compare_rows = None
    for cpath, cmodel, ccfg in compare:
        names = dict(cmodel.named_modules())
        layers = list(args.layers or [r["layer"] for r in rows if r["layer"] in names])
        layers += [plotted] if plotted not in layers else []
        check_layers(cmodel, layers, f"--compare {cpath}")
        measured = measure(cmodel, data, args, device, layers)
        compare_rows = summarize_layers(measured)
        series.append((_label(cpath, ccfg), measured[plotted]["intra"]))
    return {
        "checkpoint": path, "compare": args.compare, "model": cfg.model, "dataset": cfg.dataset,
        "split": args.split, "num_samples": per_layer[plotted]["num_samples"],
        "definition": "per neuron: sum_c (n_c/N) * Var_c(response), population variance within "
                      "class c; CNN outputs: per channel, spatial mean; layer value: mean over neurons",
        "suggested_layer": suggested, "plotted_layer": plotted, "layers": rows,
        "compare_layers": compare_rows, "series": series,
        "per_neuron_intra_var": {"checkpoint": series[0][1].tolist(),
                                 "compare": series[1][1].tolist() if compare else None},
    }


def main(argv=None) -> int:
    """Config, device, checkpoints, data and layer names are all checked before the warm-up run
    or any output file is written."""

    args = parse_args(argv)
    cfg, state = load_config(args)
    second = read_checkpoint(args.compare) if args.compare else None
    device = setup_runtime(cfg).device
    out = args.out or Path("runs") / f"analyze-{cfg.model}-{cfg.dataset}"
    check_writable(out, "--out")
    torch.manual_seed(cfg.seed)
    data = load_data(cfg, device)
    checkpoint = args.checkpoint
    model = load_model(checkpoint, state, cfg, data, device)  # without a checkpoint: fresh weights
    check_layers(model, args.named, checkpoint or cfg.model)
    compare = [(args.compare, load_model(args.compare, *second, data, device), second[1])] if second else []
    if checkpoint is None:
        checkpoint = warmup(cfg, args.warmup_epochs, out / "warmup")
        state, cfg = read_checkpoint(checkpoint)
        model = load_model(checkpoint, state, cfg, data, device)
    models = [(checkpoint, model, cfg), *compare]
    report = analyse(args, models, data, device)
    print_variance(report)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_histogram(out / "intra_class_variance.png", report["plotted_layer"], report.pop("series"))
    write_json(out / "analysis.json", {**report, "histogram": str(png)})
    print(f"wrote {out / 'analysis.json'} and {png}")
    return 0


if __name__ == "__main__":
    run_cli(main)
