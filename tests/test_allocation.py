"""Rollout allocation (ebpo.allocation): exact budgets, brute-force optima, Beta maths, skip's exploration, state.

Oracles are independent of the module: brute-force enumeration of every allowed size vector, the
informative-group probability as a binomial sum, the Beta-Binomial pmf from math.lgamma, and Monte
Carlo draws of the Beta posterior, all in float64.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ebpo.allocation import (
    ALLOCATORS,
    AllocationRequest,
    beta_moments,
    between_prompt_variance,
    build_allocator,
    expected_informative_prob,
    fit_beta_prior,
    max_plus_allocate,
)
from ebpo.estimators import stable_prompt_ids

NAMES = ["uniform", "skip", "knapsack", "eb"]


# ---------------------------------------------------------------------------------------------------------------
# Independent oracles


def informative_binomial(p: float, n: int) -> float:
    """P(0 < S < n), S ~ Binomial(n, p), summed term by term."""
    return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(1, n))


def log_beta(x: float, y: float) -> float:
    return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)


def informative_beta_binomial(a: float, b: float, n: int) -> float:
    """P(0 < S < n), S ~ BetaBinomial(n, a, b), from the pmf C(n, k) B(k + a, n - k + b) / B(a, b)."""
    if n < 2:
        return 0.0
    return sum(math.comb(n, k) * math.exp(log_beta(k + a, n - k + b) - log_beta(a, b)) for k in range(1, n))


def within_variance_binomial(p: float, n: int) -> float:
    """E[rbar (1 - rbar)] for the mean rbar = S / n of n Bernoulli(p) rewards: sum over k of k (n - k) / n^2 times
    the binomial pmf (0 for n = 0)."""
    if n == 0:
        return 0.0
    return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) * k * (n - k) / n**2 for k in range(n + 1))


def within_variance_beta_binomial(a: float, b: float, n: int) -> float:
    """E[rbar (1 - rbar)] for a group of n, S ~ BetaBinomial(n, a, b): the pmf times k (n - k) / n^2 (0 for n = 0)."""
    if n == 0:
        return 0.0
    return sum(
        math.comb(n, k) * math.exp(log_beta(k + a, n - k + b) - log_beta(a, b)) * k * (n - k) / n**2
        for k in range(n + 1)
    )


def moment_prior(mean: float, var: float) -> tuple[float, float]:
    """Beta(a, b) by moments, written from the Beta's mean m = a / (a + b) and variance m (1 - m) / (a + b + 1)."""
    concentration = mean * (1 - mean) / var - 1
    return mean * concentration, (1 - mean) * concentration


def brute_force(value, num_prompts: int, budget: int, min_size: int, max_size: int):
    """(best value, one best size tuple) over every size vector with sizes in {0} u [min, max] summing to budget."""
    allowed = [0, *range(min_size, max_size + 1)]
    best, arg = -math.inf, None
    for sizes in itertools.product(allowed, repeat=num_prompts):
        if sum(sizes) == budget:
            total = sum(value(i, n) for i, n in enumerate(sizes))
            if total > best + 1e-15:
                best, arg = total, sizes
    return best, arg


def feasible(num_prompts: int, budget: int, min_size: int, max_size: int) -> bool:
    return any(k * min_size <= budget <= k * max_size for k in range(1, num_prompts + 1))


