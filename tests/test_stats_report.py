"""Student-t quantiles against tabulated values; CI coverage by simulation."""

from __future__ import annotations

import math

import pytest
import torch

from ebpo.stats_report import mean_ci, samples_to_target, t_quantile


@pytest.mark.parametrize(
    "df,expected",  # two-sided 95% critical values from standard t tables
    [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)],
)
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-3)


def test_ci_covers_the_true_mean_about_95_percent():
    gen = torch.Generator().manual_seed(0)
    hits = 0
    trials = 2000
    samples = torch.randn(trials, 5, generator=gen, dtype=torch.float64) * 2 + 1
    for row in samples.tolist():
        ci = mean_ci(row)
        hits += abs(ci["mean"] - 1.0) <= ci["ci_half_width"]
    assert 0.93 <= hits / trials <= 0.97  # binomial sd ~ 0.005


def test_mean_ci_single_value_is_undefined_not_zero():
    ci = mean_ci([0.5])
    assert ci["mean"] == 0.5 and math.isnan(ci["ci_half_width"])


def test_samples_to_target():
    assert samples_to_target([10, 20, 30], [0.1, 0.5, 0.9], 0.5) == 20
    assert samples_to_target([10, 20], [0.1, 0.2], 0.5) is None
