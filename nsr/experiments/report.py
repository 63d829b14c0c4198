"""Reports: the results table of `python -m nsr reproduce`, and the layer table of `python -m nsr analyze`.

The results table is rebuilt from reproduce's finished run folders; analyze's table comes with a histogram.

    python -m nsr report runs/fmnist-paper                 # every model and variant found there
    python -m nsr report runs/fmnist-paper --models mlp4 mlp10

Reads OUT/<model>/<variant>/seed<S>/metrics.json (the layout python -m nsr reproduce writes; run folders
are only read) and writes
    OUT/table.md, OUT/table.csv   one column per model, one row per variant (test error % as
                                  mean ± sample std over seeds), then the gain and the paired
                                  t-test p-value of each variant against vanilla; for a model
                                  run on the paper's data set, the paper's rows beside ours
    OUT/summary.json              the numbers behind the table, and each seed's metrics
    OUT/curves.png                per model: validation accuracy per epoch, and beside it the
                                  steadiness of the NSR layer (its neurons' mean intra-class
                                  variance, from history.csv), mean ± std band over seeds
Runs not finished are left out (a warning names them); a damaged metrics.json is an error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np

from nsr.train.errors import ArgumentParser, UserError, one_line, run_cli
from nsr.train.fileio import write_atomic, write_json

from . import curves, paper, stats
from .curves import curve_stats  # noqa: F401  (part of this module's API)
from .figures import pyplot, save_png

BASELINE = "vanilla"
# Row labels of the table; a variant not listed here is shown by its folder name.
LABELS = {"vanilla": "Vanilla", "nsr": "Vanilla + NSR", "center": "Center loss",
          "label_smoothing": "Label smoothing", "dropout": "Dropout"}
DISPLAY_NAMES = {
    "resnet18_cifar10": "ResNet-18", "vgg19_cifar10": "VGG-19", "resnet50_imagenet": "ResNet-50",
}
SEED_FOLDER = re.compile(r"seed(\d+)")
SUMMARY_KEYS = ("dataset", "test_error", "test_acc", "best_epoch", "best_val_acc", "epochs", "lambda",
                "train_time_s", "num_params")


def natural_key(name: str) -> list:
    """Sort key putting mlp3 before mlp10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def display_name(model: str) -> str:
    """Column title: 'MLP-10' for mlp10, 'ResNet-18' for resnet18_cifar10, else the name."""
    match = re.fullmatch(r"mlp(\d+)", model)
    return f"MLP-{match.group(1)}" if match else DISPLAY_NAMES.get(model, model)


def run_dir(out: Path, model: str, variant: str, seed: int) -> Path:
    return Path(out) / model / variant / f"seed{seed}"


def read_metrics(folder: Path) -> dict | None:
    """A run folder's metrics.json; None when it has none. Unreadable or damaged: UserError."""
    return _read_run_file(Path(folder) / "metrics.json", json.load, ValueError)


def read_settings(folder: Path) -> dict | None:
    """The config.yaml a run saved when it started; None when it has none. Damaged: UserError.
    (A copy for people: a tool that compares settings reads the checkpoint's, reproduce.run_settings.)"""
    import yaml
    return _read_run_file(Path(folder) / "config.yaml", yaml.safe_load, yaml.YAMLError)


def _read_run_file(path: Path, parse, parse_error: type[Exception]) -> dict | None:
    if not path.exists():
        return None
    again = "move that run folder away and train the run again"
    try:
        with open(path) as f:
            data = parse(f)
    except (OSError, parse_error) as e:
        raise UserError(f"cannot read {path} ({one_line(e)}); restore it, or {again}") from None
    if not isinstance(data, dict):
        what = f"holds a JSON {type(data).__name__}, not the object a run writes" if path.suffix == ".json" \
            else "is not a mapping of settings"
        raise UserError(f"{path} {what}; {again}")
    return data


def seed_folders(variant_dir: Path) -> dict[int, Path]:
    """{seed: folder} of the seed<S> folders under one variant's folder."""
    found = {}
    if variant_dir.is_dir():
        for p in variant_dir.iterdir():
            match = SEED_FOLDER.fullmatch(p.name)
            if match and p.is_dir():
                found[int(match.group(1))] = p
    return dict(sorted(found.items()))


