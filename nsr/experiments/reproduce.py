"""Reproduce the paper's results table: every model x variant x seed as one training run.

    python -m nsr reproduce --models mlp3 mlp4 mlp6 mlp8 mlp10 --seeds 5 \\
        --dataset fashion-mnist --data-dir data --out runs/table

Three steps:
  plan    one Run per model, variant and seed: its folder OUT/<model>/<variant>/seed<S>/ and
          its command, a subprocess of the training scripts at the repository root
          (fdnn_nsr.py for MLPs, cnn_nsr.py for CNNs) with --config configs/<model>.yaml and
          the variant's flags. Each command is parsed as the script will parse it, so a bad
          flag fails here, before anything runs. A finished run is skipped, an interrupted
          one (last.pt) resumed, other leftovers replaced (--overwrite); a run folder whose
          saved settings (its last.pt's, else config.yaml) differ from what the command would
          train is refused.
  run     the runs not finished, --jobs at a time, stdout/stderr in OUT/logs/. A failed run
          is reported with the tail of its stderr and the others go on; exit status 1.
  report  python -m nsr report: OUT/table.md, table.csv, summary.json, curves.png
          (`python -m nsr report OUT` rebuilds them; so does --table-only).

A variant is a name (its folder, its row in the table) and the flags that make it: VARIANTS.
A baseline or a sensitivity-sweep point is one more entry, for example
    Variant("nsr_lam1_k10", ("--lambda", "1", "--queue-batches", "10"))
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path

from models import is_mlp
from nsr.train.checkpoint import EXECUTION_KEYS, load_checkpoint
from nsr.train.config import REGULARIZER_KEYS, to_dict, unused_settings
from nsr.train.config import parse_args as parse_config
from nsr.train.errors import (
    ArgumentParser,
    RunInterrupted,
    UserError,
    one_line,
    run_cli,
)

from . import report
from .runner import Run, Variant, print_failures, run_all

REPO = Path(__file__).resolve().parents[2]  # nsr/experiments/ -> the repository


VARIANTS = (Variant("vanilla", nsr=False), Variant("nsr"))

# Flags python -m nsr reproduce sets itself, per run.
RESERVED_FLAGS = {"--config", "--out", "--seed", "--resume", "--overwrite", "--regularizer"}
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")




# ------------------------------------------------------------------------------- planning

def search_result_flags(path: str) -> list[str]:
    """Training flags from a λ-search best.json: {"parameters": {"lambda": 0.5 | [..] | "0.5 0.1",
    "regularized_layer": "fc3", "queue_batches": 10, ...}} -> --lambda 0.5 --regularized-layers fc3 ..."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--lambda-from {path}: cannot read it as JSON ({one_line(e)})") from None
    params = data.get("parameters", data) if isinstance(data, dict) else None
    if not isinstance(params, dict) or params.get("lambda") is None:
        raise UserError(f"--lambda-from {path}: no parameters.lambda (expected a best.json of "
                        "python -m nsr search: {\"parameters\": {\"lambda\": ...}})")
    flags: list[str] = []
    for key, value in params.items():
        if key == "lambda" and isinstance(value, str):
            value = value.replace(",", " ").split()
        values = value if isinstance(value, list) else [value]
        if key == "lambda" and not all(_is_weight(v) for v in values):
            raise UserError(f"--lambda-from {path}: parameters.lambda must be numbers >= 0, got {value!r}")
        if not values or any(isinstance(v, (dict, list)) for v in values):
            raise UserError(f"--lambda-from {path}: parameters.{key} must be a value or a list of "
                            f"values, got {value!r}")
        flag = "--regularized-layers" if key == "regularized_layer" else "--" + key.replace("_", "-")
        flags += [flag, *(repr(float(v)) if key == "lambda" else str(v) for v in values)]
    return flags


def _is_weight(value) -> bool:
    try:
        return not isinstance(value, bool) and math.isfinite(float(value)) and float(value) >= 0
    except (TypeError, ValueError):
        return False


