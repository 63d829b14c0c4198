"""Reproduce the paper's results table: vanilla vs NSR over several seeds, one column per model.

    python -m nsr.reproduce --models mlp3 mlp4 mlp6 mlp8 mlp10 --seeds 5 \\
        --dataset fashion-mnist --data-dir data --out runs/table

Each run is a subprocess of the training scripts at the repository root:
    MLPs (mlp3 ... mlp10)              fdnn_vanilla.py / fdnn_nsr.py --config configs/<model>.yaml
    CNNs (resnet18_cifar10, vgg19_...) cnn_nsr.py --config configs/<model>.yaml [--no-nsr]
into OUT/<model>/<vanilla|nsr>/seed<S>/, with its stdout/stderr in OUT/logs/.

A run whose metrics.json says `finished` is skipped; one with a last.pt is resumed (--resume);
anything else left in its folder is replaced (--overwrite). A failed run is reported with the
tail of its stderr and the others go on; the exit status is 1 if any run failed.

Then OUT/table.md and OUT/table.csv (the paper's layout: Vanilla, Vanilla + NSR, Gain, p-value;
cells "test error % ± sample std over seeds"; p from a two-sided paired t-test over seeds),
OUT/summary.json (the numbers behind it, per seed) and OUT/curves.png (validation accuracy per
epoch, mean ± std band over seeds, one panel per model). `--table-only` only rebuilds those.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import stats

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("vanilla", "nsr")
DISPLAY_NAMES = {
    "mlp3": "MLP-3", "mlp4": "MLP-4", "mlp6": "MLP-6", "mlp8": "MLP-8", "mlp10": "MLP-10",
    "resnet18_cifar10": "ResNet-18", "vgg19_cifar10": "VGG-19", "resnet50_imagenet": "ResNet-50",
}
STDERR_TAIL_LINES = 25


def display_name(model: str) -> str:
    if model in DISPLAY_NAMES:
        return DISPLAY_NAMES[model]
    m = re.fullmatch(r"mlp(\d+)", model)
    return f"MLP-{m.group(1)}" if m else model


def is_mlp(model: str) -> bool:
    return re.fullmatch(r"mlp\d+", model) is not None


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ------------------------------------------------------------------------------- run folders

def run_dir(out: Path, model: str, variant: str, seed: int) -> Path:
    return Path(out) / model / variant / f"seed{seed}"


def read_metrics(folder: Path) -> dict | None:
    """metrics.json of a run folder, or None when missing or unreadable (e.g. half-written)."""
    path = Path(folder) / "metrics.json"
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_state(folder: Path) -> str:
    """'finished', 'resumable' (last.pt present), 'stale' (other leftovers) or 'new'."""
    folder = Path(folder)
    metrics = read_metrics(folder)
    if metrics is not None and metrics.get("finished") is True:
        return "finished"
    if (folder / "last.pt").is_file():
        return "resumable"
    if folder.is_dir() and any(folder.iterdir()):
        return "stale"
    return "new"


def load_lambda(path: str) -> list[float]:
    """λ values from a λ-search best.json: {"parameters": {"lambda": 0.5 | [..] | "0.5 0.1"}}."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read lambda file {path}: {e}")
    params = data.get("parameters", data) if isinstance(data, dict) else None
    value = params.get("lambda") if isinstance(params, dict) else None
    if value is None:
        raise SystemExit(f"error: {path} has no parameters.lambda; expected "
                         '{"parameters": {"lambda": ...}}')
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    values = value if isinstance(value, list) else [value]
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise SystemExit(f"error: parameters.lambda in {path} must be a number or a list of numbers, "
                         f"got {value!r}")


def search_params(path: str) -> dict:
    """The other searched parameters of a best.json as config keys (nsr_layer -> nsr_layers)."""
    with open(path) as f:
        params = json.load(f).get("parameters") or {}
    out = {}
    for key, value in params.items():
        if key == "lambda":
            continue
        if key == "nsr_layer":
            key, value = "nsr_layers", [value]
        out[key] = value
    return out


def search_flags(path: str) -> list[str]:
    """Training flags for those parameters (given to the NSR runs only): key k -> --k."""
    flags: list[str] = []
    for key, value in search_params(path).items():
        values = value if isinstance(value, list) else [value]
        flags += ["--" + key.replace("_", "-"), *(str(v) for v in values)]
    return flags


