"""The quick start (`make demo`): MLP-4 vanilla against MLP-4 + NSR on scikit-learn's digits.

Needs no download. Trains both over a few seeds with configs/mlp4_digits.yaml and prints the
test error side by side, as the paper's table does (mean ± std over seeds, relative gain).
"""

from __future__ import annotations

import os
import time

from nsr.train.config import parse_args
from nsr.train.engine import train
from nsr.train.errors import ArgumentParser, UserError, run_cli

from .report import check_writable, path_arg
from .stats import format_gain, format_mean_std, mean_std, relative_gain

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "mlp4_digits.yaml")


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m nsr demo", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds per variant (default 5)")
    parser.add_argument("--out", type=path_arg, default=os.path.join("runs", "demo"),
                        help="folder of the runs (default runs/demo); demo runs there are replaced")
    args = parser.parse_args(argv)
    if not 1 <= args.seeds <= 100:
        raise UserError(f"--seeds must be between 1 and 100, got {args.seeds}")
    check_writable(args.out, "--out")

    start = time.perf_counter()
    errors: dict[str, list[float]] = {"Vanilla": [], "Vanilla + NSR": []}
    for seed in range(args.seeds):
        for label, nsr in (("Vanilla", False), ("Vanilla + NSR", True)):
            kind = "nsr" if nsr else "vanilla"
            cfg = parse_args(["--seed", str(seed), "--out", str(args.out / f"{kind}-s{seed}"),
                              "--overwrite", "--quiet", "--regularizer", kind if nsr else "none"],
                             default_config=CONFIG)
            metrics = train(cfg)
            errors[label].append(metrics["test_error"])
    print(f"\nMLP-4 on digits, test error % over {args.seeds} seeds "
          f"(test at the best validation epoch; {time.perf_counter() - start:.0f}s in all)")
    print(f"| {'':14} | {'MLP-4':>12} |\n|{'-' * 16}|{'-' * 14}|")
    for label, values in errors.items():
        print(f"| {label:14} | {format_mean_std(*mean_std(values)):>12} |")
    gain = relative_gain(mean_std(errors["Vanilla"])[0], mean_std(errors["Vanilla + NSR"])[0])
    print(f"| {'Gain':14} | {format_gain(gain):>12} |")
    print(f"Runs (metrics.json, history.csv, checkpoints) are in {args.out}/")


if __name__ == "__main__":
    run_cli(main)
