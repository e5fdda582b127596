"""Populations of prompts: true success rates theta from a named distribution, and grouped 0/1 rewards.

Spec strings (the ``--dist`` flag of ``ebpo simulate``)::

    beta:2,2                            Beta(a=2, b=2)
    uniform:0,0.5                       Uniform(lo, hi) inside [0, 1]
    mix:0.5*beta:1,5+0.5*beta:5,1       a mixture; weights are normalised

A :class:`Population` knows its exact moments, so the oracle quantities
(the shrinkage that knows the population, the population limit of EBPO's
plug-in estimates) are closed forms, not Monte Carlo estimates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Population", "parse_dist", "sample_rewards"]

Sampler = Callable[[int, torch.Generator], Tensor]


@dataclass(frozen=True)
class Population:
    """A distribution of true success rates theta in [0, 1].

    Attributes:
        spec: the spec string it was parsed from.
        mean: E[theta].
        second_moment: E[theta^2].
        sampler: ``(n, generator) -> theta (n,) float64``.
    """

    spec: str
    mean: float
    second_moment: float
    sampler: Sampler

    @property
    def var(self) -> float:
        """Var theta: the between-prompt variance (tau^2 in the EBPO paper's model)."""
        return self.second_moment - self.mean**2

    @property
    def noise(self) -> float:
        """E[theta (1 - theta)]: the mean Bernoulli variance of one reward given its prompt."""
        return self.mean - self.second_moment

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """theta (n,) float64."""
        if n < 1:
            raise ValueError(f"need at least one prompt, got n={n}")
        return self.sampler(n, generator)


def _beta(a: float, b: float, spec: str) -> Population:
    def sample(n: int, gen: torch.Generator) -> Tensor:
        # torch's Gamma/Beta sampler takes no generator: draw under a fork of the global RNG seeded from
        # ``gen``, so results depend on ``gen`` alone and the caller's global RNG is left untouched.
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dist = torch.distributions.Beta(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
            return dist.sample((n,))

    mean = a / (a + b)
    var = a * b / ((a + b) ** 2 * (a + b + 1))
    return Population(spec, mean, var + mean**2, sample)


def _uniform(lo: float, hi: float, spec: str) -> Population:
    def sample(n: int, gen: torch.Generator) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)

    mean = (lo + hi) / 2
    return Population(spec, mean, (hi - lo) ** 2 / 12 + mean**2, sample)


def _mixture(terms: list[tuple[float, Population]], spec: str) -> Population:
    weights = torch.tensor([w for w, _ in terms], dtype=torch.float64)
    weights = weights / weights.sum()
    components = [pop for _, pop in terms]

    def sample(n: int, gen: torch.Generator) -> Tensor:
        which = torch.multinomial(weights, n, replacement=True, generator=gen)  # (n,) component of each prompt
        draws = torch.stack([pop.sample(n, gen) for pop in components])  # (components, n)
        return draws.gather(0, which.unsqueeze(0)).squeeze(0)

    mean = float(sum(w * pop.mean for w, pop in zip(weights.tolist(), components)))
    second = float(sum(w * pop.second_moment for w, pop in zip(weights.tolist(), components)))
    return Population(spec, mean, second, sample)


def parse_dist(spec: str) -> Population:
    """Parse ``beta:a,b``, ``uniform:lo,hi`` or ``mix:w1*D1+w2*D2+...`` into a :class:`Population`.

    >>> pop = parse_dist("beta:2,2")
    >>> round(pop.mean, 4), round(pop.var, 4), round(pop.noise, 4)
    (0.5, 0.05, 0.2)
    >>> round(parse_dist("mix:0.5*beta:1,5+0.5*beta:5,1").mean, 4)
    0.5
    """
    text = spec.strip()
    if text.startswith("mix:"):
        terms: list[tuple[float, Population]] = []
        for term in text[4:].split("+"):
            weight_text, star, sub = term.partition("*")
            if not star or not sub:
                raise ValueError(f"mixture term {term!r} in {spec!r} must look like 'w*beta:a,b'")
            try:
                weight = float(weight_text)
            except ValueError as exc:
                raise ValueError(f"mixture weight {weight_text!r} in {spec!r} is not a number") from exc
            if not weight > 0:
                raise ValueError(f"mixture weights must be > 0, got {weight} in {spec!r}")
            if sub.strip().startswith("mix:"):
                raise ValueError(f"nested mixtures are not supported: {spec!r}")
            terms.append((weight, parse_dist(sub)))
        if len(terms) < 2:
            raise ValueError(f"a mixture needs at least two terms joined by '+', got {spec!r}")
        return _mixture(terms, text)
    kind, _, args = text.partition(":")
    try:
        values = [float(x) for x in args.split(",")]
    except ValueError as exc:
        raise ValueError(f"cannot parse the parameters of distribution {spec!r}: {exc}") from exc
    if kind == "beta" and len(values) == 2:
        if not min(values) > 0:
            raise ValueError(f"beta:a,b needs a > 0 and b > 0, got {spec!r}")
        return _beta(values[0], values[1], text)
    if kind == "uniform" and len(values) == 2:
        if not 0.0 <= values[0] < values[1] <= 1.0:
            raise ValueError(f"uniform:lo,hi needs 0 <= lo < hi <= 1, got {spec!r}")
        return _uniform(values[0], values[1], text)
    raise ValueError(f"unknown distribution {spec!r}: use 'beta:a,b', 'uniform:lo,hi' or 'mix:w*D+w*D'")


def sample_rewards(theta: Tensor, group_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw a group of ``group_size`` Bernoulli(theta_q) rewards per prompt.

    Args:
        theta: true success rates (M,).
        group_size: G >= 1.

    Returns:
        rewards (M * G,) float64 in {0, 1}, prompt-major, and group_ids (M * G,) int64 (prompt q -> q).
    """
    if group_size < 1:
        raise ValueError(f"group size must be >= 1, got {group_size}")
    rewards = (
        torch.rand(theta.numel(), group_size, generator=generator, dtype=torch.float64) < theta.unsqueeze(1)
    ).double()  # (M, G)
    group_ids = torch.arange(theta.numel()).repeat_interleave(group_size)  # (M * G,)
    return rewards.reshape(-1), group_ids
