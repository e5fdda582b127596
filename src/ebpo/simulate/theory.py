"""Closed forms and exact sums behind ``ebpo simulate``, each with a Monte Carlo counterpart.

HA-DW's bias analysis (arXiv 2601.08521; docs/methods.md#bias-of-the-group-mean). For a prompt with
true success rate p and a group of G 0/1 rewards with k successes,
mu_hat = k / G. "Mixed" means the group is not all-equal (1 <= k <= G-1), the
only groups that carry a GRPO learning signal. The paper's table is

    P_G(upper) = (1 / upper) * integral_0^upper P(mu_hat > p | mixed, p) dp
               = (1 / upper) * integral_0^upper
                   sum_{k=1}^{G-1} [k/G > p] C(G,k) p^k (1-p)^(G-k) / (1 - (1-p)^G - p^G) dp,

the conditional probability for each p, averaged with p uniform on
(0, upper). The integrand is smooth between the breakpoints p = k/G, so
Gauss-Legendre quadrature on each piece gives it to machine precision.
(A different quantity, the pooled ratio integral P(mu_hat > p, mixed) dp /
integral P(mixed) dp, i.e. rejection of all-equal groups with p drawn once for
the whole population, does NOT give the paper's figures; it is reported too,
so the difference is visible.)

The bias of the group mean given a mixed group (docs/methods.md#bias-of-the-group-mean)::

    E[mu_hat | mixed] - p = (p (1-p)^G + p^(G+1) - p^G) / (1 - (1-p)^G - p^G),

which is also minus the bias of the (unscaled) group-relative advantage
r - mu_hat against r - p.

Baseline MSE. A linear shrinkage baseline V = (1 - S) mu_hat + S m has, given
p, E[(V - p)^2] = (1 - S)^2 p (1 - p) / G + S^2 (m - p)^2, and over a
population with mean E theta, Var theta and noise E[theta (1 - theta)]:
(1 - S)^2 noise / G + S^2 (Var theta + (m - E theta)^2). The oracle uses
S* = (noise / G) / (noise / G + Var theta) and m = E theta (the best linear
predictor; for a Beta(a, b) population it is the exact posterior mean, with
S* = (a + b) / (G + a + b)). EBPO's plug-in estimates converge, for a large
batch with per-batch statistics, to sigma^2 = E theta (1 - E theta) (the total
reward variance), mu_glob = E theta and tau^2 = Var theta + noise / G (the
variance of raw group means; the paper does not subtract sigma^2 / G), which
gives :func:`ebpo_population_shrinkage`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ebpo.simulate.populations import Population

__all__ = [
    "binomial_pmf",
    "mixed_probability",
    "hadw_probability_given_p",
    "hadw_probability_exact",
    "hadw_probability_pooled",
    "hadw_probability_mc",
    "bias_closed_form",
    "bias_mc",
    "shrinkage_mse_given_p",
    "shrinkage_mse_population",
    "oracle_shrinkage",
    "ebpo_population_shrinkage",
    "all_equal_probability",
]


def binomial_pmf(group_size: int, p: Tensor) -> Tensor:
    """P(k successes out of G | p) for k = 0..G: p (P,) -> (P, G + 1) float64."""
    k = torch.arange(group_size + 1, dtype=torch.float64)
    log_comb = math.lgamma(group_size + 1) - torch.lgamma(k + 1) - torch.lgamma(group_size - k + 1)  # (G + 1,)
    p = p.double().unsqueeze(1)  # (P, 1)
    # xlogy gives 0 * log 0 = 0, so p = 0 and p = 1 are exact.
    return torch.exp(log_comb + torch.xlogy(k, p) + torch.xlogy(group_size - k, 1 - p))


def mixed_probability(group_size: int, p: Tensor) -> Tensor:
    """P(1 <= k <= G-1 | p) = 1 - (1-p)^G - p^G, (P,); expm1/log1p keep it accurate for tiny p."""
    p = p.double()
    return -torch.expm1(group_size * torch.log1p(-p)) - p**group_size


def _gauss_legendre(lo: float, hi: float, nodes: int) -> tuple[Tensor, Tensor]:
    x, w = np.polynomial.legendre.leggauss(nodes)  # on (-1, 1)
    half = (hi - lo) / 2
    return torch.as_tensor(lo + half * (x + 1), dtype=torch.float64), torch.as_tensor(half * w, dtype=torch.float64)


def _pieces(group_size: int, upper: float, nodes: int) -> tuple[Tensor, Tensor]:
    """Quadrature nodes and weights on (0, upper), split at the jumps p = k/G of the indicator [k/G > p]."""
    cuts = [0.0] + [k / group_size for k in range(1, group_size) if k / group_size < upper] + [upper]
    parts = [_gauss_legendre(lo, hi, nodes) for lo, hi in zip(cuts[:-1], cuts[1:])]
    return torch.cat([x for x, _ in parts]), torch.cat([w for _, w in parts])


def _check(group_size: int, upper: float) -> None:
    if group_size < 2:
        raise ValueError(f"a group needs G >= 2 to be mixed, got G={group_size}")
    if not 0.0 < upper <= 1.0:
        raise ValueError(f"the range of p must be (0, upper] with 0 < upper <= 1, got upper={upper}")


def _above_and_mixed(group_size: int, p: Tensor) -> Tensor:
    """P(mu_hat > p and mixed | p), (P,)."""
    pmf = binomial_pmf(group_size, p)[:, 1:group_size]  # (P, G-1): the mixed outcomes k = 1..G-1
    k = torch.arange(1, group_size, dtype=torch.float64)
    return (pmf * (k / group_size > p.unsqueeze(1))).sum(1)


def hadw_probability_given_p(group_size: int, p: Tensor) -> Tensor:
    """P(mu_hat > p | mixed, p) for p (P,) in (0, 1): the integrand of the table, (P,)."""
    if group_size < 2:
        raise ValueError(f"a group needs G >= 2 to be mixed, got G={group_size}")
    p = p.double()
    return _above_and_mixed(group_size, p) / mixed_probability(group_size, p)


def hadw_probability_exact(group_size: int, upper: float, nodes: int = 64) -> float:
    """The HA-DW table entry: mean over p ~ U(0, upper) of P(mu_hat > p | mixed, p).

    Exact sum over the binomial; the integral over p by Gauss-Legendre on each
    piece between breakpoints k/G (``nodes`` per piece; 64 is exact to ~1e-15).
    """
    _check(group_size, upper)
    p, w = _pieces(group_size, upper, nodes)
    return float((w * hadw_probability_given_p(group_size, p)).sum() / upper)


def hadw_probability_pooled(group_size: int, upper: float, nodes: int = 64) -> float:
    """The pooled alternative: integral P(mu_hat > p, mixed) dp / integral P(mixed) dp over (0, upper).

    Not the paper's quantity (it weights each p by its chance of a mixed
    group); reported to show which reading the paper's figures follow.
    """
    _check(group_size, upper)
    p, w = _pieces(group_size, upper, nodes)
    return float((w * _above_and_mixed(group_size, p)).sum() / (w * mixed_probability(group_size, p)).sum())


def hadw_probability_mc(
    group_size: int, upper: float, samples: int, generator: torch.Generator, max_rounds: int = 1 << 17
) -> dict[str, float]:
    """Monte Carlo of the table entry by direct simulation, sharing no formula with the exact sum.

    Draw p ~ U(0, upper) ``samples`` times; for each p draw groups of G 0/1
    rewards until one is mixed (rejection sampling, all p at once, each round
    only for the p still waiting); score [mu_hat > p] on that group. Each p
    then has one group from the conditional law given mixed, so the mean of
    the scores estimates P_G(upper), with standard error sqrt(P (1 - P) / n).

    A p this close to 0 waits ~1 / (G p) rounds; those still waiting after
    ``max_rounds`` rounds (p below ~1e-5) are left out and counted in
    ``unresolved``: they could move the estimate by at most unresolved / samples.

    Returns:
        ``{"estimate", "std_error", "samples", "unresolved"}``.
    """
    _check(group_size, upper)
    if samples < 2:
        raise ValueError(f"need at least 2 Monte Carlo samples, got {samples}")
    p = torch.rand(samples, generator=generator, dtype=torch.float64) * upper  # (n,)
    score = torch.full((samples,), math.nan, dtype=torch.float64)
    waiting = torch.arange(samples)
    rounds = 0
    while waiting.numel() and rounds < max_rounds:
        # Draw enough rounds at once that about half of the waiting p resolve in the first batch of rounds.
        batch_rounds = min(max(1, rounds), max_rounds - rounds, max(1, (1 << 22) // (waiting.numel() * group_size)))
        pw = p[waiting]  # (W,)
        k = (
            torch.rand(waiting.numel(), batch_rounds, group_size, generator=generator, dtype=torch.float64)
            < pw.view(-1, 1, 1)
        ).sum(2)  # (W, R)
        mixed = (k > 0) & (k < group_size)  # (W, R)
        resolved = mixed.any(1)  # (W,)
        first = mixed.double().argmax(1)  # (W,) the first mixed round
        k_first = k.gather(1, first.unsqueeze(1)).squeeze(1).double()
        idx = waiting[resolved]
        score[idx] = (k_first[resolved] / group_size > pw[resolved]).double()
        waiting = waiting[~resolved]
        rounds += batch_rounds
    done = score[~score.isnan()]
    estimate = float(done.mean())
    return {
        "estimate": estimate,
        "std_error": math.sqrt(max(estimate * (1 - estimate), 1.0 / done.numel()) / done.numel()),
        "samples": float(done.numel()),
        "unresolved": float(waiting.numel()),
    }


def bias_closed_form(group_size: int, p: Tensor) -> Tensor:
    """E[mu_hat | mixed] - p = (p (1-p)^G + p^(G+1) - p^G) / (1 - (1-p)^G - p^G), p (P,) in (0, 1) -> (P,)."""
    if group_size < 2:
        raise ValueError(f"a group needs G >= 2 to be mixed, got G={group_size}")
    p = p.double()
    if bool(((p <= 0) | (p >= 1)).any()):
        raise ValueError("the bias given a mixed group is defined for 0 < p < 1 only")
    q = 1 - p
    return (p * q**group_size + p ** (group_size + 1) - p**group_size) / mixed_probability(group_size, p)


def bias_mc(group_size: int, p: Tensor, groups: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Monte Carlo of E[mu_hat | mixed] - p: ``groups`` groups per p, mixed ones kept.

    Returns ``{"bias" (P,), "std_error" (P,), "mixed" (P,)}`` (NaN where no group was mixed).
    """
    p = p.double()
    k = (
        (torch.rand(p.numel(), groups, group_size, generator=generator, dtype=torch.float64) < p.view(-1, 1, 1))
        .sum(2)
        .double()
    )  # (P, n)
    mixed = (k > 0) & (k < group_size)  # (P, n)
    count = mixed.sum(1).double()  # (P,)
    mu = torch.where(mixed, k / group_size, torch.zeros_like(k))
    mean = mu.sum(1) / count
    var = ((mu - mean.unsqueeze(1)) ** 2 * mixed).sum(1) / (count - 1).clamp_min(1)
    return {"bias": mean - p, "std_error": (var / count).sqrt(), "mixed": count}