def simulate_outcomes(step: int, prompt_ids: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Deterministic successes for the sampled groups: prompt difficulty from its id, noise from (step, id)."""
    gen = torch.Generator().manual_seed(1000 + step)
    difficulty = (prompt_ids % 7).double() / 6.0  # (P,) 0 = always solved ... 1 = never
    draws = torch.rand(int(sizes.sum()), generator=gen, dtype=torch.float64)
    solved = (draws > torch.repeat_interleave(difficulty, sizes)).double()
    owner = torch.repeat_interleave(torch.arange(prompt_ids.numel()), sizes)
    return torch.zeros(prompt_ids.numel(), dtype=torch.float64).index_add_(0, owner, solved)


def run_steps(allocator, steps: range, prompt_ids: torch.Tensor, budget: int) -> list[torch.Tensor]:
    out = []
    for step in steps:
        ids = prompt_ids.roll(step)  # the candidate order changes between steps
        sizes, _ = allocator.allocate(AllocationRequest(ids, budget, prior_mean=0.4, prior_var=0.06))
        sampled = sizes > 0
        allocator.observe(ids[sampled], simulate_outcomes(step, ids, sizes)[sampled], sizes[sampled].double())
        out.append(sizes)
    return out


def save_load(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---------------------------------------------------------------------------------------------------------------
# Exact budget, allowed sizes, feasibility


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    num_prompts=st.integers(1, 12),
    min_size=st.integers(1, 3),
    extra=st.integers(0, 6),
    budget=st.integers(0, 60),
    history_seed=st.integers(0, 10_000),
)
def test_every_allocator_spends_exactly_the_budget(name, num_prompts, min_size, extra, budget, history_seed):
    max_size = min_size + extra
    allocator = build_allocator(name, min_group_size=min_size, max_group_size=max_size)
    gen = torch.Generator().manual_seed(history_seed)
    ids = torch.randint(0, 20, (num_prompts,), generator=gen)
    trials = torch.randint(1, 9, (num_prompts,), generator=gen).double()
    successes = (torch.rand(num_prompts, generator=gen, dtype=torch.float64) * (trials + 1)).floor().clamp_max(trials)
    allocator.observe(ids, successes, trials)
    request = AllocationRequest(ids, budget, prior_mean=0.3, prior_var=0.05)
    if not feasible(num_prompts, budget, min_size, max_size):
        with pytest.raises(ValueError, match="budget"):
            allocator.allocate(request)
        return
    sizes, metrics = allocator.allocate(request)
    assert sizes.dtype == torch.long and sizes.shape == (num_prompts,)
    assert int(sizes.sum()) == budget == metrics["alloc/samples"]
    assert bool(((sizes == 0) | ((sizes >= min_size) & (sizes <= max_size))).all()), sizes


def test_uniform_splits_evenly_remainder_first():
    uniform = build_allocator("uniform", min_group_size=2, max_group_size=8)
    sizes, _ = uniform.allocate(AllocationRequest(torch.arange(5), 13))
    assert sizes.tolist() == [3, 3, 3, 2, 2]
    sizes, _ = uniform.allocate(AllocationRequest(torch.arange(5), 7))  # too few for every prompt: the first 3
    assert sizes.tolist() == [3, 2, 2, 0, 0]


# ---------------------------------------------------------------------------------------------------------------
# Exact optimum (knapsack, eb) against brute force


@settings(max_examples=40, deadline=None)
@given(
    num_prompts=st.integers(1, 4),
    min_size=st.integers(1, 3),
    extra=st.integers(0, 3),
    budget=st.integers(1, 16),
    seed=st.integers(0, 10_000),
)
def test_max_plus_allocate_is_the_brute_force_optimum_for_any_values(num_prompts, min_size, extra, budget, seed):
    """Arbitrary (non-concave) values with forbidden sizes: the tree DP finds the enumerated optimum."""
    max_size = min_size + extra
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(num_prompts, max_size + 1, generator=gen, dtype=torch.float64)
    values[:, 0] = 0.0
    values[:, 1:min_size] = -math.inf
    best, _ = brute_force(lambda i, n: float(values[i, n]), num_prompts, budget, min_size, max_size)
    if best == -math.inf:
        with pytest.raises(ValueError, match="no allowed group sizes"):
            max_plus_allocate(values, budget)
        return
    sizes = max_plus_allocate(values, budget)
    assert int(sizes.sum()) == budget
    assert float(values.gather(1, sizes[:, None]).sum()) == pytest.approx(best, abs=1e-12)


def _history_instance(seed: int, num_prompts: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.arange(num_prompts) * 11 + 3
    trials = torch.randint(0, 7, (num_prompts,), generator=gen).double()  # 0: a prompt never seen
    successes = (torch.rand(num_prompts, generator=gen, dtype=torch.float64) * (trials + 1)).floor().clamp_max(trials)
    return ids, successes, trials


@settings(max_examples=40, deadline=None)
@given(
    num_prompts=st.integers(1, 4),
    budget=st.integers(2, 18),
    seed=st.integers(0, 10_000),
    info_gain=st.booleans(),
    value=st.sampled_from(["groups", "samples", "variance"]),
)
def test_knapsack_is_the_brute_force_optimum(num_prompts, budget, seed, info_gain, value):
    min_size, max_size = 2, 6
    if not feasible(num_prompts, budget, min_size, max_size) or (info_gain and value == "variance"):
        return
    ids, successes, trials = _history_instance(seed, num_prompts)
    knapsack = build_allocator(
        "knapsack", min_group_size=min_size, max_group_size=max_size, info_gain=info_gain, value=value
    )
    seen = trials > 0
    knapsack.observe(ids[seen], successes[seen], trials[seen])
    prior_mean = 0.35
    rate = [float(s / t) if t > 0 else prior_mean for s, t in zip(successes, trials, strict=True)]

    def objective(i, n):  # the paper's InfoGain(p) = p (1 - p)^2 as a weight when asked; n of them: samples
        if value == "variance":
            return within_variance_binomial(rate[i], n)
        weight = (rate[i] * (1 - rate[i]) ** 2 if info_gain else 1.0) * (n if value == "samples" else 1)
        return informative_binomial(rate[i], n) * weight

    best, _ = brute_force(objective, num_prompts, budget, min_size, max_size)
    sizes, metrics = knapsack.allocate(AllocationRequest(ids, budget, prior_mean=prior_mean))
    assert sum(objective(i, int(n)) for i, n in enumerate(sizes)) == pytest.approx(best, abs=1e-12)
    assert metrics["alloc/expected_informative"] == pytest.approx(best, abs=1e-12)


def mixed_samples_beta_binomial(a: float, b: float, n: int) -> float:
    """E[samples in a mixed group of n] = sum over the successes k of n 1{0 < k < n} times the pmf, k = 0..n."""
    return sum(
        n * (0 < k < n) * math.comb(n, k) * math.exp(log_beta(k + a, n - k + b) - log_beta(a, b)) for k in range(n + 1)
    )


@settings(max_examples=40, deadline=None)
@given(
    num_prompts=st.integers(1, 4),
    budget=st.integers(2, 18),
    seed=st.integers(0, 10_000),
    value=st.sampled_from(["groups", "samples", "variance"]),
)
def test_eb_is_the_brute_force_optimum_of_the_beta_binomial_objective(num_prompts, budget, seed, value):
    min_size, max_size = 2, 6
    if not feasible(num_prompts, budget, min_size, max_size):
        return
    ids, successes, trials = _history_instance(seed, num_prompts)
    eb = build_allocator("eb", min_group_size=min_size, max_group_size=max_size, value=value)
    seen = trials > 0
    eb.observe(ids[seen], successes[seen], trials[seen])
    prior_mean, prior_var = 0.3, 0.04
    a, b = moment_prior(prior_mean, prior_var)
    oracle = {
        "groups": informative_beta_binomial,
        "samples": mixed_samples_beta_binomial,
        "variance": within_variance_beta_binomial,
    }[value]

    def objective(i, n):
        return oracle(a + float(successes[i]), b + float(trials[i] - successes[i]), n)

    best, _ = brute_force(objective, num_prompts, budget, min_size, max_size)
    sizes, metrics = eb.allocate(AllocationRequest(ids, budget, prior_mean=prior_mean, prior_var=prior_var))
    assert sum(objective(i, int(n)) for i, n in enumerate(sizes)) == pytest.approx(best, abs=1e-12)
    assert metrics["alloc/expected_informative"] == pytest.approx(best, abs=1e-12)


def test_greedy_marginal_gain_is_not_optimal_but_the_allocator_is():
    """Two prompts, budget 4, groups of 2..6: p = 0.5 (q = p(1-p) = 0.25) and q = 0.2.

    Greedy by gain per sample opens A (q_A per sample), adds a 3rd (q_A) and 4th (q_A (1 - 2 q_A)) sample
    to A: value 4 q_A - 2 q_A^2 = 0.875. Two groups of 2 give 2 q_A + 2 q_B = 0.9.
    """
    p_b = (1 - math.sqrt(1 - 4 * 0.2)) / 2
    rates = [0.5, p_b]

    def value(i, n):
        return informative_binomial(rates[i], n)

    def greedy(budget):  # an oracle of the greedy rule, to show it fails here
        sizes = [0, 0]
        while budget:
            moves = []
            for i in range(2):
                step = 2 if sizes[i] == 0 else 1
                if step <= budget and sizes[i] + step <= 6:
                    moves.append(((value(i, sizes[i] + step) - value(i, sizes[i])) / step, -i, step))
            _, neg_i, step = max(moves)
            sizes[-neg_i] += step
            budget -= step
        return sizes

    assert greedy(4) == [4, 0]
    best, arg = brute_force(value, 2, 4, 2, 6)
    assert arg == (2, 2) and best == pytest.approx(0.9) and value(0, 4) == pytest.approx(0.875)
    knapsack = build_allocator("knapsack", max_group_size=6)
    knapsack.observe(torch.tensor([1, 2]), torch.tensor([5e5, p_b * 1e6]), torch.tensor([1e6, 1e6]))
    sizes, _ = knapsack.allocate(AllocationRequest(torch.tensor([1, 2]), 4))
    assert sizes.tolist() == [2, 2]


def test_eb_moves_samples_from_settled_prompts_to_uncertain_ones():
    """A prompt solved 300/300 times is worth less than one never seen or one at 50%: eb gives it the least.

    (At 30/30 it gets the most: its posterior still allows a failure, and a group must be large to
    catch one, while a 50% prompt's informative probability saturates by n = 6; docs/allocation.md.)
    """
    eb = build_allocator("eb", max_group_size=16)
    eb.observe(torch.tensor([10, 11]), torch.tensor([300.0, 150.0]), torch.tensor([300.0, 300.0]))
    ids = torch.tensor([10, 11, 12])  # settled, uncertain, unseen
    sizes, metrics = eb.allocate(AllocationRequest(ids, 24, prior_mean=0.5, prior_var=0.05))
    assert sizes[0] < sizes[1] and sizes[0] < sizes[2], sizes
    assert metrics["alloc/expected_informative"] > metrics["alloc/expected_informative_uniform"]


# ---------------------------------------------------------------------------------------------------------------
# Beta maths in float64


def test_beta_prior_by_moments_recovers_mean_and_variance():
    mean, var = torch.tensor([0.1, 0.5, 0.83]), torch.tensor([0.02, 1 / 12, 0.1])
    a, b = fit_beta_prior(mean, var)
    fitted_var = a * b / ((a + b) ** 2 * (a + b + 1))
    torch.testing.assert_close(a / (a + b), mean.double(), rtol=0, atol=1e-12)
    torch.testing.assert_close(fitted_var, var.double(), rtol=1e-12, atol=0)
    a0, b0 = fit_beta_prior(0.5, 0.0)  # no spread: a near point mass, still a valid Beta
    assert float(a0) == float(b0) > 1e5


def test_beta_moments_closed_form_and_monte_carlo():
    a, b = torch.tensor([0.7, 3.0, 12.5], dtype=torch.float64), torch.tensor([2.2, 3.0, 0.9], dtype=torch.float64)
    moments = beta_moments(a, b, 8)  # (3, 9)
    for i in range(3):
        for n in range(9):
            closed = math.exp(log_beta(float(a[i]) + n, float(b[i])) - log_beta(float(a[i]), float(b[i])))
            assert float(moments[i, n]) == pytest.approx(closed, rel=1e-12)
    gen = torch.Generator().manual_seed(0)
    # Beta draws as a Gamma ratio from a seeded generator: X / (X + Y), X ~ Gamma(a), Y ~ Gamma(b).
    draws = 400_000
    x = torch._standard_gamma(a.repeat(draws, 1), generator=gen)  # (draws, 3)
    y = torch._standard_gamma(b.repeat(draws, 1), generator=gen)
    p = x / (x + y)
    n = torch.arange(9, dtype=torch.float64)
    samples = 1 - p[..., None] ** n - (1 - p[..., None]) ** n  # (draws, 3, 9)
    samples[..., 0] = 0
    mc_mean, mc_se = samples.mean(0), samples.std(0) / math.sqrt(draws)
    exact = expected_informative_prob(a, b, 8)
    assert bool(((exact - mc_mean).abs() <= 5 * mc_se + 1e-12).all()), (exact - mc_mean) / (mc_se + 1e-300)
    for i in range(3):
        for k in range(9):
            oracle = informative_beta_binomial(float(a[i]), float(b[i]), k)
            assert float(exact[i, k]) == pytest.approx(oracle, abs=1e-12)


def test_between_prompt_variance_removes_the_binomial_noise():
    gen = torch.Generator().manual_seed(3)
    prompts, group = 200_000, 4
    x = torch._standard_gamma(torch.full((prompts,), 2.0, dtype=torch.float64), generator=gen)
    y = torch._standard_gamma(torch.full((prompts,), 3.0, dtype=torch.float64), generator=gen)
    p = x / (x + y)
    means = (torch.rand(prompts, group, generator=gen, dtype=torch.float64) < p[:, None]).double().mean(1)
    tau2, mu = float(means.var(unbiased=False)), float(means.mean())
    true_var = 2 * 3 / (5**2 * 6)  # Var of Beta(2, 3) = 0.04
    assert tau2 > 1.5 * true_var  # the raw tau^2 is far off
    assert between_prompt_variance(tau2, mu, group) == pytest.approx(true_var, rel=0.03)
    # per prompt (topic priors): the tensor form is the float form element by element, floored at 0 alike
    tau2s, mus = torch.tensor([tau2, 0.01, 0.3]), torch.tensor([mu, 0.5, 0.2])
    each = [between_prompt_variance(float(t), float(m), group) for t, m in zip(tau2s, mus)]
    assert between_prompt_variance(tau2s, mus, group).tolist() == pytest.approx(each, rel=1e-15) and each[1] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# skip: GRESO-style filtering with exploration


def test_skip_skips_all_equal_prompts_and_explores_them_back():
    ids = stable_prompt_ids([f"q{i}" for i in range(8)])
    never = build_allocator("skip", explore_prob=0.0, max_group_size=16)
    never.observe(ids[:4], torch.tensor([0.0, 4.0, 0.0, 4.0]), torch.full((4,), 4.0))  # all-equal groups
    never.observe(ids[4:], torch.full((4,), 2.0), torch.full((4,), 4.0))  # mixed groups
    sizes, metrics = never.allocate(AllocationRequest(ids, 32))
    assert sizes[:4].tolist() == [0, 0, 0, 0] and sizes[4:].tolist() == [8, 8, 8, 8]
    assert metrics["alloc/predicted_equal"] == 4 and metrics["alloc/explored"] == 0
    explorer = build_allocator("skip", explore_prob=0.3, max_group_size=16, seed=7)
    explorer.load_state_dict({**never.state_dict(), "generator": explorer.generator.get_state()})
    visits = torch.zeros(8)
    steps = 200
    for _ in range(steps):
        sizes, _ = explorer.allocate(AllocationRequest(ids, 32))
        visits += (sizes > 0).double()
    assert visits[4:].tolist() == [steps] * 4
    assert bool((visits[:4] > 0).all()), "every skipped prompt must be revisited"
    assert float(visits[:4].mean()) / steps == pytest.approx(0.3, abs=0.06)
    # A revisited prompt that now gives a mixed group leaves the skip list.
    explorer.observe(ids[:1], torch.tensor([1.0]), torch.tensor([4.0]))
    explorer.explore_prob = 0.0
    sizes, _ = explorer.allocate(AllocationRequest(ids, 30))
    assert sizes[0] > 0 and sizes[1:4].tolist() == [0, 0, 0]


def test_skip_keeps_enough_prompts_to_take_the_budget():
    skip = build_allocator("skip", explore_prob=0.0, max_group_size=4)
    ids = torch.arange(4)
    skip.observe(ids[:3], torch.zeros(3), torch.full((3,), 4.0))
    sizes, _ = skip.allocate(AllocationRequest(ids, 12))  # 1 kept prompt takes at most 4: 2 skipped come back
    assert int(sizes.sum()) == 12 and sizes.tolist() == [4, 4, 0, 4]


# ---------------------------------------------------------------------------------------------------------------
# State: round trip, resume == uninterrupted, determinism (the stand-in for data-parallel ranks)


@pytest.mark.parametrize("name", NAMES)
def test_resume_equals_uninterrupted(name):
    ids = stable_prompt_ids([f"prompt-{i}" for i in range(9)])
    options = {"max_group_size": 12, "decay": 0.9}
    whole = build_allocator(name, **options)
    expected = run_steps(whole, range(8), ids, 40)
    first = build_allocator(name, **options)
    run_steps(first, range(4), ids, 40)
    resumed = build_allocator(name, **options)
    resumed.load_state_dict(save_load(copy.deepcopy(first.state_dict())))
    got = run_steps(resumed, range(4, 8), ids, 40)
    for step, (want, have) in enumerate(zip(expected[4:], got, strict=True), start=4):
        assert torch.equal(want, have), f"{name} step {step}: {want.tolist()} != {have.tolist()}"
    assert resumed.state_dict().keys() == whole.state_dict().keys()
    for key, value in whole.state_dict()["history"].items():
        assert torch.equal(value, resumed.state_dict()["history"][key]), key
    if name != "uniform":  # the history changed the allocation at some step, so the resume was tested
        assert any(not torch.equal(s, expected[0].roll(i)) for i, s in enumerate(expected))


_OTHER_PROCESS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_allocation import NAMES, build_allocator, run_steps, stable_prompt_ids
ids = stable_prompt_ids([f"p{i}" for i in range(10)])
out = {}
for name in NAMES:
    allocator = build_allocator(name, **({"seed": 5} if name == "skip" else {}))
    out[name] = [sizes.tolist() for sizes in run_steps(allocator, range(6), ids, 36)]
print(json.dumps(out))
"""


def test_another_process_allocates_alike():
    """What data-parallel ranks are: separate processes (another pid, another str hash seed), each with its own
    allocator fed the same calls. Every allocator must return the same sizes there as here."""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    child = subprocess.run(
        [sys.executable, "-c", _OTHER_PROCESS, str(pathlib.Path(__file__).parent)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )
    there = json.loads(child.stdout.strip().splitlines()[-1])
    ids = stable_prompt_ids([f"p{i}" for i in range(10)])
    for name in NAMES:
        allocator = build_allocator(name, **({"seed": 5} if name == "skip" else {}))
        here = [sizes.tolist() for sizes in run_steps(allocator, range(6), ids, 36)]
        assert here == there[name], name


@pytest.mark.parametrize("name", NAMES)
def test_two_instances_given_the_same_calls_agree(name):
    ids = stable_prompt_ids([f"p{i}" for i in range(10)])
    options = {"seed": 5} if name == "skip" else {}
    one, two = build_allocator(name, **options), build_allocator(name, **options)
    for a, b in zip(run_steps(one, range(6), ids, 36), run_steps(two, range(6), ids, 36), strict=True):
        assert torch.equal(a, b)


def test_state_from_another_allocator_or_incomplete_is_refused():
    eb, skip = build_allocator("eb"), build_allocator("skip")
    with pytest.raises(ValueError, match="saved by 'eb'"):
        skip.load_state_dict(eb.state_dict())
    state = skip.state_dict()
    del state["generator"]
    with pytest.raises(ValueError, match="generator"):
        skip.load_state_dict(state)
    broken = eb.state_dict()
    broken["history"] = {"keys": torch.tensor([3, 1]), "successes": torch.zeros(2), "trials": torch.ones(2)}
    with pytest.raises(ValueError, match="streak"):
        eb.load_state_dict(broken)
    broken["history"]["streak"] = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="sorted"):
        eb.load_state_dict(broken)


# ---------------------------------------------------------------------------------------------------------------
# Errors and the registry


@pytest.mark.parametrize(
    ("request_kwargs", "match"),
    [
        ({"budget": 1}, "smaller than min_group_size"),
        ({"budget": 0}, "smaller than min_group_size"),
        ({"budget": 8.0}, "integer number of samples"),
        ({"budget": True}, "integer number of samples"),
        ({"budget": 200}, "cannot be split"),
        ({"budget": 8, "prior_mean": math.nan}, "prior_mean must be finite"),
        ({"budget": 8, "prior_mean": 1.5}, r"\[0, 1\]"),
        ({"budget": 8, "prior_var": -0.1}, "prior_var must be >= 0"),
        ({"budget": 8, "prior_var": torch.ones(3)}, "shape"),
        ({"budget": 8, "prompt_ids": torch.zeros(2, 2, dtype=torch.long)}, "1-D"),
        ({"budget": 8, "prompt_ids": torch.zeros(4)}, "integer ids"),
        ({"budget": 8, "prompt_ids": torch.zeros(0, dtype=torch.long)}, "at least one candidate"),
    ],
)
@pytest.mark.parametrize("name", ["knapsack", "eb"])
def test_bad_requests_raise_clear_errors(name, request_kwargs, match):
    kwargs = {"prompt_ids": torch.arange(4), "prior_mean": 0.5, "prior_var": 0.05, **request_kwargs}
    with pytest.raises(ValueError, match=match):
        build_allocator(name, max_group_size=16).allocate(AllocationRequest(**kwargs))


@pytest.mark.parametrize("name", NAMES)
def test_every_allocator_refuses_a_budget_below_one_group(name):
    with pytest.raises(ValueError, match="smaller than min_group_size 3"):
        build_allocator(name, min_group_size=3).allocate(AllocationRequest(torch.arange(5), 2))


@pytest.mark.parametrize(
    ("successes", "trials", "match"),
    [
        ([math.nan, 1.0], [4.0, 4.0], "finite"),
        ([-1.0, 1.0], [4.0, 4.0], r"\[0, trials\]"),
        ([5.0, 1.0], [4.0, 4.0], r"\[0, trials\]"),
        ([0.0, 1.0], [0.0, 4.0], "integers >= 1"),
        ([0.0, 1.0], [2.5, 4.0], "integers >= 1"),
        ([0.0], [4.0, 4.0], "one shape"),
    ],
)
def test_bad_observations_raise_and_leave_the_history(successes, trials, match):
    eb = build_allocator("eb")
    before = eb.state_dict()
    with pytest.raises(ValueError, match=match):
        eb.observe(torch.tensor([1, 2]), torch.tensor(successes), torch.tensor(trials))
    assert eb.state_dict()["history"]["keys"].numel() == before["history"]["keys"].numel() == 0


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"min_group_size": 0}, "positive integer"),
        ({"min_group_size": 4, "max_group_size": 3}, "below min_group_size"),
        ({"decay": 0.0}, "decay"),
        ({"nope": 1}, "bad options"),
        ({"value": "gradient"}, "value must be one of groups, samples, variance"),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        build_allocator("eb", **options)
    with pytest.raises(ValueError, match="info_gain weighs the informative-group count"):
        build_allocator("knapsack", info_gain=True, value="variance")
    with pytest.raises(ValueError, match="explore_prob"):
        build_allocator("skip", explore_prob=1.5)


