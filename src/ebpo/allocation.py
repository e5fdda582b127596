"""Rollout allocation: how many completions each candidate prompt of a step gets.

Every allocator is built by :func:`build_allocator` and called the same way::

    allocator = build_allocator("eb", min_group_size=2, max_group_size=16)
    request = AllocationRequest(prompt_ids=stable_prompt_ids(keys), budget=512, prior_mean=0.4, prior_var=0.05)
    group_sizes, metrics = allocator.allocate(request)  # (P,) int64, sum == 512, 0 = prompt skipped
    ...  # generate group_sizes[i] completions of prompt i, score them
    allocator.observe(request.prompt_ids, successes, trials)  # (Q,) each: what each sampled group got

``prompt_ids`` are the stable keys of :func:`ebpo.estimators.stable_prompt_ids`
(the same id on every rank and after a resume), so the per-prompt history an
allocator keeps is keyed the way the per-prompt estimators key theirs.
Every allocator spends exactly ``budget`` samples, gives each prompt either 0
or between ``min_group_size`` and ``max_group_size`` samples, and is a pure
function of its inputs and its state (which :meth:`Allocator.state_dict`
saves): two instances fed the same calls return identical sizes, so
data-parallel ranks that each run one stay in step.

Strategies (registry :data:`ALLOCATORS`):

* ``uniform``: the budget split evenly, remainder to the first prompts.
* ``skip``: GRESO-style (arXiv 2506.02177) pre-rollout filtering: a prompt
  whose last ``skip_after`` observed groups were all-equal (every completion
  right or every one wrong) is skipped, except with probability
  ``explore_prob`` (a seeded generator, part of the state), so skipped
  prompts are revisited; the rest share the budget evenly.
* ``knapsack``: Knapsack-RL-style (arXiv 2509.25849): group sizes that
  maximise the expected number of informative groups,
  sum_i 1 - p_i^n_i - (1 - p_i)^n_i, with p_i the prompt's observed success
  rate (the prior mean for a prompt never seen).
* ``eb`` (ours): the same objective in expectation under each prompt's
  Empirical-Bayes Beta posterior (a Beta prior fitted by moments to the
  estimator's mu_glob and between-prompt variance, updated by the prompt's
  own successes and trials). Derivation: docs/allocation.md.

``knapsack`` and ``eb`` count informative groups by default; ``value="samples"``
counts the samples in them instead (:data:`VALUES`).

``knapsack`` and ``eb`` are solved exactly (:func:`max_plus_allocate`, a
max-plus convolution over a binary tree of prompts): the objective is concave
in n only from n = 2 on, and the greedy marginal-gain allocation is *not*
optimal once groups below ``min_group_size`` are forbidden (a counterexample
is in docs/allocation.md and tests/test_allocation.py).

Departures from the papers are flagged where they occur.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from ebpo.registry import Registry
from ebpo.stats import find_sorted

__all__ = [
    "AllocationRequest",
    "Allocator",
    "ALLOCATORS",
    "build_allocator",
    "check_budget",
    "PromptHistory",
    "fit_beta_prior",
    "between_prompt_variance",
    "beta_moments",
    "informative_prob",
    "expected_informative_prob",
    "max_plus_allocate",
    "allocation_metrics",
    "Uniform",
    "Skip",
    "Knapsack",
    "EmpiricalBayes",
    "VALUES",
]

_NEG_INF = -math.inf
_CONCENTRATION_MIN = 1e-3  # a + b floor: a prior at least this close to two point masses at 0 and 1
_CONCENTRATION_MAX = 1e6  # a + b cap: a between-prompt variance of 0 would make the prior a point mass
_CHUNK_ELEMENTS = 1 << 22  # candidates per max-plus chunk (32 MiB of float64)
_MEAN_EPS = 1e-6  # the prior mean is kept in [eps, 1 - eps] so that a, b > 0


@dataclasses.dataclass(frozen=True)
class AllocationRequest:
    """What an allocator is asked for one step.

    Attributes:
        prompt_ids: (P,) int64 stable key of each candidate prompt
            (:func:`ebpo.estimators.stable_prompt_ids`).
        budget: B, the number of completions to generate this step; the
            returned sizes sum to exactly B.
        prior_mean: the prior mean success probability: a float (EBPO's
            mu_glob) or (P,) per prompt (its topic's mean, looked up by the
            caller). None: 0.5.
        prior_var: the between-prompt variance of the success probability
            around ``prior_mean`` (a float or (P,)); EBPO's tau^2 holds the
            variance of observed group means, which also contains the
            binomial noise: :func:`between_prompt_variance` removes it.
            None: 1/12, a uniform Beta(1, 1) prior with the default mean.
    """

    prompt_ids: Tensor
    budget: int
    prior_mean: Tensor | float | None = None
    prior_var: Tensor | float | None = None


class Allocator(Protocol):
    """What a registered rollout allocator implements."""

    min_group_size: int
    """Smallest non-empty group (2: a group of 1 has no within-group baseline)."""
    max_group_size: int
    """Largest group one prompt may get in one step."""
    reads_history: bool
    """Whether :meth:`allocate` depends on what :meth:`observe` recorded (the trainer skips observing when not)."""

    def allocate(self, request: AllocationRequest) -> tuple[Tensor, dict[str, float]]:
        """Group sizes (P,) int64, each 0 or in [min_group_size, max_group_size], summing to ``budget``; and metrics.

        Never changes the history (only :meth:`observe` does); ``skip`` advances its own seeded generator.
        """
        ...

    def observe(self, prompt_ids: Tensor, successes: Tensor, trials: Tensor) -> None:
        """Record what each sampled group got: (Q,) prompt ids, successes and trials (completions)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