def discover(out: Path) -> dict[str, list[str]]:
    """{model: [variant, ...]} of the folders under OUT that hold seed folders; models in natural
    order, the baseline first among the variants, then nsr, then the others by name."""
    first = {BASELINE: 0, "nsr": 1}
    found = {}
    for model_dir in sorted((p for p in out.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
        variants = [v.name for v in model_dir.iterdir() if seed_folders(v)]
        if variants:
            found[model_dir.name] = sorted(variants, key=lambda v: (first.get(v, 2), natural_key(v)))
    return found


def test_error(metrics: dict, folder: Path) -> float | None:
    """The run's test error, None when the run has none (NaN: no test split was measured)."""
    value = metrics.get("test_error")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{folder / 'metrics.json'}: test_error is {value!r}, not a number; "
                        "move that run folder away and train the run again")
    return float(value) if math.isfinite(value) else None


def collect(out: Path, models: list[str], variants: list[str], seeds: list[int] | None = None,
            warn=None) -> dict:
    """{model: {variant: {seed: metrics}}} of the finished runs (every seed folder found when
    seeds is None). Unfinished runs are skipped with a warning."""
    warn = warn or (lambda text: print(f"warning: {text}", file=sys.stderr))
    results: dict = {}
    for model in models:
        results[model] = {}
        for variant in variants:
            folders = seed_folders(Path(out) / model / variant)
            if seeds is not None:
                folders = {s: run_dir(out, model, variant, s) for s in seeds}
            runs = {}
            for seed, folder in folders.items():
                metrics = read_metrics(folder)
                if metrics is None or metrics.get("finished") is not True:
                    if folder.is_dir():
                        why = " (stopped by --max-steps)" if (metrics or {}).get("stopped_by") == "max_steps" else ""
                        warn(f"{folder} is not a finished run{why}; left out of the table")
                    continue
                if test_error(metrics, folder) is None:  # (a damaged value fails there, before anything is written)
                    warn(f"{folder} is a finished run without a test error (test_error is "
                         f"{metrics.get('test_error')!r}); left out of the table")
                    continue
                runs[seed] = metrics
            results[model][variant] = runs
        _warn_unpaired(model, results[model], warn)
    return results


def _warn_unpaired(model: str, by_variant: dict, warn) -> None:
    """A variant whose seeds are not the baseline's: its gain compares means over different seeds."""
    base = sorted(by_variant.get(BASELINE, {}))
    for variant, runs in by_variant.items():
        both = len(set(runs) & set(base))
        if variant != BASELINE and sorted(runs) != base:
            warn(f"{display_name(model)}: {variant} has seeds {', '.join(map(str, sorted(runs))) or 'none'} and "
                 f"{BASELINE} {', '.join(map(str, base)) or 'none'}; its gain compares the means of these unequal "
                 f"sets, its p-value pairs the {both} seed{'s' * (both != 1)} both have")


def errors_by_seed(runs: dict) -> dict[int, float]:
    errors = {seed: test_error(m, Path()) for seed, m in runs.items()}
    return {seed: e for seed, e in errors.items() if e is not None}


def dataset_of(by_variant: dict) -> str | None:
    """The data set every run of a column trained on (None when they differ or none is known)."""
    found = {m.get("dataset") for runs in by_variant.values() for m in runs.values()}
    return found.pop() if len(found) == 1 else None


def write_tables(out: Path, results: dict) -> str:
    """table.md, table.csv and summary.json; returns the Markdown table."""
    summaries = {model: stats.summarize({v: errors_by_seed(r) for v, r in by_variant.items()},
                                        BASELINE)
                 for model, by_variant in results.items()}
    rows = stats.results_table({display_name(m): s for m, s in summaries.items()}, LABELS, BASELINE)
    rows += paper.rows({display_name(m): (m, dataset_of(by_variant)) for m, by_variant in results.items()})
    md = stats.table_markdown(rows)
    counts = "; ".join(f"{display_name(m)}: " + ", ".join(f"{v} {s[v]['n']}" for v in s)
                       for m, s in summaries.items())
    header = ("Test error (%) as mean ± sample std over seeds; Gain = relative error reduction of "
              f"the means against {LABELS[BASELINE]}; p-value: two-sided paired t-test over seeds "
              "against it (n/a: fewer than 2 pairs or constant differences).\n\n")
    write_atomic(Path(out) / "table.md", header + md + f"\nSeeds: {counts}.\n")
    write_atomic(Path(out) / "table.csv", stats.table_csv(rows))
    detail = {model: {variant: {"summary": summaries[model][variant],
                                "runs": {str(seed): {k: m.get(k) for k in SUMMARY_KEYS}
                                         for seed, m in runs.items()}}
                      for variant, runs in by_variant.items()}
              for model, by_variant in results.items()}
    write_json(Path(out) / "summary.json", detail)
    return md


def _histories(runs: dict, key: str) -> list[list[float]]:
    found = []
    for metrics in runs.values():
        history = metrics.get("history")
        values = [e.get(key) for e in history if isinstance(e, dict)] if isinstance(history, list) else []
        values = [float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
                  for v in values]
        if values:
            found.append(values)
    return found


def write_curves(out: Path, results: dict) -> Path | None:
    """curves.png: per model, validation accuracy (metrics.json's history) and, beside it, the
    steadiness of the NSR layer (history.csv), one line per variant, mean ± std over seeds."""
    panels = []
    for model, by_variant in results.items():
        columns = {v: {seed: curves.history_columns(run_dir(out, model, v, seed)) for seed in runs}
                   for v, runs in by_variant.items()}
        layer = curves.steadiness_layer(
            # runs from before the rename of nsr_layers hold the old key
            [m.get("regularized_layers") or m.get("nsr_layers") or [] for runs in by_variant.values()
             for m in runs.values()],
            [c for by_seed in columns.values() for c in by_seed.values()])
        column = curves.STEADINESS + str(layer)
        panels.append({
            "title": display_name(model), "layer": layer,
            "accuracy": {LABELS.get(v, v): _histories(runs, "val_acc") for v, runs in by_variant.items()},
            "steadiness": {LABELS.get(v, v): [c[column] for c in by_seed.values() if column in c]
                           for v, by_seed in columns.items()}})
    return curves.plot(Path(out) / "curves.png", panels) if panels else None


def nonempty(text: str) -> str:
    """argparse type of a name or path that must not be empty (an empty path would mean '.')."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def path_arg(text: str) -> Path:
    return Path(nonempty(text))


def check_writable(out: Path, flag: str = "OUT") -> None:
    """OUT is a folder, or can be made in one, that this process can write (checked before
    anything is written)."""
    existing = Path(out).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == Path(out).absolute() else f"lies under the file {existing}"
        raise UserError(f"{flag} {out} {where}; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: cannot write into {existing} (permission denied)")


def write_report(out: Path, models: list[str], variants: list[str], seeds: list[int] | None = None) -> str:
    """Tables, summary.json and curves of the given runs; returns the Markdown table."""
    out = Path(out)
    check_writable(out, "--out")
    results = collect(out, models, variants, seeds)
    md = write_tables(out, results)
    write_curves(out, results)
    return md


def report_folder(out: Path, models: list[str] | None = None) -> str:
    """write_report for every variant found under OUT (and every model, unless `models` narrows
    the columns)."""
    out = Path(out)
    if not out.exists():
        raise UserError(f"{out} does not exist; give the --out folder of python -m nsr reproduce")
    if not out.is_dir():
        raise UserError(f"{out} is not a folder; give the --out folder of python -m nsr reproduce")
    check_writable(out)
    found = discover(out)
    if not found:
        raise UserError(f"no runs in {out}: expected {out}/<model>/<variant>/seed<S>/metrics.json")
    unknown = [m for m in models or [] if m not in found]
    if unknown:
        raise UserError(f"no runs for {', '.join(unknown)} in {out}; found: {', '.join(found)}")
    models = list(dict.fromkeys(models)) if models else list(found)
    variants = list(dict.fromkeys(v for m in models for v in found[m]))
    return write_report(out, models, variants)


def print_report(out: Path, md: str) -> None:
    print(md, end="")
    print(f"wrote {Path(out) / 'table.md'}, table.csv, summary.json, curves.png")


# ------------------------------------------------------------------------------- python -m nsr analyze

def format_table(rows: list[dict], compare: dict[str, dict] | None = None,
                 suggested: str | None = None) -> str:
    """python -m nsr analyze's layer rows as an aligned text table; * marks the suggested layer."""
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
    plt = pyplot()
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
    save_png(fig, path)
    return path


def print_variance(report: dict) -> None:
    """The layer table of python -m nsr analyze and its suggestion."""
    rows, suggested, compare = report["layers"], report["suggested_layer"], report["compare_layers"]
    print(f"\nneuron intra-class variance on the {report['split']} split of {report['dataset']} "
          f"({report['num_samples']} samples), model {report['model']} from {report['checkpoint']}"
          + (f"; compare: {report['compare']}" if report["compare"] else ""))
    print(format_table(rows, None if compare is None else {r["layer"]: r for r in compare}, suggested))
    if suggested:
        best = next(r for r in rows if r["layer"] == suggested)
        print(f"\nsuggested NSR target: {suggested} (largest mean intra-class variance, "
              f"{best['intra_var_mean']:.4g}); e.g. --regularized-layers {suggested}")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m nsr report", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=path_arg, metavar="OUT", help="the --out folder of python -m nsr reproduce")
    parser.add_argument("--models", nargs="+", metavar="MODEL",
                        help="columns to show, in this order (default: every model in OUT)")
    args = parser.parse_args(argv)
    print_report(args.out, report_folder(args.out, args.models))
    return 0


if __name__ == "__main__":
    run_cli(main)
