"""Summary statistics over seeds and the paper's results-table formatting (pure functions).

Conventions (the paper's Table: "2.29±0.07", gain "28.38%"):

* ``mean_std``: mean and *sample* standard deviation (ddof=1). With one value the std is NaN
  (undefined), with no values both are NaN; NaN entries in the input are dropped first.
* ``relative_gain``: (err_baseline - err_other) / err_baseline * 100, from the two *mean* errors.
  NaN when the baseline error is 0 or either error is NaN.
* ``paired_ttest``: two-sided paired t-test over seeds (pairs (a_i, b_i), usually the same seed),
  scipy.stats.ttest_rel: t = mean(d) / (sd(d) / sqrt(n)), d = a - b, df = n - 1. Cases where the
  test is undefined never raise:
    - fewer than 2 pairs: t and p are NaN (no test possible);
    - all differences identical and zero (the two methods scored the same on every seed):
      t = 0, p = 1.0 (no evidence of any difference);
    - all differences identical but non-zero: the t statistic is infinite and the test's
      assumption (normal differences with positive variance) does not hold, so t = +-inf and
      p = NaN ("n/a" in the table) rather than a misleading 0.

NaN means "undefined" throughout; ``nsr.train.fileio.write_json`` writes it as null.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats  # installed with scikit-learn

__all__ = [
    "mean_std", "relative_gain", "paired_ttest", "describe", "versus", "summarize",
    "format_mean_std", "format_gain", "format_pvalue",
    "results_table", "table_markdown", "table_csv",
]


def _clean(values: Iterable[float]) -> np.ndarray:
    arr = np.asarray(list(values), dtype=float).ravel()
    return arr[~np.isnan(arr)]


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of the non-NaN values; NaN where undefined (see module doc)."""
    arr = _clean(values)
    if arr.size == 0:
        return math.nan, math.nan
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if arr.size > 1 else math.nan
    return mean, std


def relative_gain(err_baseline: float, err_other: float) -> float:
    """Relative error reduction of `other` over the baseline, in percent (NaN if undefined)."""
    if err_baseline is None or err_other is None:
        return math.nan
    base, other = float(err_baseline), float(err_other)
    if math.isnan(base) or math.isnan(other) or base == 0:
        return math.nan
    return (base - other) / base * 100.0


def paired_ttest(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sided paired t-test of a against b: returns (t, p). See the module doc for edge cases.

    Pairs where either value is NaN are dropped. a and b must have the same length.
    """
    a_arr = np.asarray(list(a), dtype=float).ravel()
    b_arr = np.asarray(list(b), dtype=float).ravel()
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired t-test needs equally many values, got {a_arr.size} and {b_arr.size}")
    keep = ~(np.isnan(a_arr) | np.isnan(b_arr))
    a_arr, b_arr = a_arr[keep], b_arr[keep]
    d = a_arr - b_arr
    if d.size < 2:
        return math.nan, math.nan
    # scipy returns NaN or a p of 0 when the differences have no spread; differences equal up
    # to float rounding count as no spread.
    scale = max(float(np.abs(d).max()), 1e-300)
    if float(d.std(ddof=1)) <= 1e-12 * scale:
        if abs(float(d.mean())) <= 1e-12 * scale:
            return 0.0, 1.0
        return math.copysign(math.inf, float(d.mean())), math.nan
    result = scipy_stats.ttest_rel(a_arr, b_arr)
    return float(result.statistic), float(result.pvalue)


def describe(errors: Mapping[int, float]) -> dict:
    """{"mean", "std", "n"} of one variant's per-seed test errors {seed: error %}."""
    mean, std = mean_std(errors.values())
    return {"mean": mean, "std": std, "n": int(_clean(errors.values()).size)}


def versus(baseline: Mapping[int, float], other: Mapping[int, float]) -> dict:
    """Gain of `other` over `baseline` (from all seeds of each) and the paired t-test over the
    seeds both have: {"gain", "t", "p", "paired_n"}."""
    common = sorted(set(baseline) & set(other))
    t, p = paired_ttest([baseline[s] for s in common], [other[s] for s in common])
    gain = relative_gain(mean_std(baseline.values())[0], mean_std(other.values())[0])
    return {"gain": gain, "t": t, "p": p, "paired_n": len(common)}


def summarize(by_variant: Mapping[str, Mapping[int, float]], baseline: str = "vanilla") -> dict:
    """One table column: {variant: describe(...) plus, for every variant but the baseline,
    versus(baseline, variant)}. Variants keep their order."""
    base = by_variant.get(baseline, {})
    return {name: {**describe(errors), **({} if name == baseline else versus(base, errors))}
            for name, errors in by_variant.items()}


def format_mean_std(mean: float, std: float, digits: int = 2) -> str:
    """'2.29±0.07'; just '2.29' when the std is NaN (one seed); 'n/a' when the mean is NaN."""
    if mean is None or math.isnan(mean):
        return "n/a"
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f}±{std:.{digits}f}"


def format_gain(gain: float, digits: int = 2) -> str:
    """'28.38%' (negative when the variant is worse than the baseline); 'n/a' when NaN."""
    if gain is None or math.isnan(gain):
        return "n/a"
    return f"{gain:.{digits}f}%"


def format_pvalue(p: float) -> str:
    """'0.012' for p >= 0.001, '3.4e-05' below, 'n/a' when NaN."""
    if p is None or math.isnan(p):
        return "n/a"
    if p >= 0.001:
        return f"{p:.3f}"
    return f"{p:.1e}"


def results_table(columns: Mapping[str, Mapping[str, dict]], labels: Mapping[str, str],
                  baseline: str = "vanilla") -> list[list[str]]:
    """The paper's layout as rows of strings.

    columns: {column title: summarize(...)}, in display order, every column with the same
    variants; labels: {variant: row label}. Rows: header, one mean±std row per variant, then
    Gain and p-value against the baseline. With one compared variant these are the paper's
    "Gain" and "p-value" rows; with several, one pair per variant ("Gain: <label>").
    """
    titles = list(columns)
    variants = list(next(iter(columns.values()), {}))
    compared = [v for v in variants if v != baseline]
    rows = [["Model", *titles]]
    for v in variants:
        rows.append([labels.get(v, v), *(format_mean_std(columns[c][v]["mean"], columns[c][v]["std"])
                                         for c in titles)])
    for v in compared:
        suffix = "" if len(compared) == 1 else f": {labels.get(v, v)}"
        rows.append([f"Gain{suffix}", *(format_gain(columns[c][v]["gain"]) for c in titles)])
        rows.append([f"p-value{suffix}", *(format_pvalue(columns[c][v]["p"]) for c in titles)])
    return rows


def table_markdown(rows: list[list[str]]) -> str:
    """A Markdown table with padded columns; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(rows[0]), "| " + " | ".join("-" * w for w in widths) + " |"]
    out += [line(r) for r in rows[1:]]
    return "\n".join(out) + "\n"


def table_csv(rows: list[list[str]]) -> str:
    """The same rows as CSV text (UTF-8, '±' kept inside the cells)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()