def test_registry_names_and_import_paths():
    assert ALLOCATORS.names() == sorted(NAMES)
    built = build_allocator("ebpo.allocation:EmpiricalBayes", max_group_size=8)
    assert built.max_group_size == 8
    with pytest.raises(ValueError, match="unknown rollout allocation"):
        build_allocator("greso")


def test_history_decays_old_outcomes_and_sums_groups_of_one_prompt():
    eb = build_allocator("eb", decay=0.5)
    eb.observe(torch.tensor([7, 3]), torch.tensor([4.0, 0.0]), torch.tensor([4.0, 4.0]))
    eb.observe(torch.tensor([7, 7]), torch.tensor([1.0, 3.0]), torch.tensor([4.0, 4.0]))  # two groups of prompt 7
    history = eb.state_dict()["history"]
    assert history["keys"].tolist() == [3, 7]
    assert history["successes"].tolist() == [0.0, 0.5 * 4 + 1 + 3]
    assert history["trials"].tolist() == [0.5 * 4, 0.5 * 4 + 8]
    assert history["streak"].tolist() == [1, 0]  # prompt 3 unobserved keeps its streak; 7 had a mixed group


@pytest.mark.parametrize(("num_prompts", "budget"), [(5, 17), (5, 40), (3, 7), (128, 1000)])
def test_prompts_the_values_cannot_tell_apart_share_the_budget_evenly(num_prompts, budget):
    """Every prompt solved every time: knapsack's values are all 0, and the exact tie goes to the even split."""
    knapsack = build_allocator("knapsack")
    ids = torch.arange(num_prompts)
    knapsack.observe(ids, torch.full((num_prompts,), 4.0), torch.full((num_prompts,), 4.0))
    sizes, _ = knapsack.allocate(AllocationRequest(ids, budget))
    assert int(sizes.sum()) == budget and int(sizes.max() - sizes.min()) <= 1, sizes.tolist()


