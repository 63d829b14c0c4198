"""NSR against its nearest relatives, and how sensitive it is to λ and K.

    python -m nsr compare --data-dir /usr/share/datasets/fashion-mnist --out runs/compare --jobs 2

On the paper's MLP recipe (configs/mlp4.yaml, mlp10.yaml: plain SGD, batch 100, 100 epochs,
test error at the best validation epoch), three stages of python -m nsr reproduce runs:

  tune    each method's strength on a grid of 5 values: 1 seed (TUNE_SEED, not a final seed),
          TUNE_EPOCHS epochs, so every method gets the same budget. The value with the best
          validation accuracy is chosen (ties: the first in the grid); the test error is never
          read here. A run that fails (center loss can diverge) is never chosen.
  final   vanilla and each method at its chosen strength: seeds 0..4, 100 epochs.
  sweep   MLP-4 only: NSR test error against λ on a log grid 0.01..30 and against K in {1, 5, 20}
          at the chosen λ, seeds 0..2 (the point at the chosen λ and K=5 is the final NSR runs).

A finished run is skipped and an interrupted one resumed, so the same command continues where
it stopped. Writes OUT/chosen.json, OUT/tune/tuning.md, OUT/final/{table.md,summary.json,
curves.png}, OUT/sweep/{sensitivity.md,sensitivity.json,sensitivity.png} and OUT/report.md.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nsr.train.errors import ArgumentParser, RunInterrupted, UserError, run_cli
from nsr.train.fileio import write_atomic, write_json

from . import report, reproduce, stats
from .figures import pyplot, save_png
from .runner import Variant, print_failures, run_all

MODELS = ("mlp4", "mlp10")
TUNE_SEED, TUNE_EPOCHS = 100, 30
FINAL_SEEDS, SWEEP_SEEDS = 5, 3
SWEEP_LAMBDAS = (0.01, 0.1, 0.3, 1, 3, 10, 30)
SWEEP_QUEUES = (1, 5, 20)
DEFAULT_QUEUE = 5  # the configs' queue_batches


@dataclass(frozen=True)
class Method:
    name: str                    # folder and table row
    label: str
    prefix: tuple[str, ...]      # training flags; the strength is the value of the last one
    grid: tuple[float, ...]
    nsr: bool = True             # an NSR-based variant (--regularizer nsr first; the prefix may change it)

    def variant(self, value: float, name: str | None = None) -> Variant:
        return Variant(name or f"{self.name}_{value:g}", (*self.prefix, f"{value:g}"), self.nsr)


# Center loss sums over the D neurons where NSR averages (nsr/center_loss.py): on the 10 logits
# its λ weighs ~5x more, so its grid sits a decade below NSR's.
METHODS = (
    Method("nsr", "NSR (λ)", ("--regularizer", "nsr", "--lambda"), (0.1, 0.3, 1, 3, 10)),
    Method("center", "Center loss (λ, α=0.5)", ("--regularizer", "center", "--center-alpha", "0.5",
                                                "--lambda"), (0.01, 0.03, 0.1, 0.3, 1)),
    Method("label_smoothing", "Label smoothing (ε)", ("--label-smoothing",), (0.03, 0.05, 0.1, 0.2, 0.3),
           nsr=False),
    Method("dropout", "Dropout (p)", ("--dropout",), (0.05, 0.1, 0.2, 0.3, 0.5), nsr=False),
)
VANILLA = Variant("vanilla", nsr=False)


def stage_runs(args, stage: str, model: str, variants, seeds: int, first_seed: int, epochs: int):
    """python -m nsr reproduce's plan for one model: its runs, commands and states."""
    argv = ["--models", model, "--seeds", str(seeds), "--first-seed", str(first_seed),
            "--out", str(args.out / stage), "--epochs", str(epochs), "--dataset", args.dataset]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    return reproduce.plan(reproduce.parse_args(argv), variants)


