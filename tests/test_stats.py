"""nsr.experiments.stats against numbers worked out by hand (arithmetic in the comments)."""

import json
import math

import pytest

from nsr.experiments import stats
from nsr.train.fileio import write_json


def test_mean_and_sample_std():
    # mean(1,2,3,4) = 2.5; squared deviations 2.25+0.25+0.25+2.25 = 5; ddof=1: 5/3; sqrt = 1.2909944
    mean, std = stats.mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    assert std == pytest.approx(math.sqrt(5 / 3))
    assert std == pytest.approx(1.2909944, abs=1e-7)


def test_mean_std_degenerate():
    mean, std = stats.mean_std([2.29])
    assert mean == 2.29 and math.isnan(std)  # one seed: std undefined
    mean, std = stats.mean_std([])
    assert math.isnan(mean) and math.isnan(std)
    mean, std = stats.mean_std([1.0, float("nan"), 3.0])  # NaN dropped: mean 2, std sqrt(2)
    assert mean == pytest.approx(2.0) and std == pytest.approx(math.sqrt(2))


def test_relative_gain_matches_paper():
    # Paper, MLP-4: (2.29 - 1.64) / 2.29 = 0.65 / 2.29 = 28.384% -> "28.38%"
    assert stats.relative_gain(2.29, 1.64) == pytest.approx(0.65 / 2.29 * 100)
    assert stats.format_gain(stats.relative_gain(2.29, 1.64)) == "28.38%"
    # MLP-10: 1.34 / 3.06 = 43.79%; MLP-3: 0.29 / 3.09 = 9.39%
    assert stats.format_gain(stats.relative_gain(3.06, 1.72)) == "43.79%"
    assert stats.format_gain(stats.relative_gain(3.09, 2.80)) == "9.39%"
    # NSR worse than vanilla gives a negative gain
    assert stats.relative_gain(2.0, 2.5) == pytest.approx(-25.0)
    assert math.isnan(stats.relative_gain(0.0, 1.0))
    assert math.isnan(stats.relative_gain(float("nan"), 1.0))
    assert stats.format_gain(float("nan")) == "n/a"


def test_paired_ttest_df2_closed_form():
    # d = a - b = (0.2, 0.3, 0.1): mean 0.2; deviations (0, 0.1, -0.1) -> sum sq 0.02, /2 -> var 0.01,
    # sd 0.1; se = 0.1/sqrt(3); t = 0.2 / (0.1/sqrt(3)) = 2*sqrt(3) = 3.4641016, df = 2.
    # For df = 2 the t distribution has P(|T| > t) = 1 - t / sqrt(t^2 + 2) = 1 - sqrt(12/14) = 0.0741799
    t, p = stats.paired_ttest([3.0, 3.2, 3.1], [2.8, 2.9, 3.0])
    assert t == pytest.approx(2 * math.sqrt(3))
    assert p == pytest.approx(1 - math.sqrt(12 / 14))
    assert p == pytest.approx(0.0741799, abs=1e-6)
    # symmetric: swapping the arguments flips t, keeps p
    t2, p2 = stats.paired_ttest([2.8, 2.9, 3.0], [3.0, 3.2, 3.1])
    assert t2 == pytest.approx(-t) and p2 == pytest.approx(p)


def test_paired_ttest_df1_cauchy():
    # d = (1, 2): mean 1.5, sd sqrt(0.5), se = sqrt(0.5)/sqrt(2) = 0.5, t = 3, df = 1 (Cauchy):
    # P(|T| > 3) = 1 - (2/pi) * atan(3) = 0.2048328
    t, p = stats.paired_ttest([1.0, 2.0], [0.0, 0.0])
    assert t == pytest.approx(3.0)
    assert p == pytest.approx(1 - 2 / math.pi * math.atan(3))
    assert p == pytest.approx(0.2048328, abs=1e-6)


def test_paired_ttest_matches_table_value_df4():
    # d = (0.6, 0.7, 0.65, 0.55, 0.75): mean 0.65, deviations (-.05, .05, 0, -.1, .1)
    # sum sq = .0025+.0025+0+.01+.01 = .025, var = .025/4 = .00625, sd = .0790569,
    # se = sd/sqrt(5) = .0353553, t = .65/.0353553 = 18.3848, df = 4.
    # t tables: t_{0.9995, 4} = 8.610, so p < 0.001 (two-sided); scipy's t.sf gives p = 5.1499e-05.
    a = [2.3, 2.4, 2.3, 2.2, 2.45]
    b = [1.7, 1.7, 1.65, 1.65, 1.7]
    t, p = stats.paired_ttest(a, b)
    assert t == pytest.approx(0.65 / (math.sqrt(0.025 / 4) / math.sqrt(5)), rel=1e-6)
    assert t == pytest.approx(18.3848, abs=1e-3)
    assert p < 0.001
    assert p == pytest.approx(5.15e-05, rel=0.01)
    assert stats.format_pvalue(p) == "5.1e-05"