def test_docstring_examples():
    import doctest

    import ebpo.allocation

    result = doctest.testmod(ebpo.allocation, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0


# ---------------------------------------------------------------------------------------------------------------
# Top-ups after a first round (ebpo train --allocation-first-round)


def beta_binomial_pmf(k: int, n: int, a: float, b: float) -> float:
    return math.comb(n, k) * math.exp(log_beta(k + a, n - k + b) - log_beta(a, b))


def top_up_samples_gain(first_s: int, first_t: int, a: float, b: float, m: int) -> float:
    """What m more completions add to the expected samples in mixed groups: E[(t + m) 1{mixed after}] minus
    t 1{mixed before}, summed over the successes k among the m (posterior a, b)."""
    before = first_t * (0 < first_s < first_t)
    after = sum((first_t + m) * (0 < first_s + k < first_t + m) * beta_binomial_pmf(k, m, a, b) for k in range(m + 1))
    return after - before


def top_up_gain(first_s: int, first_t: int, a: float, b: float, m: int) -> float:
    """What m more completions add to P(the group is mixed), from the Beta-Binomial pmf of the m (posterior a, b)."""
    if 0 < first_s < first_t or m == 0:
        return 0.0  # already mixed, or nothing added
    if first_s == 0:  # mixed iff at least one of the m succeeds
        return sum(beta_binomial_pmf(k, m, a, b) for k in range(1, m + 1))
    return sum(beta_binomial_pmf(k, m, a, b) for k in range(0, m))  # at least one fails


@settings(max_examples=40, deadline=None)
@given(
    num_prompts=st.integers(1, 4),
    extra=st.integers(0, 12),
    seed=st.integers(0, 10_000),
    name=st.sampled_from(["eb", "knapsack"]),
    objective=st.sampled_from(["groups", "samples", "variance"]),
)
def test_top_up_is_the_brute_force_optimum_of_the_gain_in_mixed_groups(num_prompts, extra, seed, name, objective):
    """After a first round of 2 each (observed), the extra budget goes where it most raises the expected number
    of mixed groups (or of samples in them, or the within-group reward variance of a group of the new size under
    the updated belief); each prompt's gain from an independent pmf sum, the optimum by enumeration."""
    min_size, max_size, first = 2, 6, 2
    gen = torch.Generator().manual_seed(seed)
    ids = stable_prompt_ids([f"q{seed}-{i}" for i in range(num_prompts)])
    first_s = torch.randint(0, first + 1, (num_prompts,), generator=gen).double()
    first_t = torch.full((num_prompts,), float(first), dtype=torch.float64)
    ids_hist, successes, trials = _history_instance(seed, num_prompts)
    allocator = build_allocator(name, min_group_size=min_size, max_group_size=max_size, value=objective)
    seen = trials > 0
    allocator.observe(ids[seen], successes[seen], trials[seen])  # an older history of the same prompts
    allocator.observe(ids, first_s, first_t)  # then this step's first round
    budget = min(extra, num_prompts * (max_size - first))
    prior_mean, prior_var = 0.3, 0.04
    a0, b0 = moment_prior(prior_mean, prior_var)
    s_all = successes + first_s
    t_all = trials + first_t

    def value(i, m):
        if name == "eb":
            a, b = a0 + float(s_all[i]), b0 + float(t_all[i] - s_all[i])
        else:  # knapsack's point estimate p, as a Beta of huge concentration (the pmf tends to the binomial)
            p = float(s_all[i] / t_all[i])
            if objective == "variance":
                return within_variance_binomial(p, first + m) - within_variance_binomial(p, first)
            if objective == "samples":
                return sum(
                    (first + m) * (0 < int(first_s[i]) + k < first + m) * math.comb(m, k) * p**k * (1 - p) ** (m - k)
                    for k in range(m + 1)
                ) - first * (0 < int(first_s[i]) < first)
            if 0 < first_s[i] < first or m == 0:
                return 0.0
            return 1 - (1 - p) ** m if first_s[i] == 0 else 1 - p**m
        if objective == "variance":
            return within_variance_beta_binomial(a, b, first + m) - within_variance_beta_binomial(a, b, first)
        gain = top_up_samples_gain if objective == "samples" else top_up_gain
        return gain(int(first_s[i]), first, a, b, m)

    best, _ = brute_force(value, num_prompts, budget, 1, max_size - first)
    request = AllocationRequest(ids, budget, prior_mean=prior_mean, prior_var=prior_var)
    sizes, metrics = allocator.top_up(request, first_s, first_t)
    assert int(sizes.sum()) == budget and bool((sizes <= max_size - first).all())
    assert sum(value(i, int(m)) for i, m in enumerate(sizes)) == pytest.approx(best, abs=1e-12)
    assert metrics["alloc/expected_informative_gain"] == pytest.approx(best, abs=1e-12)


def test_top_up_refuses_bad_first_rounds_and_budgets():
    eb = build_allocator("eb", min_group_size=2, max_group_size=4)
    ids = stable_prompt_ids(["a", "b"])
    request = AllocationRequest(ids, 3)
    two = torch.tensor([2.0, 2.0])
    with pytest.raises(ValueError, match="room left under max_group_size"):
        eb.top_up(AllocationRequest(ids, 5), torch.tensor([0.0, 1.0]), two)
    with pytest.raises(ValueError, match="first group must hold"):
        eb.top_up(request, torch.tensor([0.0, 1.0]), torch.tensor([5.0, 2.0]))
    sizes, _ = eb.top_up(request, torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0]))  # one of the first 2 dropped
    assert int(sizes.sum()) == 3 and int(sizes[0]) <= 3
    with pytest.raises(ValueError, match=r"first_successes must lie in \[0, first_trials\]"):
        eb.top_up(request, torch.tensor([3.0, 1.0]), two)
    assert not hasattr(build_allocator("skip"), "top_up") and not hasattr(build_allocator("uniform"), "top_up")