ALLOCATORS: Registry[Allocator] = Registry("rollout allocation")


def build_allocator(name: str = "uniform", **options: Any) -> Allocator:
    """The allocator registered as ``name`` (or at import path ``module:attr``), built with ``options``."""
    return ALLOCATORS.build(name, **options)


# ---------------------------------------------------------------------------------------------------------------
# Beta-Binomial maths (pure functions, float64)


def fit_beta_prior(mean: Tensor | float, var: Tensor | float) -> tuple[Tensor, Tensor]:
    """Beta(a, b) with the given mean and variance, by moments: a + b = mean (1 - mean) / var - 1.

    The mean is kept in [1e-6, 1 - 1e-6] and a + b in [1e-3, 1e6]: a variance of 0
    (every prompt equally hard) gives a near point mass, a variance at or above
    mean (1 - mean) (the most a [0, 1] variable can have) a prior close to two
    point masses at 0 and 1.

    >>> a, b = fit_beta_prior(0.5, 1 / 12)
    >>> round(float(a), 12), round(float(b), 12)
    (1.0, 1.0)
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float64).clamp(_MEAN_EPS, 1.0 - _MEAN_EPS)
    var_t = torch.as_tensor(var, dtype=torch.float64)
    if not bool(torch.isfinite(mean_t).all() & torch.isfinite(var_t).all()) or bool((var_t < 0).any()):
        raise ValueError("the Beta prior needs a finite mean and a finite variance >= 0")
    bernoulli_var = mean_t * (1.0 - mean_t)
    concentration = torch.where(
        var_t > 0, bernoulli_var / var_t.clamp_min(1e-300) - 1.0, torch.full_like(bernoulli_var, _CONCENTRATION_MAX)
    ).clamp(_CONCENTRATION_MIN, _CONCENTRATION_MAX)
    return mean_t * concentration, (1.0 - mean_t) * concentration


def between_prompt_variance(tau2: Tensor | float, mean: Tensor | float, group_size: float) -> Tensor | float:
    """Var(p) across prompts from the variance of observed group means (EBPO's tau^2).

    A group of G binary rewards has mean p + noise with E[noise^2 | p] = p (1 - p) / G, so
    tau^2 = Var(p) + E[p (1 - p)] / G and E[p (1 - p)] = mean (1 - mean) - Var(p), which gives
    Var(p) = (G tau^2 - mean (1 - mean)) / (G - 1), floored at 0. EBPO keeps tau^2 uncorrected
    (the paper's choice); the Beta prior wants the spread of p itself. Floats give a float; a
    tensor (per prompt, e.g. each one's topic prior) gives a float64 tensor.

    >>> between_prompt_variance(0.25, 0.5, 1e9) > 0.2499, between_prompt_variance(0.125, 0.5, 2.0)
    (True, 0.0)
    """
    if not group_size > 1:
        raise ValueError(f"group_size must be > 1 to separate the binomial noise, got {group_size}")
    if isinstance(tau2, Tensor) or isinstance(mean, Tensor):
        tau2_t, mean_t = (torch.as_tensor(x, dtype=torch.float64) for x in (tau2, mean))
        return ((group_size * tau2_t - mean_t * (1.0 - mean_t)) / (group_size - 1.0)).clamp_min(0.0)
    return max(0.0, (group_size * tau2 - mean * (1.0 - mean)) / (group_size - 1.0))


def beta_moments(a: Tensor, b: Tensor, max_n: int) -> Tensor:
    """E[p^n] for p ~ Beta(a, b), n = 0..max_n: (P, max_n + 1) float64.

    E[p^n] = B(a + n, b) / B(a, b) = prod_{j<n} (a + j) / (a + b + j), a running product (no
    Beta function evaluated, no cancellation).
    """
    a, b = a.to(torch.float64).reshape(-1, 1), b.to(torch.float64).reshape(-1, 1)
    j = torch.arange(max_n, dtype=torch.float64)  # (max_n,)
    ratios = (a + j) / (a + b + j)  # (P, max_n)
    return torch.cat([torch.ones_like(a), ratios.cumprod(dim=1)], dim=1)  # (P, max_n + 1)


def informative_prob(p: Tensor, max_n: int) -> Tensor:
    """P(0 < successes < n) = 1 - p^n - (1 - p)^n for n = 0..max_n, with value 0 at n = 0 and 1: (P, max_n + 1)."""
    n = torch.arange(max_n + 1, dtype=torch.float64)
    p = p.to(torch.float64).reshape(-1, 1)
    value = 1.0 - p.pow(n) - (1.0 - p).pow(n)  # n = 0 gives -1 (no group), set to 0 below
    value[:, 0] = 0.0
    return value.clamp_min(0.0)


def expected_informative_prob(a: Tensor, b: Tensor, max_n: int) -> Tensor:
    """E_{p ~ Beta(a, b)}[1 - p^n - (1 - p)^n] for n = 0..max_n (0 at n = 0 and 1): (P, max_n + 1).

    Linear in the moments, so exact: 1 - E[p^n] - E[(1 - p)^n] with (1 - p) ~ Beta(b, a).
    """
    value = 1.0 - beta_moments(a, b, max_n) - beta_moments(b, a, max_n)
    value[:, 0] = 0.0
    return value.clamp_min(0.0)  # n = 1 is 0 up to rounding


# ---------------------------------------------------------------------------------------------------------------
# Exact separable allocation


def check_budget(num_prompts: int, budget: Any, min_size: int, max_size: int) -> int:
    """``budget`` as an int, or a ValueError saying why it cannot be split over ``num_prompts`` prompts.

    A split exists when some number of sampled prompts k, with ceil(budget / max_size) <= k <=
    min(num_prompts, budget // min_size), can hold it in groups of ``min_size``..``max_size``.
    Every strategy's :meth:`Allocator.allocate` checks this, and ``ebpo train`` checks it once
    before the first step.
    """
    try:
        if isinstance(budget, bool):
            raise TypeError
        budget = operator.index(budget)
    except TypeError:
        raise ValueError(f"budget must be an integer number of samples, got {budget!r}") from None
    if num_prompts < 1:
        raise ValueError("allocation needs at least one candidate prompt")
    if budget < min_size:
        raise ValueError(
            f"budget {budget} is smaller than min_group_size {min_size}: one group needs at least "
            f"{min_size} samples; raise the budget or lower min_group_size"
        )
    fewest, most = -(-budget // max_size), min(num_prompts, budget // min_size)  # prompts that could take it
    if fewest > most:
        raise ValueError(
            f"budget {budget} cannot be split over {num_prompts} prompts into groups of "
            f"{min_size}..{max_size} samples (it needs between {fewest} and {budget // min_size} sampled prompts); "
            "give more candidate prompts, raise max_group_size or change the budget"
        )
    return budget


def max_plus_allocate(values: Tensor, budget: int) -> Tensor:
    """Integer sizes n (P,) with sum n = budget that maximise sum_i values[i, n_i]; -inf marks a forbidden size.

    ``values`` (P, S + 1) float64 holds each prompt's value for n = 0..S. Exact for any values (no
    concavity needed): the prompts are paired up in a binary tree and each level takes the max-plus
    convolution of two children's best-value-per-budget curves, keeping the argmax split; the
    splits are then followed back from the root. log2(P) vectorised levels, O(P S B) work in all;
    exact ties go to the split of each node's budget closest to even per prompt (then the
    fewest samples to the left), so the result is a deterministic function of ``values`` and a set of
    prompts that the values cannot tell apart shares the budget evenly.

    Raises ValueError when no choice of allowed sizes sums to ``budget``.
    """
    num_prompts, width = values.shape
    leaves = 1 << max(0, (num_prompts - 1).bit_length())
    pad = torch.full((leaves - num_prompts, width), _NEG_INF, dtype=torch.float64)
    pad[:, 0] = 0.0  # padding prompts may only take 0 samples
    curves = torch.cat([values.to(torch.float64), pad])  # (L, S + 1) best value of a subtree per budget
    splits: list[Tensor] = []  # per level (L / 2^k, budget + 1): samples the left child gets
    real = (torch.arange(leaves) < num_prompts).double()  # (L,) prompts under each node (padding: 0)
    while curves.shape[0] > 1:
        left, right = curves[0::2], curves[1::2]  # (K, S) each
        size = left.shape[1] - 1
        out = min(2 * size, budget)
        # right[s - t] for parent budget s and left budget t, as a strided view: the right curve reversed
        # and padded with -inf (an impossible split), unfolded into windows of S + 1.
        padded = torch.cat(
            [
                left.new_full((left.shape[0], out), _NEG_INF),
                right.flip(1),
                left.new_full((left.shape[0], size), _NEG_INF),
            ],
            dim=1,
        )  # (K, out + 2S + 1)
        windows = padded.unfold(1, size + 1, 1)[:, size : size + out + 1].flip(1)  # (K, out + 1, S + 1)
        t = torch.arange(size + 1, dtype=torch.float64)  # (S + 1,) samples of the left child
        share = (real[0::2] / (real[0::2] + real[1::2]).clamp_min(1.0)).reshape(-1, 1, 1)  # (K, 1, 1) left's even share
        real = real[0::2] + real[1::2]
        # The root is only asked for the whole budget; every other level for each budget up to it.
        first = min(budget, out) if left.shape[0] == 1 else 0
        best = [left.new_full((left.shape[0], first), _NEG_INF)]
        split = [torch.zeros((left.shape[0], first), dtype=torch.long)]
        # Parent budgets in chunks, so that the (K, chunk, S + 1) candidates stay near 2^22 numbers.
        chunk = max(1, _CHUNK_ELEMENTS // (left.shape[0] * (size + 1)))
        for start in range(first, out + 1, chunk):
            total = left[:, None, :] + windows[:, start : start + chunk]  # (K, c, S + 1) value of each split
            chunk_best = total.amax(dim=2)  # (K, c)
            # Among exactly equal splits (prompts whose values tie, e.g. all 0), the most even one, so that
            # indifference spreads samples instead of piling them on the last prompts; then the fewest to the left.
            parent = torch.arange(start, start + total.shape[1], dtype=torch.float64).reshape(-1, 1)  # (c, 1)
            unevenness = (t - parent * share).abs()  # (K, c, S + 1)
            chunk_split = torch.where(total == chunk_best[..., None], unevenness, math.inf).argmin(dim=2)  # (K, c)
            best.append(chunk_best)
            split.append(chunk_split)
        curves = torch.cat(best, dim=1)  # (K, out + 1)
        splits.append(torch.cat(split, dim=1))
    if not budget < curves.shape[1] or curves[0, budget] == _NEG_INF:
        raise ValueError(f"no allowed group sizes sum to the budget {budget}")
    spent = torch.full((1,), budget, dtype=torch.long)  # (1,) samples of the root
    for split in reversed(splits):
        left = split.gather(1, spent.reshape(-1, 1)).reshape(-1)  # (K,)
        spent = torch.stack([left, spent - left], dim=1).reshape(-1)  # (2K,) children in order
    return spent[:num_prompts]


def _size_mask(min_size: int, max_size: int) -> Tensor:
    """(max_size + 1,) bool: the allowed sizes 0 and min_size..max_size."""
    n = torch.arange(max_size + 1)
    return (n == 0) | (n >= min_size)


def _even_split(active: Tensor, budget: int, min_size: int) -> Tensor:
    """``budget`` spread evenly over the first k active prompts, k = min(#active, budget // min_size).

    The caller guarantees k * max_size >= budget. Remainder samples go to the first of them.
    """
    rank = active.long().cumsum(0) - 1  # (P,) position among the active prompts
    k = min(int(active.sum()), budget // min_size)
    chosen = active & (rank < k)
    base, extra = divmod(budget, k)
    return torch.where(chosen, base + (rank < extra).long(), torch.zeros_like(rank))


# ---------------------------------------------------------------------------------------------------------------
# Per-prompt history


@dataclasses.dataclass
class PromptHistory:
    """What each prompt got when it was sampled, as sorted-key tensors (H,).

    ``successes`` and ``trials`` (float64, decayed by ``decay`` at every observe) feed the
    success-rate estimates; ``streak`` (int64) counts the prompt's most recent consecutive
    all-equal groups (0 successes or all successes), reset by a group with a mix.
    """

    keys: Tensor
    successes: Tensor
    trials: Tensor
    streak: Tensor

    @classmethod
    def empty(cls) -> PromptHistory:
        zeros = torch.zeros(0, dtype=torch.float64)
        return cls(torch.zeros(0, dtype=torch.long), zeros, zeros.clone(), torch.zeros(0, dtype=torch.long))

    def lookup(self, prompt_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(successes, trials, streak) (P,) of each prompt; zeros for a prompt never observed."""
        if self.keys.numel() == 0:
            zeros = torch.zeros(prompt_ids.shape, dtype=torch.float64)
            return zeros, zeros.clone(), torch.zeros(prompt_ids.shape, dtype=torch.long)
        slot, found = find_sorted(self.keys, prompt_ids)  # (P,) each
        return (
            torch.where(found, self.successes[slot], 0.0),
            torch.where(found, self.trials[slot], 0.0),
            torch.where(found, self.streak[slot], 0),
        )

    def merged(self, prompt_ids: Tensor, successes: Tensor, trials: Tensor, decay: float) -> PromptHistory:
        """A new history with the groups (Q,) added; several groups of one prompt in one call are summed."""
        keys, index = torch.unique(torch.cat([self.keys, prompt_ids]), sorted=True, return_inverse=True)
        old, new = index[: self.keys.numel()], index[self.keys.numel() :]
        h = keys.numel()
        all_equal = ((successes == 0) | (successes == trials)).long()  # (Q,)
        merged_successes = torch.zeros(h, dtype=torch.float64).index_add_(0, old, self.successes * decay)
        merged_successes.index_add_(0, new, successes)
        merged_trials = torch.zeros(h, dtype=torch.float64).index_add_(0, old, self.trials * decay)
        merged_trials.index_add_(0, new, trials)
        groups = torch.zeros(h, dtype=torch.long).index_add_(0, new, torch.ones_like(all_equal))  # (H,)
        equal_groups = torch.zeros(h, dtype=torch.long).index_add_(0, new, all_equal)
        streak = torch.zeros(h, dtype=torch.long).index_add_(0, old, self.streak)
        # Observed now: the streak grows by the all-equal groups if all were all-equal, else restarts at 0.
        streak = torch.where(groups == 0, streak, torch.where(equal_groups == groups, streak + groups, 0))
        return PromptHistory(keys, merged_successes, merged_trials, streak)

    def state_dict(self) -> dict[str, Any]:
        return {k: v.clone() for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PromptHistory:
        try:
            history = cls(
                torch.as_tensor(state["keys"], dtype=torch.long).clone(),
                torch.as_tensor(state["successes"], dtype=torch.float64).clone(),
                torch.as_tensor(state["trials"], dtype=torch.float64).clone(),
                torch.as_tensor(state["streak"], dtype=torch.long).clone(),
            )
        except KeyError as exc:
            raise ValueError(f"allocation state: the prompt history misses {exc}") from exc
        n = history.keys.numel()
        if any(t.shape != (n,) for t in (history.keys, history.successes, history.trials, history.streak)):
            raise ValueError("allocation state: the prompt history's tensors differ in shape")
        if n > 1 and not bool((history.keys[1:] > history.keys[:-1]).all()):
            raise ValueError("allocation state: the prompt history's keys are not sorted and unique")
        return history


# ---------------------------------------------------------------------------------------------------------------
# Allocators


def _as_prompt_ids(prompt_ids: Any, what: str = "prompt_ids") -> Tensor:
    ids = torch.as_tensor(prompt_ids)
    if ids.dim() != 1:
        raise ValueError(f"{what} must be 1-D (one stable id per prompt), got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{what} must be integer ids (ebpo.estimators.stable_prompt_ids), got dtype {ids.dtype}")
    return ids.to(device="cpu", dtype=torch.long)


def _per_prompt(value: Tensor | float | None, default: float, num_prompts: int, what: str) -> Tensor:
    tensor = torch.as_tensor(default if value is None else value, dtype=torch.float64).cpu()
    if tensor.dim() > 1 or (tensor.dim() == 1 and tensor.numel() != num_prompts):
        raise ValueError(f"{what} must be a float or shape ({num_prompts},), got shape {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{what} must be finite, got {tensor}")
    return tensor.expand(num_prompts)


def _prior(request: AllocationRequest, num_prompts: int) -> tuple[Tensor, Tensor]:
    mean = _per_prompt(request.prior_mean, 0.5, num_prompts, "prior_mean")
    var = _per_prompt(request.prior_var, 1.0 / 12.0, num_prompts, "prior_var")
    if bool(((mean < 0) | (mean > 1)).any()):
        raise ValueError(f"prior_mean is a success probability and must lie in [0, 1], got {mean}")
    if bool((var < 0).any()):
        raise ValueError(f"prior_var must be >= 0, got {var}")
    return mean, var


def allocation_metrics(sizes: Tensor, budget: int) -> dict[str, float]:
    """The ``alloc/*`` counts of group sizes (P,) against the budget: samples, prompts sampled and skipped, sizes."""
    sampled = sizes > 0
    return {
        "alloc/samples": float(sizes.sum()),
        "alloc/budget": float(budget),
        "alloc/prompts_sampled": float(sampled.sum()),
        "alloc/prompts_skipped": float((~sampled).sum()),
        "alloc/group_size_max": float(sizes.max()),
        "alloc/group_size_mean": float(sizes[sampled].double().mean()),
    }


class _HistoryAllocator:
    """Shared machinery: validated sizes, the prompt history, its checkpoint.

    Args (every allocator):
        min_group_size: the smallest non-empty group (default 2: GRPO's std and RLOO's
            leave-one-out need two completions).
        max_group_size: the largest group one prompt gets in one step (default 32; the exact
            solvers' work grows with it).
        decay: each observe first multiplies every stored success and trial count by this
            (default 1: keep the whole history; below 1 forgets outcomes of an older policy).
    """

    name = ""
    reads_history = True

    def __init__(self, min_group_size: int = 2, max_group_size: int = 32, decay: float = 1.0) -> None:
        for label, size in (("min_group_size", min_group_size), ("max_group_size", max_group_size)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{label} must be a positive integer, got {size!r}")
        if max_group_size < min_group_size:
            raise ValueError(f"max_group_size {max_group_size} is below min_group_size {min_group_size}")
        if not (isinstance(decay, int | float) and 0.0 < decay <= 1.0):
            raise ValueError(f"decay must be in (0, 1] (1 keeps the whole history), got {decay!r}")
        self.min_group_size, self.max_group_size, self.decay = min_group_size, max_group_size, float(decay)
        self.history = PromptHistory.empty()

    def _request(self, request: AllocationRequest) -> tuple[Tensor, int]:
        prompt_ids = _as_prompt_ids(request.prompt_ids)
        budget = check_budget(prompt_ids.numel(), request.budget, self.min_group_size, self.max_group_size)
        return prompt_ids, budget

    def observe(self, prompt_ids: Tensor, successes: Tensor, trials: Tensor) -> None:
        ids = _as_prompt_ids(prompt_ids)
        successes_t = torch.as_tensor(successes, dtype=torch.float64).cpu()
        trials_t = torch.as_tensor(trials, dtype=torch.float64).cpu()
        if successes_t.shape != ids.shape or trials_t.shape != ids.shape:
            raise ValueError(
                f"observe needs prompt_ids, successes and trials of one shape (Q,), got {tuple(ids.shape)}, "
                f"{tuple(successes_t.shape)}, {tuple(trials_t.shape)}"
            )
        if not bool(torch.isfinite(successes_t).all() & torch.isfinite(trials_t).all()):
            raise ValueError("observe: successes and trials must be finite (a NaN reward reached the allocator)")
        if bool((trials_t < 1).any() | (trials_t != trials_t.round()).any()):
            raise ValueError("observe: trials are completion counts, integers >= 1")
        if bool(((successes_t < 0) | (successes_t > trials_t)).any()):
            raise ValueError("observe: successes must lie in [0, trials] (sum binary rewards of each group)")
        self.history = self.history.merged(ids, successes_t, trials_t, self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"allocation": self.name, "history": self.history.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("allocation") != self.name:
            raise ValueError(f"allocation state was saved by {state.get('allocation')!r}, not {self.name!r}")
        self.history = PromptHistory.from_state_dict(state["history"])


@ALLOCATORS.register("uniform")
class Uniform(_HistoryAllocator):
    """Every candidate prompt gets budget // P samples, the first budget % P one more (today's fixed G).

    When the budget cannot give every prompt ``min_group_size``, only the first budget //
    min_group_size prompts are sampled. It reads no history (``reads_history`` False: the trainer
    does not feed it, so a verifier whose rewards are not success counts works with it); a history
    given to it by ``observe`` is kept and saved all the same.
    """

    name = "uniform"
    reads_history = False

    def allocate(self, request: AllocationRequest) -> tuple[Tensor, dict[str, float]]:
        prompt_ids, budget = self._request(request)
        sizes = _even_split(torch.ones_like(prompt_ids, dtype=torch.bool), budget, self.min_group_size)
        return sizes, allocation_metrics(sizes, budget)


@ALLOCATORS.register("skip")
class Skip(_HistoryAllocator):
    """GRESO-style pre-rollout filtering (arXiv 2506.02177).

    A prompt whose ``skip_after`` most recent observed groups were all all-equal is skipped,
    unless a draw from the allocator's own seeded generator (probability ``explore_prob``)
    keeps it, so skipped prompts come back and a prompt the policy has started to get right
    (or wrong) leaves the skip list. The budget goes evenly to the kept prompts. When too few
    are kept to take the budget in groups of at most ``max_group_size``, the first skipped
    prompts are kept too.

    Departure: GRESO adapts the exploration probability during training to hit a target
    share of all-equal groups and keeps the batch size by sampling more prompts; here
    ``explore_prob`` is fixed and the candidate set is the caller's.

    Args:
        skip_after: consecutive all-equal groups before a prompt is skipped (default 1).
        explore_prob: probability of sampling a prompt that would be skipped (default 0.25).
        seed: seed of the exploration generator (its state is saved by state_dict).
    """

    name = "skip"

    def __init__(
        self,
        min_group_size: int = 2,
        max_group_size: int = 32,
        decay: float = 1.0,
        skip_after: int = 1,
        explore_prob: float = 0.25,
        seed: int = 0,
    ) -> None:
        super().__init__(min_group_size, max_group_size, decay)
        if isinstance(skip_after, bool) or not isinstance(skip_after, int) or skip_after < 1:
            raise ValueError(f"skip_after must be an integer >= 1, got {skip_after!r}")
        if not (isinstance(explore_prob, int | float) and 0.0 <= explore_prob <= 1.0):
            raise ValueError(f"explore_prob must be in [0, 1], got {explore_prob!r}")
        self.skip_after, self.explore_prob = skip_after, float(explore_prob)
        self.generator = torch.Generator().manual_seed(int(seed))

    def allocate(self, request: AllocationRequest) -> tuple[Tensor, dict[str, float]]:
        prompt_ids, budget = self._request(request)
        _, _, streak = self.history.lookup(prompt_ids)
        # One draw per candidate every call, skipped or not, so the generator advances the same way on every rank.
        explore = torch.rand(prompt_ids.shape, generator=self.generator, dtype=torch.float64) < self.explore_prob
        predicted_equal = streak >= self.skip_after  # (P,)
        skip = predicted_equal & ~explore
        shortfall = -(-budget // self.max_group_size) - int((~skip).sum())  # kept prompts missing to take the budget
        if shortfall > 0:
            skip &= skip.long().cumsum(0) > shortfall
        sizes = _even_split(~skip, budget, self.min_group_size)
        metrics = allocation_metrics(sizes, budget)
        metrics["alloc/predicted_equal"] = float(predicted_equal.sum())
        metrics["alloc/explored"] = float((predicted_equal & (sizes > 0)).sum())
        return sizes, metrics

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if "generator" not in state:
            raise ValueError("skip allocation state misses its exploration generator")
        self.generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8))


VALUES = ("groups", "samples", "variance")
"""What ``knapsack`` and ``eb`` maximise: ``groups``, the expected number of informative groups (a group with
both a success and a failure); ``samples``, the expected number of samples in informative groups (docs/allocation.md,
"Counting samples instead of groups"); ``variance``, sum_i E[p_i (1 - p_i)] (1 - 1/n_i), i.e. the least
posterior-expected variance of the prompts' group means, a value concave in n that spreads the budget
(docs/allocation.md, "Spreading the budget: the variance value")."""


def _spread_utility(n: Tensor) -> Tensor:
    """u(n) = 1 - 1/n for n >= 1 and 0 at n = 0: a group of n's share of its prompt's reward variance.

    E[rbar (1 - rbar) | p] = p (1 - p) u(n) for the mean rbar of n Bernoulli(p) rewards, so v u(n) is the expected
    within-group reward variance of a group of n; a skipped prompt, like a group of one, has none.
    """
    n = n.to(torch.float64)
    return torch.where(n >= 1, 1.0 - 1.0 / n.clamp_min(1.0), torch.zeros_like(n))


def _bernoulli_variance(p_moments: Tensor) -> Tensor:
    """(P,) E[p (1 - p)] = E[p] - E[p^2] from (P, S + 1) moments E[p^m] (m = 0..S, S >= 2)."""
    return (p_moments[:, 1] - p_moments[:, 2]).clamp_min(0.0)


class _ValueAllocator(_HistoryAllocator):
    """Exact maximisation of sum_i values[i, n_i] over the allowed sizes (:func:`max_plus_allocate`).

    Args (beside those of every allocator):
        value: ``"groups"`` (default) counts informative groups: prompt i's value at size n is P(a group of n
            is mixed). ``"samples"`` counts the samples in informative groups, n P(mixed): with binary rewards
            every sample of a mixed group, and none of an all-equal one, gets a nonzero group-relative advantage,
            so under a fixed budget this maximises the samples that carry a gradient (equivalently, minimises
            those that do not), and a top-up of an already mixed group is worth every sample it adds.
            ``"variance"`` is E[p (1 - p)] (1 - 1/n), E over this allocator's belief about p: maximising its sum
            minimises sum_i E[p_i (1 - p_i)] / n_i, the variance of the prompts' group-mean baselines (a skipped
            prompt counts its whole E[p (1 - p)]); its gains v / (n (n + 1)) fall with n, so the budget spreads
            (about n_i proportional to sqrt(v_i), Neyman's allocation) instead of piling onto few prompts.
    """

    def __init__(
        self, min_group_size: int = 2, max_group_size: int = 32, decay: float = 1.0, value: str = "groups"
    ) -> None:
        super().__init__(min_group_size, max_group_size, decay)
        if value not in VALUES:
            raise ValueError(f"value must be one of {', '.join(VALUES)}, got {value!r}")
        self.value = value

    def values(self, prompt_ids: Tensor, request: AllocationRequest) -> Tensor:
        """(P, max_group_size + 1) probability that a group of each size is informative, for each prompt."""
        raise NotImplementedError

    def allocate(self, request: AllocationRequest) -> tuple[Tensor, dict[str, float]]:
        prompt_ids, budget = self._request(request)
        n = torch.arange(self.max_group_size + 1)
        if self.value == "variance":
            values = self.reward_variance(prompt_ids, request)[:, None] * _spread_utility(n)  # E[p (1 - p)] u(n)
        else:
            values = self.values(prompt_ids, request)  # (P, S + 1) P(mixed)
            if self.value == "samples":
                values = values * n.to(torch.float64)  # n P(mixed)
        allowed = _size_mask(self.min_group_size, self.max_group_size)
        sizes = max_plus_allocate(values.masked_fill(~allowed, _NEG_INF), budget)
        metrics = allocation_metrics(sizes, budget)
        objective = values.gather(1, sizes.reshape(-1, 1)).sum()
        uniform = values.gather(
            1, _even_split(torch.ones_like(sizes, dtype=torch.bool), budget, self.min_group_size)[:, None]
        )
        metrics["alloc/expected_informative"] = float(objective)
        metrics["alloc/expected_informative_uniform"] = float(uniform.sum())
        return sizes, metrics

    def top_up(
        self, request: AllocationRequest, first_successes: Tensor, first_trials: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """Extra completions (P,) for prompts that already got a first round this step, summing to ``budget``.

        Each prompt holds a first group of ``first_trials`` completions with ``first_successes``
        (already passed to :meth:`observe`, so the posterior includes them). A top-up of m more is
        worth what it adds to the chance that the whole group is informative: nothing for a
        first group that is already mixed; P(at least one success among m) after a first group with
        none, 1 - E[(1 - p)^m]; P(at least one failure) after all successes, 1 - E[p^m]. With
        ``value="samples"`` it is worth what it adds to the expected samples in informative groups:
        m for a first group that is already mixed; (t + m) times those probabilities otherwise, t
        the first group's counted completions. With ``value="variance"`` it is worth
        E[p (1 - p)] (u(t + m) - u(t)), u(n) = 1 - 1/n (0 at n = 0), whatever the first group got: the
        first round enters through the belief about p, which it has updated.
        Top-ups are 0 or 1 .. max_group_size - first_trials (any size: the first group already
        meets ``min_group_size``); solved exactly like :meth:`allocate`. ``first_trials`` counts the
        completions the verifier scored (a group whose rewards were all dropped counts 0 and is
        valued as one with no success).
        """
        prompt_ids = _as_prompt_ids(request.prompt_ids)
        first_s = torch.as_tensor(first_successes, dtype=torch.float64).cpu()
        first_t = torch.as_tensor(first_trials, dtype=torch.float64).cpu()
        if first_s.shape != prompt_ids.shape or first_t.shape != prompt_ids.shape:
            raise ValueError("top_up needs first_successes and first_trials of shape (P,), one per candidate prompt")
        # The caller sampled at least min_group_size of each; the verifier may have dropped some (None rewards), so
        # fewer may be counted, but never more than a group may hold.
        if bool(((first_t < 0) | (first_t > self.max_group_size) | (first_t != first_t.round())).any()):
            raise ValueError(
                f"top_up: every first group must hold 0..{self.max_group_size} counted completions, got {first_t.tolist()}"
            )
        if bool(((first_s < 0) | (first_s > first_t)).any()):
            raise ValueError("top_up: first_successes must lie in [0, first_trials]")
        budget = request.budget
        room = (self.max_group_size - first_t).long()  # (P,) most extra completions each prompt may take
        if isinstance(budget, bool) or not isinstance(budget, int) or not 0 <= budget <= int(room.sum()):
            raise ValueError(
                f"top-up budget must be an integer in [0, {int(room.sum())}] (the room left under max_group_size "
                f"{self.max_group_size}), got {budget!r}"
            )
        p_s, p_f = self.top_up_moments(prompt_ids, request)  # (P, S + 1) E[p^m], E[(1 - p)^m]
        none, every = first_s == 0, first_s == first_t
        m = torch.arange(self.max_group_size + 1)
        mixed = ~none & ~every
        if self.value == "variance":  # E[p (1 - p)] times what m more add to u, from the moments already at hand
            added = _spread_utility(first_t[:, None] + m) - _spread_utility(first_t)[:, None]
            gain = _bernoulli_variance(p_s)[:, None] * added
        else:
            gain = torch.where(none[:, None], 1.0 - p_f, 1.0 - p_s).masked_fill(mixed[:, None], 0.0)  # P(turns mixed)
            if self.value == "samples":  # samples in mixed groups: a mixed group adds m, another (t + m) P(mixed)
                gain = torch.where(mixed[:, None], m.to(torch.float64), (first_t[:, None] + m) * gain)
        allowed = m[None, :] <= room[:, None]  # (P, S + 1); 0 always allowed
        sizes = max_plus_allocate(gain.clamp_min(0.0).masked_fill(~allowed, _NEG_INF), budget)
        sampled = sizes > 0
        metrics = {
            "alloc/top_up_samples": float(sizes.sum()),
            "alloc/top_up_prompts": float(sampled.sum()),
            "alloc/first_round_mixed": float(mixed.sum()),
            "alloc/expected_informative_gain": float(gain.gather(1, sizes[:, None]).sum()),
        }
        return sizes, metrics

    def top_up_moments(self, prompt_ids: Tensor, request: AllocationRequest) -> tuple[Tensor, Tensor]:
        """E[p^m] and E[(1 - p)^m] for m = 0..max_group_size under this allocator's belief: two (P, S + 1)."""
        raise NotImplementedError

    def reward_variance(self, prompt_ids: Tensor, request: AllocationRequest) -> Tensor:
        """(P,) E[p (1 - p)] = E[p] - E[p^2] under this allocator's belief: the ``variance`` value's weight."""
        p_s, _ = self.top_up_moments(prompt_ids, request)
        return _bernoulli_variance(p_s)


@ALLOCATORS.register("knapsack")
class Knapsack(_ValueAllocator):
    """Knapsack-RL-style allocation (arXiv 2509.25849): maximise expected informative groups.

    Prompt i's value at size n is 1 - p_i^n - (1 - p_i)^n, the probability that a group of n
    has both a success and a failure, with p_i the prompt's observed success rate
    (successes / trials of its history) or the prior mean for a prompt never seen.

    Departures: the paper multiplies this probability by an information gain, about
    p (1 - p)^2 (``info_gain=True`` restores it), and adds a fallback that sends spare budget
    to unsolved prompts (not implemented); here the problem is solved exactly
    (:func:`max_plus_allocate`), as the paper's dynamic programme does. A prompt whose every
    observed completion agreed has value 0 at every size: it is sampled only when the budget
    needs it.

    Args:
        info_gain: weigh each prompt's value by p (1 - p)^2, the paper's approximate information gain.
        value: ``"groups"`` (default, the paper's count), ``"samples"`` or ``"variance"`` (see :data:`VALUES`).
    """

    name = "knapsack"

    def __init__(
        self,
        min_group_size: int = 2,
        max_group_size: int = 32,
        decay: float = 1.0,
        info_gain: bool = False,
        value: str = "groups",
    ) -> None:
        super().__init__(min_group_size, max_group_size, decay, value)
        if not isinstance(info_gain, bool):
            raise ValueError(f"info_gain must be True or False, got {info_gain!r}")
        if info_gain and value == "variance":
            raise ValueError(
                "info_gain weighs the informative-group count (value groups or samples); the variance value has its "
                "own weight, p (1 - p): drop info_gain or choose another value"
            )
        self.info_gain = info_gain

    def values(self, prompt_ids: Tensor, request: AllocationRequest) -> Tensor:
        prior_mean, _ = _prior(request, prompt_ids.numel())
        successes, trials, _ = self.history.lookup(prompt_ids)
        rate = torch.where(trials > 0, successes / trials.clamp_min(1e-300), prior_mean)  # (P,)
        values = informative_prob(rate, self.max_group_size)  # (P, S + 1)
        if self.info_gain:
            values = values * (rate * (1.0 - rate) ** 2).reshape(-1, 1)
        return values

    def top_up_moments(self, prompt_ids: Tensor, request: AllocationRequest) -> tuple[Tensor, Tensor]:
        prior_mean, _ = _prior(request, prompt_ids.numel())
        successes, trials, _ = self.history.lookup(prompt_ids)
        rate = torch.where(trials > 0, successes / trials.clamp_min(1e-300), prior_mean).reshape(-1, 1)  # (P, 1)
        m = torch.arange(self.max_group_size + 1, dtype=torch.float64)
        return rate.pow(m), (1.0 - rate).pow(m)  # the point estimate: a prompt never seen failing is never topped up


@ALLOCATORS.register("eb")
class EmpiricalBayes(_ValueAllocator):
    """Empirical-Bayes allocation (ours; derivation in docs/allocation.md).

    Prompt i's success probability has the posterior Beta(a_i + s_i, b_i + f_i): the prior
    Beta(a_i, b_i) fitted by moments to ``prior_mean`` and ``prior_var`` (EBPO's mu_glob and
    the between-prompt variance, or the prompt's topic's), updated by its (decayed) successes
    s_i and failures f_i. Its value at size n is the posterior expectation of the informative-group
    probability, 1 - E[p^n] - E[(1 - p)^n], exact in Beta function ratios. Unlike ``knapsack``,
    a prompt seen once with two successes keeps value: the posterior still allows a failure.

    Args:
        value: ``"groups"`` (default), ``"samples"`` (n times that probability) or ``"variance"``
            (E[p (1 - p)] (1 - 1/n) under the posterior; see :data:`VALUES`).
    """

    name = "eb"

    def values(self, prompt_ids: Tensor, request: AllocationRequest) -> Tensor:
        prior_mean, prior_var = _prior(request, prompt_ids.numel())
        a, b = fit_beta_prior(prior_mean, prior_var)  # (P,) each
        successes, trials, _ = self.history.lookup(prompt_ids)
        return expected_informative_prob(a + successes, b + trials - successes, self.max_group_size)

    def top_up_moments(self, prompt_ids: Tensor, request: AllocationRequest) -> tuple[Tensor, Tensor]:
        prior_mean, prior_var = _prior(request, prompt_ids.numel())
        a, b = fit_beta_prior(prior_mean, prior_var)
        successes, trials, _ = self.history.lookup(prompt_ids)
        a, b = a + successes, b + trials - successes  # the posterior, first round included
        return beta_moments(a, b, self.max_group_size), beta_moments(b, a, self.max_group_size)