def searched_flags(specs: list[str] | None, models: list[str]) -> dict[str, list[str]]:
    """--lambda-from FILE (every model) or MODEL=FILE (one model) -> {model: flags}."""
    flags: dict[str, list[str]] = {}
    everyone: list[str] | None = None
    for spec in specs or []:
        model, sep, path = spec.partition("=")
        if sep and not os.path.isfile(spec):
            if model not in models:
                raise UserError(f"--lambda-from {spec}: {model!r} is not one of --models "
                                f"({', '.join(models)})")
            flags[model] = search_result_flags(path)
        else:
            everyone = search_result_flags(spec)
    return {m: flags.get(m, everyone or []) for m in models}


def training_command(args, model: str, variant: Variant, seed: int, searched: list[str]) -> list[str]:
    """The command line of one run (without --resume / --overwrite)."""
    repo = Path(args.repo)
    script = "fdnn_nsr.py" if args.mlp[model] else "cnn_nsr.py"
    cmd = [args.python, str(repo / script), "--config", str(repo / "configs" / f"{model}.yaml"),
           "--seed", str(seed), "--out", str(report.run_dir(args.out, model, variant.name, seed)),
           "--quiet", "--regularizer", "nsr" if variant.nsr else "none"]
    for flag, value in (("--dataset", args.dataset), ("--data-dir", args.data_dir),
                        ("--epochs", args.epochs)):
        if value is not None:
            cmd += [flag, str(value)]
    cmd += (searched if variant.nsr else []) + list(variant.flags)
    return cmd + extra_for(cmd, args.extra)


def extra_for(command: list[str], extra: list[str]) -> list[str]:
    """--extra without the regularizer settings that this run (`command`) does not read: --extra
    goes to every run, and an NSR setting there (--queue-batches 7) is meant for the NSR runs; the
    training scripts refuse a flag that would change nothing."""
    try:
        unused = unused_settings(parse_config(command[2:]))
    except UserError:
        return extra  # the command itself is refused, with its run's name, by wanted_settings
    kept, dropping = [], False
    for token in extra:
        if token.startswith("--"):
            key = token[2:].split("=")[0].removeprefix("no-").replace("-", "_")
            dropping = key in REGULARIZER_KEYS and key in unused
        if not dropping:
            kept.append(token)
    return kept


def wanted_settings(command: list[str], label: str) -> dict:
    """The config the training script will build from `command`, as YAML keys."""
    try:
        return to_dict(parse_config(command[2:]))
    except UserError as e:
        raise UserError(f"{label}: {e}") from None


def differences(saved: dict, wanted: dict) -> list[str]:
    """'key: saved -> wanted' for every experiment setting that differs (settings a run does not
    read are in neither: nsr/train/config.py to_dict leaves them out)."""
    return [f"{key}: {saved[key]!r} -> {value!r}" for key, value in wanted.items()
            if key not in EXECUTION_KEYS and key in saved and not _same(saved[key], value)]