def test_the_variance_value_spreads_top_ups_where_the_sample_count_piles_them_up():
    """Eight prompts alike (no history, the same prior), each with a first group of 2, one success each: a top-up
    budget of 8 under ``variance`` gives every prompt one more (its gains v / (n (n + 1)) fall with n), where
    ``samples`` (worth one per sample for a mixed group, ties spread evenly) is indifferent and ``groups`` (a
    mixed group is worth nothing more) too; the variance objective is the only one that prefers the spread."""
    ids = stable_prompt_ids([f"alike-{i}" for i in range(8)])
    first_s, first_t = torch.ones(8, dtype=torch.float64), torch.full((8,), 2.0, dtype=torch.float64)
    eb = build_allocator("eb", min_group_size=2, max_group_size=8, value="variance")
    eb.observe(ids, first_s, first_t)
    request = AllocationRequest(ids, 8, prior_mean=0.5, prior_var=0.05)
    sizes, metrics = eb.top_up(request, first_s, first_t)
    assert sizes.tolist() == [1] * 8
    a, b = moment_prior(0.5, 0.05)
    a, b = a + 1, b + 1
    one_more = within_variance_beta_binomial(a, b, 3) - within_variance_beta_binomial(a, b, 2)
    assert metrics["alloc/expected_informative_gain"] == pytest.approx(8 * one_more, rel=1e-12)
    piled = torch.tensor([6, 2, 0, 0, 0, 0, 0, 0])
    gain_piled = sum(
        within_variance_beta_binomial(a, b, 2 + int(m)) - within_variance_beta_binomial(a, b, 2) for m in piled
    )
    assert gain_piled < 8 * one_more