def train(runs, args, stage: str) -> list[str]:
    todo = sum(r.state != "finished" for r in runs)
    print(f"\n== {stage}: {len(runs)} runs, {len(runs) - todo} finished, {todo} to train", flush=True)
    if not todo:
        return []
    start = time.monotonic()
    try:
        failures = run_all(runs, args.out / stage / "logs", args.jobs)
    except KeyboardInterrupt:
        raise RunInterrupted("interrupted; finished runs are kept, rerun the same command to continue") from None
    print(f"== {stage}: {todo} runs trained in {(time.monotonic() - start) / 60:.1f} min "
          f"({args.jobs} at a time)", flush=True)
    return failures


def metrics_of(folder: Path) -> dict | None:
    """A finished run's metrics.json, else None."""
    metrics = report.read_metrics(folder)
    return metrics if metrics and metrics.get("finished") is True else None


# ------------------------------------------------------------------------------------- tune

def tune(args) -> dict:
    """{model: {method: chosen value}}, and OUT/tune/tuning.md with every grid point."""
    runs = [r for model in args.models
            for r in stage_runs(args, "tune", model, [m.variant(v) for m in args.methods for v in m.grid],
                                1, TUNE_SEED, args.tune_epochs)]
    train(runs, args, "tune")
    chosen, lines = {}, [f"Validation accuracy (%) after {args.tune_epochs} epochs, seed {TUNE_SEED}; "
                         "* the chosen value (the best; ties: the first).\n"]
    for model in args.models:
        chosen[model] = {}
        lines.append(f"\n{report.display_name(model)}\n")
        for m in args.methods:
            scores = {}
            for v in m.grid:
                metrics = metrics_of(report.run_dir(args.out / "tune", model, m.variant(v).name, TUNE_SEED))
                scores[v] = metrics["best_val_acc"] if metrics else None
            done = {v: s for v, s in scores.items() if s is not None and math.isfinite(s)}
            if len(done) < len(scores):
                missing = [f"{v:g}" for v in scores if v not in done]
                print(f"warning: {model} {m.name}: no finished tuning run for {', '.join(missing)} "
                      "(failed or diverged); chosen among the others", file=sys.stderr)
            if not done:
                raise UserError(f"{model} {m.name}: every tuning run failed; see {args.out / 'tune' / 'logs'}")
            best = max(done, key=lambda v: (done[v], -m.grid.index(v)))
            chosen[model][m.name] = best
            cells = [f"{v:g}: " + ("failed" if s is None else f"{s:.2f}") + ("*" if v == best else "")
                     for v, s in scores.items()]
            lines.append(f"- {m.label}: " + ", ".join(cells) + "\n")
    write_atomic(args.out / "tune" / "tuning.md", "".join(lines))
    write_json(args.out / "chosen.json", {"tune_epochs": args.tune_epochs, "tune_seed": TUNE_SEED,
                                          "chosen": chosen})
    print("".join(lines), end="")
    return chosen


# ------------------------------------------------------------------------------------ final

def final_variants(chosen_for_model: dict, methods) -> list[Variant]:
    return [VANILLA, *(m.variant(chosen_for_model[m.name], name=m.name) for m in methods)]


def final(args, chosen: dict) -> tuple[str, list[str]]:
    runs = [r for model in args.models
            for r in stage_runs(args, "final", model, final_variants(chosen[model], args.methods),
                                args.seeds, 0, args.epochs)]
    failures = train(runs, args, "final")
    names = [v.name for v in final_variants(chosen[args.models[0]], args.methods)]
    report.write_report(args.out / "final", args.models, names, list(range(args.seeds)))
    return final_table(args, chosen, names), failures