def _same(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def run_settings(folder: Path) -> dict | None:
    """The settings of the run in `folder`: those its last.pt was trained with (config.yaml is a copy
    for people, never trusted over the checkpoint it belongs to), or config.yaml's in a folder
    without a checkpoint; None when it has neither. Damaged: UserError."""
    last = folder / "last.pt"
    if not last.is_file():
        return report.read_settings(folder)
    saved = load_checkpoint(str(last), mmap=True).get("config")  # the tensors are mapped, not read
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint {last} holds no config; move that run folder away and train the run again")
    return saved


def folder_state(folder: Path) -> str:
    """'finished', 'resumable' (last.pt), 'stale' (other leftovers) or 'new'."""
    try:
        finished = (report.read_metrics(folder) or {}).get("finished") is True
    except UserError:
        finished = False  # a damaged metrics.json is rewritten by the run
    if finished:
        return "finished"
    if (folder / "last.pt").is_file():
        return "resumable"
    return "stale" if folder.is_dir() and any(folder.iterdir()) else "new"


def plan(args, variants=VARIANTS) -> list[Run]:
    """Every run, its command and state; UserError when a run folder holds other settings."""
    searched = searched_flags(args.lambda_from, args.models)
    runs, conflicts = [], []
    for model in args.models:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for variant in variants:
                command = training_command(args, model, variant, seed, searched[model])
                folder = report.run_dir(args.out, model, variant.name, seed)
                blocked = next((p for p in (folder, *folder.parents) if p.exists()), folder)
                if not blocked.is_dir():
                    raise UserError(f"{blocked} is a file, where the run folder {folder} belongs")
                run = Run(model, variant, seed, folder, command, folder_state(folder))
                wanted = wanted_settings(command, f"{model} {variant.name}")
                if run.state in ("finished", "resumable"):
                    diff = differences(run_settings(folder) or {}, wanted)
                    if diff:
                        conflicts.append(f"{folder} holds a run with other settings ({', '.join(diff)})")
                run.command += {"resumable": ["--resume"], "stale": ["--overwrite"]}.get(run.state, [])
                runs.append(run)
    if conflicts:
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise UserError(f"{conflicts[0]}{more}; nothing was started: use another --out, or move "
                        "those run folders away to train them again")
    return runs


# ------------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = ArgumentParser(prog="python -m nsr reproduce", description="Train every variant of each "
                       "model over several seeds and build the paper's table.")
    p.add_argument("--models", nargs="+", metavar="MODEL", type=report.nonempty,
                   help="config names under configs/ (mlp3 ... mlp10, resnet18_cifar10, vgg19_cifar10); "
                        "with --table-only: default every model found in --out")
    p.add_argument("--seeds", type=int, default=5, help="seeds per model and variant (default 5)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST..FIRST+SEEDS-1 (default 0)")
    p.add_argument("--dataset", type=report.nonempty, help="override the configs' data set (e.g. digits)")
    p.add_argument("--data-dir", type=report.nonempty, help="passed to every run")
    p.add_argument("--out", required=True, type=report.path_arg, help="output folder (runs, logs, tables)")
    p.add_argument("--epochs", type=int, help="override the configs' epochs")
    p.add_argument("--lambda-from", nargs="+", metavar="[MODEL=]FILE", type=report.nonempty,
                   help="λ (and the other searched parameters) for NSR runs from a `python -m nsr search` "
                        "best.json; FILE for every model, MODEL=FILE for one (default: the configs' λ)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS", type=report.nonempty,
                   help='one more variant beside vanilla and NSR, trained into OUT/<model>/NAME/, e.g. '
                        '--variant last2="--regularized-layers relu8 out --lambda 0.4 0.4" (repeatable)')
    p.add_argument("--extra", default="", help='extra flags for every run, e.g. "--max-steps 50"')
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (default 1)")
    p.add_argument("--fail-fast", action="store_true", help="start no new run after a failure")
    p.add_argument("--table-only", action="store_true", help="only rebuild the report (= python -m nsr report OUT)")
    p.add_argument("--dry-run", action="store_true", help="print what would run, train nothing")
    p.add_argument("--python", default=sys.executable, help=argparse.SUPPRESS)
    p.add_argument("--repo", type=Path, default=REPO, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args) -> None:
    """Every value checked before anything is planned, written or run."""
    if not 1 <= args.seeds <= 10_000:
        raise UserError(f"--seeds must be between 1 and 10000, got {args.seeds}")
    if not 0 <= args.first_seed < 2**31 - args.seeds:
        raise UserError(f"--first-seed must be between 0 and 2**31 - seeds, got {args.first_seed}")
    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    report.check_writable(args.out, "--out")
    if args.table_only:
        return
    if not args.models:
        raise UserError("--models is required (except with --table-only)")
    args.models = list(dict.fromkeys(args.models))
    try:
        args.extra = shlex.split(args.extra)
    except ValueError as e:
        raise UserError(f"--extra {args.extra!r}: {e}") from None
    reserved = sorted({f.split("=")[0] for f in args.extra} & RESERVED_FLAGS)
    if reserved:
        raise UserError(f"--extra must not set {', '.join(reserved)}: python -m nsr reproduce sets them per run")
    args.variant = [added_variant(spec) for spec in args.variant]
    if args.data_dir is not None and Path(args.data_dir).is_file():
        raise UserError(f"--data-dir {args.data_dir} is a file; give the data folder")
    if not os.access(args.python, os.X_OK) or os.path.isdir(args.python):
        raise UserError(f"--python {args.python} is not an executable")
    args.mlp = model_kinds(args.models, Path(args.repo))