def test_paired_ttest_degenerate_cases():
    # fewer than two pairs: no test
    t, p = stats.paired_ttest([1.0], [2.0])
    assert math.isnan(t) and math.isnan(p)
    t, p = stats.paired_ttest([], [])
    assert math.isnan(p)
    # identical results on every seed: no evidence of a difference
    t, p = stats.paired_ttest([2.0, 3.0, 4.0], [2.0, 3.0, 4.0])
    assert t == 0.0 and p == 1.0
    # a constant non-zero difference: t infinite, p undefined (NaN, shown as n/a)
    t, p = stats.paired_ttest([3.0, 4.0, 5.0], [2.0, 3.0, 4.0])
    assert t == math.inf and math.isnan(p)
    assert stats.format_pvalue(p) == "n/a"
    # NaN pairs are dropped: only (3.0, 2.8), (3.2, 2.9), (3.1, 3.0) remain -> the df=2 case
    t, p = stats.paired_ttest([3.0, 3.2, float("nan"), 3.1], [2.8, 2.9, 1.0, 3.0])
    assert t == pytest.approx(2 * math.sqrt(3))
    with pytest.raises(ValueError):
        stats.paired_ttest([1.0, 2.0], [1.0])


def test_formatting():
    assert stats.format_mean_std(2.2912, 0.0701) == "2.29±0.07"
    assert stats.format_mean_std(1.64, float("nan")) == "1.64"
    assert stats.format_mean_std(float("nan"), float("nan")) == "n/a"
    assert stats.format_pvalue(0.0741799) == "0.074"
    assert stats.format_pvalue(1.0) == "1.000"


def test_summarize_and_table_layout():
    # seeds 0..2 for vanilla, 0..3 for NSR: means use all of each, the t-test pairs seeds 0..2
    vanilla = {0: 3.0, 1: 3.2, 2: 3.1}
    nsr = {0: 2.8, 1: 2.9, 2: 3.0, 3: 2.9}
    s = stats.summarize({"vanilla": vanilla, "nsr": nsr})
    assert list(s) == ["vanilla", "nsr"]
    assert s["vanilla"]["mean"] == pytest.approx(3.1) and s["vanilla"]["std"] == pytest.approx(0.1)
    assert s["vanilla"]["n"] == 3 and "p" not in s["vanilla"]  # the baseline is not tested
    assert s["nsr"]["mean"] == pytest.approx(2.9)  # (2.8+2.9+3.0+2.9)/4
    assert s["nsr"]["std"] == pytest.approx(math.sqrt(0.02 / 3))  # deviations -.1, 0, .1, 0
    assert s["nsr"]["gain"] == pytest.approx(0.2 / 3.1 * 100)  # 6.45%
    assert s["nsr"]["paired_n"] == 3 and s["nsr"]["p"] == pytest.approx(1 - math.sqrt(12 / 14))

    labels = {"vanilla": "Vanilla", "nsr": "Vanilla + NSR"}
    empty = stats.summarize({"vanilla": {}, "nsr": {}})
    rows = stats.results_table({"MLP-4": s, "MLP-6": empty}, labels)
    assert rows[0] == ["Model", "MLP-4", "MLP-6"]
    assert rows[1] == ["Vanilla", "3.10±0.10", "n/a"]
    assert rows[2] == ["Vanilla + NSR", "2.90±0.08", "n/a"]
    assert rows[3] == ["Gain", "6.45%", "n/a"]
    assert rows[4] == ["p-value", "0.074", "n/a"]
    md = stats.table_markdown(rows)
    lines = md.splitlines()
    assert lines[0].startswith("| Model") and set(lines[1]) <= {"|", "-", " "}
    assert "| Vanilla + NSR | 2.90±0.08" in md
    csv_text = stats.table_csv(rows)
    assert csv_text.splitlines()[1] == "Vanilla,3.10±0.10,n/a"


def test_table_with_several_variants():
    # a third variant, "smooth": errors (3.0, 3.0, 2.9) -> mean 2.9667, sd: deviations
    # (1/30, 1/30, -2/30) -> sum sq 6/900, /2 -> sd 0.0577; gain (3.1 - 2.9667)/3.1 = 4.30%;
    # d = vanilla - smooth = (0, 0.2, 0.2): mean 0.1333, sd 0.11547, t = 0.1333/(0.11547/sqrt 3) = 2,
    # df 2: p = 1 - t/sqrt(t^2 + 2) = 1 - 2/sqrt(6) = 0.1835
    by_variant = {"vanilla": {0: 3.0, 1: 3.2, 2: 3.1}, "nsr": {0: 2.8, 1: 2.9, 2: 3.0},
                  "smooth": {0: 3.0, 1: 3.0, 2: 2.9}}
    s = stats.summarize(by_variant)
    assert s["smooth"]["t"] == pytest.approx(2.0)
    assert s["smooth"]["p"] == pytest.approx(1 - 2 / math.sqrt(6))
    rows = stats.results_table({"MLP-4": s}, {"vanilla": "Vanilla", "nsr": "Vanilla + NSR"})
    assert [r[0] for r in rows] == ["Model", "Vanilla", "Vanilla + NSR", "smooth",
                                    "Gain: Vanilla + NSR", "p-value: Vanilla + NSR",
                                    "Gain: smooth", "p-value: smooth"]
    assert rows[3][1] == "2.97±0.06" and rows[6][1] == "4.30%" and rows[7][1] == "0.184"
    assert rows[5][1] == "0.074"  # NSR against vanilla, as in the two-variant table


def test_undefined_statistics_are_written_as_null(tmp_path):
    write_json(tmp_path / "s.json", {"a": float("nan"), 1: [1.5, float("inf"), (2, float("-inf"))]})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": None, "1": [1.5, None, [2, None]]}