def final_table(args, chosen: dict, names: list[str]) -> str:
    """Per model: each method's chosen strength, test error, gain and paired-t p against vanilla
    and against NSR, and its mean time per run."""
    results = report.collect(args.out / "final", args.models, names, list(range(args.seeds)), warn=lambda _: None)
    head = ["Method", "strength", "test error %", "gain vs vanilla", "p vs vanilla", "p vs NSR", "min/run"]
    out = []
    for model in args.models:
        errors = {v: report.errors_by_seed(runs) for v, runs in results[model].items()}
        rows = [head]
        for name in names:
            s = stats.describe(errors[name])
            vs_vanilla = stats.versus(errors["vanilla"], errors[name]) if name != "vanilla" else None
            vs_nsr = stats.versus(errors["nsr"], errors[name]) if "nsr" in errors and name != "nsr" else None
            times = [(m.get("train_time_s") or 0) + (m.get("eval_time_s") or 0)
                     for m in results[model][name].values()]
            rows.append([
                report.LABELS.get(name, name),
                "-" if name == "vanilla" else f"{chosen[model][name]:g}",
                stats.format_mean_std(s["mean"], s["std"]) + (f" (n={s['n']})" if s["n"] != args.seeds else ""),
                stats.format_gain(vs_vanilla["gain"]) if vs_vanilla else "-",
                stats.format_pvalue(vs_vanilla["p"]) if vs_vanilla else "-",
                stats.format_pvalue(vs_nsr["p"]) if vs_nsr else "-",
                f"{sum(times) / len(times) / 60:.1f}" if times else "-"])
        out.append(f"### {report.display_name(model)}\n\n" + stats.table_markdown(rows))
    md = "\n".join(out)
    write_atomic(args.out / "final" / "comparison.md", md)
    return md


# ------------------------------------------------------------------------------------ sweep

def sweep_points(best_lambda: float) -> list[tuple[str, float, int, Variant | None]]:
    """(axis, λ, K, variant to train or None for the final NSR runs) of MLP-4's sensitivity grid."""
    nsr = next(m for m in METHODS if m.name == "nsr")
    points = [("lambda", lam, DEFAULT_QUEUE, None if lam == best_lambda else nsr.variant(lam))
              for lam in SWEEP_LAMBDAS]
    for k in SWEEP_QUEUES:
        name = f"nsr_{best_lambda:g}_k{k}"
        variant = Variant(name, (*nsr.prefix, f"{best_lambda:g}", "--queue-batches", str(k)))
        points.append(("queue", best_lambda, k, None if k == DEFAULT_QUEUE else variant))
    return points


def sweep(args, chosen: dict) -> tuple[str, list[str]]:
    best = chosen["mlp4"]["nsr"]
    points = sweep_points(best)
    variants = list(dict.fromkeys(v for *_, v in points if v is not None))
    failures = train(stage_runs(args, "sweep", "mlp4", variants, args.sweep_seeds, 0, args.epochs), args, "sweep")
    seeds = range(args.sweep_seeds)
    vanilla = [m["test_error"] for s in seeds
               if (m := metrics_of(report.run_dir(args.out / "final", "mlp4", "vanilla", s)))]
    rows = []
    for axis, lam, k, variant in points:
        where = (args.out / "sweep", variant.name) if variant else (args.out / "final", "nsr")
        errs = [m["test_error"] for s in seeds if (m := metrics_of(report.run_dir(where[0], "mlp4", where[1], s)))]
        mean, std = stats.mean_std(errs) if errs else (math.nan, math.nan)
        rows.append({"axis": axis, "lambda": lam, "queue_batches": k, "n": len(errs),
                     "test_error_mean": mean, "test_error_std": std})
    base = stats.mean_std(vanilla) if vanilla else (math.nan, math.nan)
    data = {"dataset": args.dataset, "seeds": list(seeds), "chosen_lambda": best,
            "vanilla": {"n": len(vanilla), "mean": base[0], "std": base[1]}, "points": rows}
    write_json(args.out / "sweep" / "sensitivity.json", data)
    plot_sensitivity(args.out / "sweep" / "sensitivity.png", data)
    table = [["axis", "λ", "K", "test error % (MLP-4)", "seeds"]]
    table += [[r["axis"], f"{r['lambda']:g}", str(r["queue_batches"]),
               stats.format_mean_std(r["test_error_mean"], r["test_error_std"]), str(r["n"])] for r in rows]
    table.append(["vanilla", "-", "-", stats.format_mean_std(*base), str(len(vanilla))])
    md = stats.table_markdown(table)
    write_atomic(args.out / "sweep" / "sensitivity.md", md)
    return md, failures