def parse_lambda_sources(specs: list[str] | None, models: list[str]
                         ) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    """--lambda-from FILE (every model) or MODEL=FILE ... -> ({model: [λ, ...]}, {model: flags})."""
    lambdas: dict[str, list[float]] = {}
    flags: dict[str, list[str]] = {}
    for spec in specs or []:
        model, sep, path = spec.partition("=")
        if sep and not os.path.isfile(spec):
            if model not in models:
                raise SystemExit(f"error: --lambda-from {spec}: {model!r} is not one of --models")
            lambdas[model], flags[model] = load_lambda(path), search_flags(path)
        else:
            values, extra = load_lambda(spec), search_flags(spec)
            for m in models:
                if m not in lambdas:
                    lambdas[m], flags[m] = values, extra
    return lambdas, flags


# ------------------------------------------------------------------------------- commands

@dataclass
class Run:
    model: str
    variant: str
    seed: int
    folder: Path
    command: list[str] = field(default_factory=list)
    state: str = "new"
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.model} {self.variant:<7} seed {self.seed}"


def build_command(model: str, variant: str, seed: int, folder: Path, args,
                  lambdas: dict[str, list[float]], repo: Path,
                  nsr_flags: dict[str, list[str]] | None = None) -> list[str]:
    config = repo / "configs" / f"{model}.yaml"
    if is_mlp(model):
        script = "fdnn_nsr.py" if variant == "nsr" else "fdnn_vanilla.py"
        cmd = [args.python, str(repo / script), "--config", str(config)]
    else:
        cmd = [args.python, str(repo / "cnn_nsr.py"), "--config", str(config)]
        if variant == "vanilla":
            cmd.append("--no-nsr")
    cmd += ["--seed", str(seed), "--out", str(folder), "--quiet"]
    if args.dataset:
        cmd += ["--dataset", args.dataset]
    if args.data_dir:
        cmd += ["--data-dir", str(args.data_dir)]
    if args.epochs is not None:
        cmd += ["--epochs", str(args.epochs)]
    if variant == "nsr" and model in lambdas:
        cmd += ["--lambda", *(repr(v) for v in lambdas[model])]
    if variant == "nsr" and nsr_flags and model in nsr_flags:
        cmd += nsr_flags[model]
    cmd += shlex.split(args.extra or "")
    return cmd


def read_run_config(folder: Path) -> dict:
    """The run's config.yaml (the settings it was started with), or {} when missing/unreadable."""
    try:
        import yaml
        with open(Path(folder) / "config.yaml") as f:
            data = yaml.safe_load(f)
    except (OSError, ValueError, ImportError):
        return {}
    except Exception:  # noqa: BLE001 - a damaged YAML file is treated as missing
        return {}
    return data if isinstance(data, dict) else {}


def settings_mismatch(folder: Path, variant: str, model: str, args,
                      lambdas: dict[str, list[float]]) -> str:
    """Why a finished run does not match what was asked for ('' when it does).

    Compares the run's config.yaml (falling back to metrics.json) with the explicitly requested
    --epochs, --dataset and λ; settings not given on this command line are not checked.
    """
    saved = {**(read_metrics(folder) or {}), **read_run_config(folder)}
    reasons = []
    if args.epochs is not None and saved.get("epochs") not in (None, args.epochs):
        reasons.append(f"epochs {saved.get('epochs')} != {args.epochs}")
    if args.dataset and saved.get("dataset") not in (None, args.dataset):
        reasons.append(f"dataset {saved.get('dataset')} != {args.dataset}")
    if variant == "nsr" and model in lambdas and saved.get("lambda") is not None:
        have = saved["lambda"] if isinstance(saved["lambda"], list) else [saved["lambda"]]
        want = lambdas[model]
        try:
            if len(want) == 1 and len(have) > 1:  # one λ given for several layers
                want = want * len(have)
            same = len(have) == len(want) and all(
                math.isclose(float(h), w, rel_tol=1e-9, abs_tol=1e-12) for h, w in zip(have, want))
        except (TypeError, ValueError):
            same = False
        if not same:
            reasons.append(f"lambda {have} != {want}")
    return "; ".join(reasons)


def plan_runs(args, lambdas, repo: Path, nsr_flags: dict[str, list[str]] | None = None) -> list[Run]:
    runs = []
    for model in args.models:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for variant in VARIANTS:
                folder = run_dir(args.out, model, variant, seed)
                run = Run(model, variant, seed, folder)
                run.command = build_command(model, variant, seed, folder, args, lambdas, repo, nsr_flags)
                run.state = run_state(folder)
                if run.state == "finished":
                    why = settings_mismatch(folder, variant, model, args, lambdas)
                    if why:
                        run.state, run.note = "changed", why
                if run.state == "resumable":
                    run.command.append("--resume")
                elif run.state in ("stale", "changed"):
                    run.command.append("--overwrite")
                runs.append(run)
    return runs


