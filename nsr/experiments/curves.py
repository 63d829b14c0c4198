"""The curves of python -m nsr report (OUT/curves.png): per model, validation accuracy per epoch and,
beside it, the steadiness of the NSR layer per epoch (its neurons' mean intra-class response
variance, the figure each validation pass writes into history.csv), one line per variant with a
mean ± std band over seeds."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from nsr.train.errors import UserError, one_line

from .figures import pyplot, save_png

STEADINESS = "intra_var_"  # history.csv's columns of the figure, one per watched layer


def curve_stats(histories: list[list[float]]):
    """Epoch-wise mean and std over runs of possibly different lengths (NaN-padded)."""
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


def history_columns(folder: Path) -> dict[str, list[float]]:
    """{column: values per epoch} of a run's history.csv ({} without one; an empty cell or text
    is NaN). A file that cannot be read is a UserError."""
    path = Path(folder) / "history.csv"
    if not path.exists():
        return {}
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {path} ({one_line(e)}); restore it, or move that run folder away "
                        "and train the run again") from None
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, text in row.items():
            if key is None:
                continue
            try:
                value = float(text)
            except (TypeError, ValueError):
                value = math.nan
            columns.setdefault(key, []).append(value)
    return columns


def steadiness_layer(layers_by_run: list[list[str]], columns_by_run: list[dict]) -> str | None:
    """The layer to compare: the first regularized layer of a run that has one and whose figure
    every run wrote where possible, else the first figure any run wrote."""
    written = [k[len(STEADINESS):] for cols in columns_by_run for k in cols if k.startswith(STEADINESS)]
    for layers in layers_by_run:
        for layer in layers:
            if layer in written:
                return layer
    return written[0] if written else None


def _band(ax, histories, label, color):
    x, mean, std = curve_stats(histories)
    ax.plot(x, mean, color=color, label=f"{label} (n={len(histories)})", marker="o" if len(x) <= 10 else None,
            markersize=3)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def plot(path: Path, panels: list[dict]) -> Path:
    """One row per model: accuracy | steadiness. Each panel dict: title, accuracy {label: histories},
    layer (or None) and steadiness {label: histories}."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    # runs from before the steadiness was logged have none to show: accuracy alone, then
    steady = any(panel["layer"] for panel in panels)
    fig, axes = plt.subplots(len(panels), 1 + steady, figsize=(4.8 * (1 + steady), 3.6 * len(panels)),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, panel in zip(axes, panels):
        acc_ax, var_ax = row[0], row[-1]
        for ax, key, ylabel in ((acc_ax, "accuracy", "validation accuracy (%)"),
                                (var_ax, "steadiness", f"mean intra-class variance, layer {panel['layer']}"))[:1 + steady]:
            for i, (label, histories) in enumerate(panel[key].items()):
                if histories:
                    _band(ax, histories, label, colors[i % len(colors)])
            ax.set(title=panel["title"], xlabel="epoch", ylabel=ylabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8, loc="lower right" if key == "accuracy" else "best")
            else:
                why = "no finished runs" if key == "accuracy" else "no steadiness column in history.csv"
                ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
        if not steady:
            continue
        values = np.concatenate([np.asarray(h, float) for hs in panel["steadiness"].values() for h in hs] or [[]])
        values = values[np.isfinite(values) & (values > 0)]
        if values.size and values.max() / values.min() > 20:  # vanilla and NSR can lie decades apart
            var_ax.set_yscale("log")
    fig.suptitle("Validation accuracy and neuron steadiness: mean ± std over seeds" if steady
                 else "Validation accuracy: mean ± std over seeds")
    fig.tight_layout()
    save_png(fig, path)
    return path
