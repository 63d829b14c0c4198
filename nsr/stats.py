"""Summary statistics over seeds and the paper's results-table formatting (pure functions).

Conventions (the paper's Table: "2.29±0.07", gain "28.38%"):

* ``mean_std``: mean and *sample* standard deviation (ddof=1). With one value the std is NaN
  (undefined), with no values both are NaN; NaN entries in the input are dropped first.
* ``relative_gain``: (err_vanilla - err_nsr) / err_vanilla * 100, from the two *mean* errors.
  NaN when the vanilla error is 0 or either error is NaN.
* ``paired_ttest``: two-sided paired t-test over seeds (pairs (a_i, b_i), usually the same seed).
  d_i = a_i - b_i, t = mean(d) / (sd(d) / sqrt(n)) with sd ddof=1, df = n - 1,
  p = 2 * P(T_df > |t|). Degenerate cases never raise:
    - fewer than 2 pairs: t and p are NaN (no test possible);
    - all differences identical and zero (the two methods scored the same on every seed):
      t = 0, p = 1.0 (no evidence of any difference);
    - all differences identical but non-zero: the t statistic is infinite and the test's
      assumption (normal differences with positive variance) does not hold, so t = +-inf and
      p = NaN ("n/a" in the table) rather than a misleading 0.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "mean_std", "relative_gain", "paired_ttest", "paired_pvalue",
    "format_mean_std", "format_gain", "format_pvalue",
    "summarize", "results_table", "table_markdown", "table_csv",
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


def relative_gain(err_vanilla: float, err_nsr: float) -> float:
    """Relative error reduction of NSR over vanilla, in percent (NaN if undefined)."""
    if err_vanilla is None or err_nsr is None:
        return math.nan
    ev, en = float(err_vanilla), float(err_nsr)
    if math.isnan(ev) or math.isnan(en) or ev == 0:
        return math.nan
    return (ev - en) / ev * 100.0


def paired_ttest(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sided paired t-test of a against b: returns (t, p). See the module doc for edge cases.

    Pairs where either value is NaN are dropped. a and b must have the same length.
    """
    a_arr = np.asarray(list(a), dtype=float).ravel()
    b_arr = np.asarray(list(b), dtype=float).ravel()
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired t-test needs equally many values, got {a_arr.size} and {b_arr.size}")
    keep = ~(np.isnan(a_arr) | np.isnan(b_arr))
    d = a_arr[keep] - b_arr[keep]
    n = d.size
    if n < 2:
        return math.nan, math.nan
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    # Differences equal up to float rounding count as "no variance".
    scale = max(float(np.abs(d).max()), 1e-300)
    if sd <= 1e-12 * scale:
        if abs(mean) <= 1e-12 * scale:
            return 0.0, 1.0
        return math.copysign(math.inf, mean), math.nan
    t = mean / (sd / math.sqrt(n))
    from scipy.stats import t as student_t  # scipy comes with scikit-learn
    p = float(2.0 * student_t.sf(abs(t), df=n - 1))
    return t, min(p, 1.0)


def paired_pvalue(a: Sequence[float], b: Sequence[float]) -> float:
    """The p-value of ``paired_ttest``."""
    return paired_ttest(a, b)[1]


def format_mean_std(mean: float, std: float, digits: int = 2) -> str:
    """'2.29±0.07'; just '2.29' when the std is NaN (one seed); 'n/a' when the mean is NaN."""
    if mean is None or math.isnan(mean):
        return "n/a"
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f}±{std:.{digits}f}"


def format_gain(gain: float, digits: int = 2) -> str:
    """'28.38%' (negative when NSR is worse); 'n/a' when NaN."""
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


def summarize(vanilla: Mapping[int, float], nsr: Mapping[int, float]) -> dict:
    """Numbers for one table column from per-seed test errors {seed: error %} of both variants.

    Means and stds use every seed a variant has; the t-test pairs the seeds both have.
    """
    v_mean, v_std = mean_std(vanilla.values())
    n_mean, n_std = mean_std(nsr.values())
    common = sorted(set(vanilla) & set(nsr))
    t, p = paired_ttest([vanilla[s] for s in common], [nsr[s] for s in common])
    return {
        "vanilla_mean": v_mean, "vanilla_std": v_std, "vanilla_n": len(_clean(vanilla.values())),
        "nsr_mean": n_mean, "nsr_std": n_std, "nsr_n": len(_clean(nsr.values())),
        "gain": relative_gain(v_mean, n_mean),
        "t": t, "p": p, "paired_n": len(common),
    }


ROW_NAMES = ("Vanilla", "Vanilla + NSR", "Gain", "p-value")


def results_table(columns: Mapping[str, Mapping]) -> list[list[str]]:
    """The paper's layout as rows of strings: header, Vanilla, Vanilla + NSR, Gain, p-value.

    columns: {column title: summarize(...) result}, in display order.
    """
    titles = list(columns)
    rows = [["Model", *titles]]
    rows.append(["Vanilla", *(format_mean_std(columns[c]["vanilla_mean"], columns[c]["vanilla_std"])
                             for c in titles)])
    rows.append(["Vanilla + NSR", *(format_mean_std(columns[c]["nsr_mean"], columns[c]["nsr_std"])
                                   for c in titles)])
    rows.append(["Gain", *(format_gain(columns[c]["gain"]) for c in titles)])
    rows.append(["p-value", *(format_pvalue(columns[c]["p"]) for c in titles)])
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
    import csv
    import io
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()