def added_variant(spec: str) -> Variant:
    """--variant NAME=FLAGS as a Variant: an NSR variant, unless its flags choose another
    --regularizer (then --lambda-from does not apply to it)."""
    name, sep, text = spec.partition("=")
    if not sep or not VARIANT_NAME.fullmatch(name) or name in {v.name for v in VARIANTS} | {"logs"}:
        raise UserError(f"--variant {spec!r}: expected NAME=FLAGS with a new folder name of letters, digits, "
                        f"'_', '-' or '.' (not {', '.join(v.name for v in VARIANTS)}), e.g. "
                        'last2="--regularized-layers relu8 out --lambda 0.4 0.4"')
    try:
        flags = shlex.split(text)
    except ValueError as e:
        raise UserError(f"--variant {spec!r}: {e}") from None
    reserved = sorted({f.split("=")[0] for f in flags} & (RESERVED_FLAGS - {"--regularizer"}))
    if reserved:
        raise UserError(f"--variant {name} must not set {', '.join(reserved)}: python -m nsr reproduce "
                        "sets them per run")
    regularizer = next((flags[i + 1] for i, f in enumerate(flags[:-1]) if f == "--regularizer"), "nsr")
    return Variant(name, tuple(flags), nsr=regularizer == "nsr")


def model_kinds(models: list[str], repo: Path) -> dict[str, bool]:
    """{config name: is an MLP}; UserError for a name without a readable config."""

    configs = repo / "configs"
    missing = [m for m in models if not (configs / f"{m}.yaml").is_file() or "/" in m or m.startswith(".")]
    if missing:
        have = sorted((p.stem for p in configs.glob("*.yaml")), key=report.natural_key)
        raise UserError(f"no config for {', '.join(missing)} in {configs}; "
                        f"available: {', '.join(have) or 'none'}")
    return {m: is_mlp(parse_config(["--config", str(configs / f"{m}.yaml")]).model) for m in models}


def main(argv=None, variants=VARIANTS) -> int:
    args = parse_args(argv)
    if args.table_only:
        report.print_report(args.out, report.report_folder(args.out, args.models))
        return 0
    variants = (*variants, *args.variant)
    runs = plan(args, variants)
    if args.dry_run:
        for r in runs:
            command = "" if r.state == "finished" else f"\n  $ {shlex.join(r.command)}"
            print(f"{r.label}: {r.state}{command}")
        return 0
    todo = sum(r.state != "finished" for r in runs)
    print(f"{len(runs)} runs ({len(args.models)} models x {args.seeds} seeds x {len(variants)} "
          f"variants): {len(runs) - todo} finished, {todo} to train -> {args.out}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        failures = run_all(runs, args.out / "logs", args.jobs, fail_fast=args.fail_fast)
    except KeyboardInterrupt:
        raise RunInterrupted("interrupted; finished runs are kept, rerun the same command to "
                             "continue") from None
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    print()
    report.print_report(args.out, report.write_report(args.out, args.models,
                                                      [v.name for v in variants], seeds))
    return print_failures(failures, len(runs))


if __name__ == "__main__":
    run_cli(main)
