"""Evolution strategies over a flat parameter vector (GBMPO meta-learning, docs/methods.md#es-meta-learning).

The search is independent of what is being scored: :func:`es_iteration`
takes a fitness function that maps a batch of candidate parameter vectors to
one fitness each (``None`` for a member that failed). ``ebpo meta`` plugs in
"train the policy for T inner steps with this mirror map, score validation
pass@1".

One iteration, as in the GBMPO paper and its released code:

1. Antithetic population: P/2 unit-normal directions eps_j, members
   phi + sigma * eps_j and phi - sigma * eps_j.
2. Fitness f_i for every member; failed members are dropped and counted
   (never scored 0).
3. Gradient estimate g = (1 / (N_ok * sigma)) * sum_i f_i * eps_i over the
   members that ran.
4. phi moves (phi += step * g) only when the population's mean fitness beats
   the best mean so far by at least ``min_improvement``. Otherwise phi stays
   and the top ``elite_frac`` members (the elites) are reused: because phi did
   not move they are still samples around the same centre, so they join the
   next iteration's gradient estimate with their measured fitness and the
   sigma they were drawn with, and the fresh population is that much smaller.
   This is our reading of "otherwise the elites are reused"; the paper gives
   no more detail.
5. sigma *= sigma_decay; stop after ``iterations`` or ``patience`` iterations
   without improvement.

Non-negativity: with ``project_nonneg=True`` (default) phi and every member
are clamped to >= 0 so the neural mirror map stays convex and its Bregman
divergence non-negative. The released code does not project, so convexity
can break there; ``project_nonneg=False`` reproduces that.

The whole state (phi, sigma, best, elites, RNG) is a plain dict so a search
can be checkpointed after every iteration and resumed bit-for-bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["ESConfig", "ESState", "es_iteration", "FitnessFn"]

FitnessFn = Callable[[Tensor], Sequence[float | None]]


@dataclass(frozen=True)
class ESConfig:
    population: int = 10
    """Members per iteration (even: antithetic pairs)."""
    sigma: float = 0.01
    """Initial perturbation scale."""
    sigma_decay: float = 0.99
    """sigma is multiplied by this after every iteration."""
    step_size: float = 0.01
    """Learning rate of the ES update."""
    iterations: int = 15
    """Maximum number of iterations."""
    elite_frac: float = 0.25
    """Fraction of members kept as elites when an iteration does not improve."""
    patience: int = 5
    """Stop after this many iterations without improvement."""
    min_improvement: float = 0.001
    """Mean fitness must beat the best so far by this much to count as an improvement."""
    project_nonneg: bool = True
    """Clamp phi and members to >= 0 (keeps the neural mirror map convex)."""
    seed: int = 0
    """Seed of the perturbation RNG."""

    def __post_init__(self) -> None:
        if self.population < 2 or self.population % 2:
            raise ValueError(f"ES population must be an even number >= 2 (antithetic pairs), got {self.population}")
        if not self.sigma > 0 or not 0 < self.sigma_decay <= 1 or not self.step_size > 0:
            raise ValueError("ES needs sigma > 0, sigma_decay in (0, 1] and step_size > 0")
        if not 0 <= self.elite_frac < 1:
            raise ValueError(f"elite_frac must be in [0, 1), got {self.elite_frac}")


@dataclass
class ESState:
    phi: Tensor
    sigma: float
    iteration: int = 0
    best_mean_fitness: float = float("-inf")
    no_improvement: int = 0
    elites: list[dict[str, Any]] = field(default_factory=list)  # {"eps": Tensor, "fitness": float, "sigma": float}
    history: list[dict[str, Any]] = field(default_factory=list)
    rng_state: Tensor | None = None
    done: bool = False

    @classmethod
    def start(cls, phi: Tensor, config: ESConfig) -> ESState:
        phi = phi.detach().to(torch.float64).clone()
        if config.project_nonneg:
            phi = phi.clamp_min(0.0)
        gen = torch.Generator().manual_seed(config.seed)
        return cls(phi=phi, sigma=config.sigma, rng_state=gen.get_state())

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ESState:
        return cls(**state)


def es_iteration(state: ESState, config: ESConfig, fitness: FitnessFn) -> ESState:
    """Run one ES iteration and return the new state (the input is not modified)."""
    if state.done:
        return state
    gen = torch.Generator()
    gen.set_state(state.rng_state)
    dim = state.phi.numel()

    fresh_pairs = max(1, (config.population - len(state.elites)) // 2)
    directions = torch.randn(fresh_pairs, dim, generator=gen, dtype=torch.float64)  # (P/2, D)
    eps = torch.cat([directions, -directions])  # (P, D) antithetic
    members = state.phi + state.sigma * eps
    if config.project_nonneg:
        members = members.clamp_min(0.0)
    scores = list(fitness(members))
    if len(scores) != members.shape[0]:
        raise ValueError(f"fitness returned {len(scores)} scores for {members.shape[0]} members")

    samples = [
        {"eps": eps[i], "fitness": float(f), "sigma": state.sigma} for i, f in enumerate(scores) if f is not None
    ]
    failed = len(scores) - len(samples)
    samples_all = samples + state.elites  # elites were measured around this same phi
    new = ESState(
        phi=state.phi,
        sigma=state.sigma * config.sigma_decay,
        iteration=state.iteration + 1,
        best_mean_fitness=state.best_mean_fitness,
        no_improvement=state.no_improvement,
        history=list(state.history),
        rng_state=gen.get_state(),
    )
    record: dict[str, Any] = {
        "iteration": new.iteration,
        "failed": failed,
        "evaluated": len(scores),
        "sigma": state.sigma,
    }
    if not samples:  # every fresh member failed: nothing to learn from this iteration
        new.no_improvement += 1
        new.elites = state.elites
        record.update(mean_fitness=None, max_fitness=None, improved=False)
    else:
        fit = torch.tensor([s["fitness"] for s in samples_all], dtype=torch.float64)  # (N_ok,)
        noise = torch.stack([s["eps"] / s["sigma"] for s in samples_all])  # (N_ok, D): eps_i / sigma_i
        mean_fitness = float(torch.tensor([s["fitness"] for s in samples]).mean())
        improved = mean_fitness > state.best_mean_fitness + config.min_improvement
        if improved:
            grad = (fit.unsqueeze(1) * noise).sum(0) / fit.numel()  # (D,) (1/(N_ok sigma)) sum f_i eps_i
            phi = state.phi + config.step_size * grad
            new.phi = phi.clamp_min(0.0) if config.project_nonneg else phi
            new.best_mean_fitness, new.no_improvement, new.elites = mean_fitness, 0, []
        else:
            new.no_improvement += 1
            keep = max(1, int(round(config.elite_frac * len(samples_all)))) if config.elite_frac > 0 else 0
            ranked = sorted(samples_all, key=lambda s: s["fitness"], reverse=True)
            new.elites = ranked[:keep]
        record.update(mean_fitness=mean_fitness, max_fitness=float(fit.max()), improved=improved)
    record["best_mean_fitness"] = new.best_mean_fitness
    new.history.append(record)
    new.done = new.iteration >= config.iterations or new.no_improvement >= config.patience
    return new