def shrinkage_mse_given_p(group_size: int, p: Tensor, shrinkage: float, target: float) -> Tensor:
    """E[(V - p)^2 | p] for V = (1 - S) mu_hat + S * target: (1-S)^2 p(1-p)/G + S^2 (target - p)^2, (P,)."""
    p = p.double()
    return (1 - shrinkage) ** 2 * p * (1 - p) / group_size + shrinkage**2 * (target - p) ** 2


def shrinkage_mse_population(population: Population, group_size: int, shrinkage: float, target: float) -> float:
    """E[(V - theta)^2] over theta from ``population`` for the linear shrinkage baseline."""
    return (1 - shrinkage) ** 2 * population.noise / group_size + shrinkage**2 * (
        population.var + (target - population.mean) ** 2
    )


def oracle_shrinkage(population: Population, group_size: int) -> float:
    """S* = (noise / G) / (noise / G + Var theta), toward E theta: the MSE-optimal linear baseline."""
    noise = population.noise / group_size
    return noise / (noise + population.var) if noise + population.var > 0 else 1.0


def ebpo_population_shrinkage(population: Population, group_size: int) -> float:
    """The limit of EBPO's plug-in S for a large batch with per-batch statistics (toward mu_glob = E theta).

    sigma^2 = E theta (1 - E theta), tau^2 = Var theta + noise / G: docs/methods.md#welford-statistics.
    """
    sigma2 = population.mean * (1 - population.mean)
    noise = sigma2 / group_size
    denom = noise + population.var + population.noise / group_size
    return noise / denom if denom > 1e-6 else 1.0


def all_equal_probability(theta: Tensor, group_size: int) -> float:
    """E[theta^G + (1 - theta)^G] over the given theta (M,): the chance that a group is all-equal."""
    theta = theta.double()
    return float((theta**group_size + (1 - theta) ** group_size).mean())