# ------------------------------------------------------------------------------- running

def _tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


class Progress:
    """Thread-safe progress lines: [done/total], elapsed, ETA from the mean time of trained runs."""

    def __init__(self, total: int, to_train: int, stream=None, jobs: int = 1):
        self.total, self.to_train, self.jobs = total, to_train, max(1, jobs)
        self.done = self.trained = 0
        self.train_time = 0.0
        self.start = time.monotonic()
        self.lock = threading.Lock()
        self.stream = stream or sys.stdout

    def line(self, text: str, finished_run: bool = False, duration: float | None = None,
             trained: bool = False) -> None:
        with self.lock:
            if finished_run:
                self.done += 1
            if trained:
                self.trained += 1
                self.train_time += duration or 0.0
            elapsed = time.monotonic() - self.start
            eta = ""
            if self.trained and self.to_train > self.trained:
                left = self.train_time / self.trained * (self.to_train - self.trained) / self.jobs
                eta = f", ETA {_hms(left)}"
            print(f"[{self.done}/{self.total} {_hms(elapsed)}{eta}] {text}", file=self.stream,
                  flush=True)


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def execute(run: Run, log_dir: Path, progress: Progress, env: dict,
            cwd: Path | None = None) -> tuple[bool, str]:
    """Train one run as a subprocess; (ok, message). cwd None: this process's working folder,
    so relative paths in configs (data_dir: ./data) mean what they mean when running a script."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{run.model}-{run.variant}-seed{run.seed}"
    out_log, err_log = log_dir / f"{stem}.stdout.log", log_dir / f"{stem}.stderr.log"
    how = {"resumable": "resuming", "stale": "restarting", "changed": f"re-training ({run.note})"}
    progress.line(f"{run.label}: {how.get(run.state, 'training')}")
    run.folder.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(out_log, "w") as fo, open(err_log, "w") as fe:
        fo.write("$ " + shlex.join(run.command) + "\n")
        fo.flush()
        try:
            rc = subprocess.call(run.command, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                                 cwd=None if cwd is None else str(cwd), env=env)
        except OSError as e:
            rc = -1
            fe.write(f"{e}\n")
    duration = time.monotonic() - t0
    metrics = read_metrics(run.folder)
    if rc == 0 and metrics is not None and metrics.get("finished") is True:
        err = metrics.get("test_error")
        msg = f"{run.label}: done in {_hms(duration)}" + (
            f", test error {err:.2f}%" if isinstance(err, (int, float)) else "")
        progress.line(msg, finished_run=True, duration=duration, trained=True)
        return True, msg
    why = f"exit code {rc}" if rc != 0 else "exited 0 but metrics.json is not marked finished"
    tail = _tail(err_log) or _tail(out_log)
    progress.line(f"{run.label}: FAILED ({why}) after {_hms(duration)}; command: "
                  f"{shlex.join(run.command)}\n  log: {err_log}\n" +
                  "\n".join("  | " + line for line in tail.splitlines()),
                  finished_run=True, duration=duration, trained=True)
    last = tail.splitlines()[-1] if tail else ""
    return False, f"{run.label}: {why}: {last}\n    log: {err_log}"


def run_all(runs: list[Run], out: Path, jobs: int, cwd: Path | None = None,
            fail_fast: bool = False) -> list[str]:
    """Run everything not finished; returns one message per failed run.

    fail_fast: after the first failure, start no further run (runs in flight finish)."""
    pending = [r for r in runs if r.state != "finished"]
    progress = Progress(len(runs), len(pending), jobs=min(jobs, max(1, len(pending))))
    for r in runs:
        if r.state == "finished":
            progress.line(f"{r.label}: skipped (finished)", finished_run=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    failures: list[str] = []
    stop = threading.Event()
    log_dir = Path(out) / "logs"

    def one(r: Run):
        if stop.is_set():
            progress.line(f"{r.label}: not started (--fail-fast)", finished_run=True)
            return True, ""
        ok, msg = execute(r, log_dir, progress, env, cwd)
        if not ok and fail_fast:
            stop.set()
        return ok, msg

    if jobs <= 1:
        results = map(one, pending)
    else:
        pool = ThreadPoolExecutor(max_workers=jobs)
        results = pool.map(one, pending)
    try:
        for ok, msg in results:
            if not ok:
                failures.append(msg)
    finally:
        if jobs > 1:
            pool.shutdown(wait=True, cancel_futures=True)
    return failures


# ------------------------------------------------------------------------------- results

def discover_models(out: Path) -> list[str]:
    out = Path(out)
    if not out.is_dir():
        return []
    found = [p.name for p in out.iterdir()
             if p.is_dir() and any((p / v).is_dir() for v in VARIANTS)]
    return sorted(found, key=_natural_key)


def collect(out: Path, models: list[str], seeds: list[int] | None = None) -> dict:
    """{model: {variant: {seed: metrics}}} of finished runs (all seed folders when seeds is None)."""
    results: dict = {}
    for model in models:
        results[model] = {}
        for variant in VARIANTS:
            runs = {}
            vdir = Path(out) / model / variant
            folders = (sorted(vdir.glob("seed*"), key=lambda p: _natural_key(p.name))
                       if seeds is None else [vdir / f"seed{s}" for s in seeds])
            for folder in folders:
                m = re.fullmatch(r"seed(-?\d+)", folder.name)
                metrics = read_metrics(folder)
                if m and metrics is not None and metrics.get("finished") is True:
                    runs[int(m.group(1))] = metrics
            results[model][variant] = runs
    return results


def _errors(runs: dict) -> dict[int, float]:
    out = {}
    for seed, metrics in runs.items():
        err = metrics.get("test_error")
        if isinstance(err, (int, float)):
            out[seed] = float(err)
    return out


def summaries(results: dict) -> dict:
    return {model: stats.summarize(_errors(by_variant.get("vanilla", {})),
                                   _errors(by_variant.get("nsr", {})))
            for model, by_variant in results.items()}


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_tables(out: Path, results: dict) -> str:
    """table.md, table.csv, summary.json; returns the Markdown table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summ = summaries(results)
    columns = {display_name(m): s for m, s in summ.items()}
    rows = stats.results_table(columns)
    md = stats.table_markdown(rows)
    seeds_note = ", ".join(
        f"{display_name(m)}: {s['vanilla_n']} vanilla / {s['nsr_n']} NSR seeds" for m, s in summ.items())
    header = ("Test error (%) as mean ± sample std over seeds; Gain = relative error reduction of "
              "the means; p-value: two-sided paired t-test over seeds (n/a: fewer than 2 pairs or "
              "constant differences).\n\n")
    (out / "table.md").write_text(header + md + f"\nSeeds: {seeds_note}.\n")
    (out / "table.csv").write_text(stats.table_csv(rows), encoding="utf-8")
    detail = {}
    for model, by_variant in results.items():
        detail[model] = {
            "summary": summ[model],
            **{variant: {str(seed): {k: m.get(k) for k in
                                     ("test_error", "test_acc", "best_epoch", "best_val_acc",
                                      "epochs", "lambda", "train_time_s", "num_params")}
                         for seed, m in sorted(runs.items())}
               for variant, runs in by_variant.items()},
        }
    (out / "summary.json").write_text(json.dumps(_json_safe(detail), indent=2) + "\n")
    return md


