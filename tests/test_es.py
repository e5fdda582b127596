"""Evolution strategies: improves a known objective, drops failed members, resumes bit-for-bit."""

from __future__ import annotations

import pytest
import torch

from ebpo.meta.es import ESConfig, ESState, es_iteration

TARGET = torch.linspace(0.1, 0.5, 20, dtype=torch.float64)


def quadratic(members: torch.Tensor) -> list[float]:
    return (-((members - TARGET) ** 2).sum(dim=1)).tolist()


def run(state: ESState, config: ESConfig, fitness, iterations: int) -> ESState:
    for _ in range(iterations):
        state = es_iteration(state, config, fitness)
    return state


def test_es_climbs_a_quadratic():
    config = ESConfig(
        population=20, sigma=0.05, sigma_decay=1.0, step_size=0.02, iterations=60, patience=60, min_improvement=0.0
    )
    state = run(ESState.start(torch.zeros(20), config), config, quadratic, 60)
    start_loss = float(((torch.zeros(20, dtype=torch.float64) - TARGET) ** 2).sum())
    end_loss = float(((state.phi - TARGET) ** 2).sum())
    assert end_loss < 0.25 * start_loss
    assert state.history[-1]["best_mean_fitness"] > -start_loss


def test_antithetic_gradient_matches_closed_form_on_linear_fitness():
    """For f(phi) = w . phi, E[g] = w exactly with antithetic pairs: (f(+) - f(-)) eps / (2 sigma) = (w . eps) eps."""
    w = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    config = ESConfig(population=4000, sigma=0.1, step_size=1.0, project_nonneg=False, min_improvement=-1e9)
    state = ESState.start(torch.zeros(5), config)
    new = es_iteration(state, config, lambda m: (m @ w).tolist())
    assert torch.allclose(new.phi, w, atol=0.1)  # Monte Carlo error ~ |w| / sqrt(2000)


def test_failed_members_are_dropped_and_counted_not_scored_zero():
    config = ESConfig(population=6, seed=3, min_improvement=-1e9, project_nonneg=False)
    calls = []

    def flaky(members):
        calls.append(members)
        scores = quadratic(members)
        return [None if i == 1 else s for i, s in enumerate(scores)]

    state = es_iteration(ESState.start(torch.zeros(20), config), config, flaky)
    assert state.history[0]["failed"] == 1 and state.history[0]["evaluated"] == 6
    members = calls[0]
    eps = (members - 0.0) / config.sigma
    fit = torch.tensor(quadratic(members))
    keep = [0, 2, 3, 4, 5]
    expected = (fit[keep].unsqueeze(1) * eps[keep]).sum(0) / (5 * config.sigma)
    assert torch.allclose(state.phi, config.step_size * expected)


def test_no_improvement_keeps_phi_reuses_elites_and_stops_on_patience():
    config = ESConfig(population=8, patience=3, iterations=50, elite_frac=0.25)
    state = ESState.start(torch.full((20,), 0.2), config)
    state = es_iteration(state, config, lambda m: [1.0] * m.shape[0])  # first iteration always improves on -inf
    phi = state.phi.clone()
    state = run(state, config, lambda m: [0.0] * m.shape[0], 3)  # never better than 1.0
    assert torch.equal(state.phi, phi)
    assert len(state.elites) == 2  # 25% of the population of 8
    # elites fill part of the population: 8 fresh members once, then 6 fresh + 2 reused
    assert [h["evaluated"] for h in state.history] == [8, 8, 6, 6]
    assert state.done and state.iteration == 4


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    config = ESConfig(seed=7)
    uninterrupted = run(ESState.start(torch.zeros(20), config), config, quadratic, 8)
    half = run(ESState.start(torch.zeros(20), config), config, quadratic, 4)
    torch.save(half.state_dict(), tmp_path / "es.pt")
    resumed = ESState.from_state_dict(torch.load(tmp_path / "es.pt", weights_only=True))
    resumed = run(resumed, config, quadratic, 4)
    assert torch.equal(resumed.phi, uninterrupted.phi)
    assert resumed.history == uninterrupted.history


def test_projection_keeps_parameters_non_negative():
    config = ESConfig(sigma=0.5, step_size=1.0, min_improvement=-1e9)
    state = run(ESState.start(torch.zeros(20), config), config, lambda m: (-m.sum(1)).tolist(), 3)
    assert bool((state.phi >= 0).all())


def test_bad_config():
    with pytest.raises(ValueError, match="even"):
        ESConfig(population=5)
