"""Across-seed statistics for reports: mean, standard deviation and Student-t confidence intervals.

No SciPy dependency: the t quantile is found by bisection on the CDF, which is
the integral of ``torch.distributions.StudentT``'s density (Simpson's rule on a
fine grid); accurate to ~1e-6 for the degrees of freedom seeds give us.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch

__all__ = ["t_quantile", "mean_ci", "samples_to_target"]


def _t_cdf(x: float, df: float) -> float:
    if x == 0:
        return 0.5
    dist = torch.distributions.StudentT(torch.tensor(float(df), dtype=torch.float64))
    grid = torch.linspace(0.0, abs(x), 4001, dtype=torch.float64)  # even number of intervals for Simpson
    density = dist.log_prob(grid).exp()
    h = abs(x) / 4000
    weights = torch.ones_like(grid)
    weights[1:-1:2] = 4.0
    weights[2:-1:2] = 2.0
    half = float((weights * density).sum() * h / 3)
    return 0.5 + half if x > 0 else 0.5 - half


@lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """Inverse CDF of Student's t with ``df`` degrees of freedom at ``p`` in (0, 1)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs p in (0, 1) and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean, sample std (n-1) and the two-sided Student-t CI half-width of the mean.

    With one value the std and half-width are NaN (undefined), never 0.
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    x = torch.tensor([float(v) for v in values], dtype=torch.float64)
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "std": math.nan, "ci_half_width": math.nan, "n": 1.0}
    std = float(x.std(unbiased=True))
    half = t_quantile(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci_half_width": half, "n": float(n)}


def samples_to_target(samples: Sequence[float], accuracy: Sequence[float], target: float) -> float | None:
    """Samples consumed when held-out accuracy first reaches ``target`` (None if never)."""
    for s, a in zip(samples, accuracy):
        if a >= target:
            return float(s)
    return None