def _curve_stats(histories: list[list[float]]):
    """Epoch-wise mean and std over runs of possibly different lengths (NaN-padded)."""
    import numpy as np
    length = max(len(h) for h in histories)
    arr = np.full((len(histories), length), np.nan)
    for i, h in enumerate(histories):
        arr[i, :len(h)] = h
    count = (~np.isnan(arr)).sum(axis=0)
    mean = np.nanmean(arr, axis=0)
    std = np.zeros(length)
    multi = count > 1
    if multi.any():
        std[multi] = np.nanstd(arr[:, multi], axis=0, ddof=1)
    return np.arange(1, length + 1), mean, std


def write_curves(out: Path, results: dict, key: str = "val_acc") -> Path | None:
    """curves.png: validation accuracy per epoch, vanilla vs NSR, mean ± std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    models = list(results)
    if not models:
        return None
    ncols = min(len(models), 3)
    nrows = -(-len(models) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    colors = {"vanilla": "tab:blue", "nsr": "tab:red"}
    labels = {"vanilla": "Vanilla", "nsr": "Vanilla + NSR"}
    for ax, model in zip(axes.flat, models):
        drawn = False
        for variant in VARIANTS:
            histories = []
            for metrics in results[model].get(variant, {}).values():
                hist = [e.get(key) for e in metrics.get("history") or [] if isinstance(e, dict)]
                hist = [float(v) if isinstance(v, (int, float)) else math.nan for v in hist]
                if hist:
                    histories.append(hist)
            if not histories:
                continue
            x, mean, std = _curve_stats(histories)
            ax.plot(x, mean, color=colors[variant], label=f"{labels[variant]} (n={len(histories)})",
                    marker="o" if len(x) <= 10 else None, markersize=3)
            ax.fill_between(x, mean - std, mean + std, color=colors[variant], alpha=0.2, linewidth=0)
            drawn = True
        ax.set_title(display_name(model))
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8, loc="lower right")
        else:
            ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    fig.suptitle("Validation accuracy: mean ± std over seeds")
    fig.tight_layout()
    path = Path(out) / "curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_outputs(out: Path, models: list[str], seeds: list[int] | None) -> str:
    results = collect(out, models, seeds)
    md = write_tables(out, results)
    write_curves(out, results)
    return md


# ------------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m nsr.reproduce",
        description="Train vanilla and NSR models over several seeds and build the paper's table.")
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   help="config names under configs/: mlp3 mlp4 mlp6 mlp8 mlp10 resnet18_cifar10 "
                        "vgg19_cifar10 (with --table-only: default every model found in --out)")
    p.add_argument("--seeds", type=int, default=5, help="seeds per model and variant (default 5)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST..FIRST+SEEDS-1 (default 0)")
    p.add_argument("--dataset", help="override the configs' data set (e.g. fashion-mnist, digits)")
    p.add_argument("--data-dir", help="passed to every run")
    p.add_argument("--out", required=True, type=Path, help="output folder (runs, logs, tables)")
    p.add_argument("--epochs", type=int, help="override the configs' epochs")
    p.add_argument("--lambda-from", nargs="+", metavar="[MODEL=]FILE",
                   help="λ for NSR runs from a λ-search best.json ({\"parameters\": {\"lambda\": ...}}); "
                        "FILE applies to every model, MODEL=FILE to one (default: the configs' λ). "
                        "Other searched parameters (nsr_layer, queue_batches) go to the NSR runs too")
    p.add_argument("--extra", default="",
                   help='extra flags for every run, e.g. "--max-steps 50" (finished runs are not '
                        're-trained when only these change: use another --out)')
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (default 1)")
    p.add_argument("--fail-fast", action="store_true", help="start no new run after a failure")
    p.add_argument("--table-only", action="store_true", help="only rebuild table and curves")
    p.add_argument("--dry-run", action="store_true", help="print what would run, train nothing")
    p.add_argument("--python", default=sys.executable, help=argparse.SUPPRESS)
    p.add_argument("--repo", type=Path, default=REPO, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if not args.models and not args.table_only:
        p.error("--models is required (except with --table-only)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    repo = Path(args.repo).resolve()
    if args.table_only:
        models = args.models or discover_models(args.out)
        if not models:
            print(f"error: no runs found in {args.out}", file=sys.stderr)
            return 1
        # With --table-only every seed folder found counts, unless --models narrows the columns.
        md = build_outputs(args.out, models, None)
        print(md, end="")
        print(f"wrote {args.out / 'table.md'}, table.csv, summary.json, curves.png")
        return 0

    missing = [m for m in args.models if not (repo / "configs" / f"{m}.yaml").is_file()]
    if missing:
        have = sorted((p.stem for p in (repo / "configs").glob("*.yaml")), key=_natural_key)
        print(f"error: no config for {', '.join(missing)} in {repo / 'configs'}; "
              f"available: {', '.join(have) or 'none'}", file=sys.stderr)
        return 2
    lambdas, nsr_flags = parse_lambda_sources(args.lambda_from, args.models)
    runs = plan_runs(args, lambdas, repo, nsr_flags)
    if args.dry_run:
        for r in runs:
            print(f"{r.label}: {r.state}" + (f" ({r.note})" if r.note else "") +
                  ("" if r.state == "finished" else f"\n  $ {shlex.join(r.command)}"))
        return 0
    todo = sum(r.state != "finished" for r in runs)
    print(f"{len(runs)} runs ({len(args.models)} models x {args.seeds} seeds x 2 variants): "
          f"{len(runs) - todo} finished, {todo} to train -> {args.out}", flush=True)
    try:
        failures = run_all(runs, args.out, args.jobs, fail_fast=args.fail_fast)
    except KeyboardInterrupt:
        print("interrupted; finished runs are kept, rerun the same command to continue",
              file=sys.stderr)
        return 130
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    md = build_outputs(args.out, args.models, seeds)
    print()
    print(md, end="")
    print(f"wrote {args.out / 'table.md'}, table.csv, summary.json, curves.png")
    if failures:
        print(f"\n{len(failures)} of {len(runs)} runs failed (details above):", file=sys.stderr)
        for msg in failures:
            print(msg, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