def plot_sensitivity(path: Path, data: dict) -> None:
    """Test error against λ (log axis) and against K, mean ± std over seeds, vanilla as a band."""
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 3.8))
    van = data["vanilla"]
    for ax, axis, key, xlabel in ((axes[0], "lambda", "lambda", "λ (K = 5)"),
                                  (axes[1], "queue", "queue_batches", f"K (λ = {data['chosen_lambda']:g})")):
        pts = [r for r in data["points"] if r["axis"] == axis and r["n"]]
        x = [r[key] for r in pts]
        y = [r["test_error_mean"] for r in pts]
        e = [r["test_error_std"] or 0.0 for r in pts]
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=f"NSR (n={len(data['seeds'])} seeds)")
        if van["n"]:
            ax.axhline(van["mean"], color="gray", linestyle="--", label=f"vanilla (n={van['n']})")
            if van["std"] is not None:
                ax.axhspan(van["mean"] - van["std"], van["mean"] + van["std"], color="gray", alpha=0.15)
        ax.set(xscale="log", xlabel=xlabel, ylabel="test error (%)", title=f"MLP-4, {data['dataset']}")
        if axis == "queue":
            ax.set_xticks(x, [str(v) for v in x])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


# ------------------------------------------------------------------------------ command line

def parse_args(argv=None):
    p = ArgumentParser(prog="python -m nsr compare", description="NSR against center loss, label "
                       "smoothing and dropout at an equal tuning budget, and NSR's sensitivity to λ and K.")
    p.add_argument("--out", required=True, type=report.path_arg, help="output folder")
    p.add_argument("--data-dir", type=report.nonempty, help="folder of the data set's files")
    p.add_argument("--dataset", default="fashion-mnist", type=report.nonempty, help="default fashion-mnist")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (default 1)")
    p.add_argument("--stages", nargs="+", choices=("final", "sweep"), default=["final", "sweep"],
                   help="stages after tuning, which always runs first (default both)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--methods", nargs="+", choices=[m.name for m in METHODS], default=[m.name for m in METHODS],
                   help="methods besides vanilla (default all; nsr is needed by the sweep and the p vs NSR column)")
    # Scale knobs for a quick trial of the pipeline; the published results use the defaults.
    p.add_argument("--epochs", type=int, default=100, help="epochs of the final and sweep runs (default 100)")
    p.add_argument("--tune-epochs", type=int, default=TUNE_EPOCHS, help=f"default {TUNE_EPOCHS}")
    p.add_argument("--seeds", type=int, default=FINAL_SEEDS, help=f"final seeds (default {FINAL_SEEDS})")
    p.add_argument("--sweep-seeds", type=int, default=SWEEP_SEEDS, help=f"default {SWEEP_SEEDS}")
    args = p.parse_args(argv)
    for key in ("jobs", "epochs", "tune_epochs", "seeds", "sweep_seeds"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if "sweep" in args.stages and ("mlp4" not in args.models or "nsr" not in args.methods):
        raise UserError("the sweep stage is NSR on MLP-4: keep mlp4 in --models and nsr in --methods, "
                        "or leave sweep out of --stages")
    if args.sweep_seeds > args.seeds and "sweep" in args.stages:
        raise UserError(f"--sweep-seeds ({args.sweep_seeds}) must not exceed --seeds ({args.seeds}): the "
                        "sweep reuses the final NSR runs for its chosen point")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UserError(f"--data-dir {args.data_dir} is not a folder; give the folder of the data set's files")
    report.check_writable(args.out, "--out")
    args.models = list(dict.fromkeys(args.models))
    args.methods = [m for m in METHODS if m.name in args.methods]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = tune(args)
    failures, parts = [], []
    if "final" in args.stages:
        md, failed = final(args, chosen)
        failures += failed
        parts.append(f"## Each method at its chosen strength ({args.seeds} seeds, {args.epochs} epochs)\n\n{md}")
    if "sweep" in args.stages:
        md, failed = sweep(args, chosen)
        failures += failed
        parts.append(f"## MLP-4: NSR's sensitivity to λ and K ({args.sweep_seeds} seeds)\n\n{md}")
    tuning = (args.out / "tune" / "tuning.md").read_text()
    text = "## Tuning (the same grid size, seed and epochs for every method)\n\n" + tuning + "\n" + "\n".join(parts)
    write_atomic(args.out / "report.md", text)
    print("\n" + "\n".join(parts) + f"\nwrote {args.out / 'report.md'}")
    return print_failures(failures)


if __name__ == "__main__":
    run_cli(main)
