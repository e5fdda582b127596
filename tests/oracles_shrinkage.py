"""Slow loop references for the other baselines (JSPO, SPO, KRPO), in the style of ``oracles.py``.

Written from the papers and the authors' released code (docs/methods.md#other-baselines), with plain
Python floats, dicts and explicit loops over prompts, groups and responses, sharing no code with ``ebpo``.
"""

from __future__ import annotations

import math

from oracles import groups_of, mean


def _unbiased_var(xs: list[float]) -> float:
    mu = mean(xs)
    return sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)


def jspo(
    rewards: list[float], group_ids: list[int], paper_factor: bool = False, eps: float = 1e-6
) -> tuple[list[float], list[float]]:
    """JSPO advantages and each group's lambda (in group order), from the paper's formulas (arXiv 2511.03710).

    b_ij = (1 - lambda_i) mu_i^{-j} + lambda_i mu_{-i}, with mu_i^{-j} the prompt's leave-one-out mean,
    mu_{-i} the mean of the other prompts' means, v_{-i} the mean over the other prompts of
    s_k^2 / G_k (unbiased s_k^2), s_{-i} the mean squared deviation of the other prompts' means from
    mu_{-i}, and lambda_i = v / (v + s + eps) (times (n-1)/n with the paper's factor); one prompt: lambda = 0.
    """
    groups = groups_of(group_ids)
    keys = list(groups)
    n = len(keys)
    means = {g: mean([rewards[i] for i in groups[g]]) for g in keys}
    noise = {g: _unbiased_var([rewards[i] for i in groups[g]]) / len(groups[g]) for g in keys}
    out = [0.0] * len(rewards)
    lambdas = []
    for g in keys:
        others = [k for k in keys if k != g]
        if others:
            other_mean = mean([means[k] for k in others])
            v = mean([noise[k] for k in others])
            s = mean([(means[k] - other_mean) ** 2 for k in others])
            lam = v / (v + s + eps)
            if paper_factor:
                lam *= (n - 1) / n
        else:
            other_mean, lam = 0.0, 0.0
        lambdas.append(lam)
        idx = groups[g]
        for i in idx:
            loo = mean([rewards[j] for j in idx if j != i])
            out[i] = rewards[i] - ((1 - lam) * loo + lam * other_mean)
    return out, lambdas


def jspo_released(scores: list[list[float]], epsilon: float = 1e-6) -> list[float]:
    """The released code's arithmetic (JSPO-Official, compute_jspo_outcome_advantage) on an (n, m) table.

    For each sample, statistics of the other questions only: their means' mean, the mean of their
    var(unbiased) / m, the mean squared deviation of their means; lambda = v / (v + s + epsilon); the
    batch mean of the baseline is the mean of the other questions' *samples*. Rows are prompts.
    """
    n, m = len(scores), len(scores[0])
    out = []
    for p in range(n):
        others = [scores[k] for k in range(n) if k != p]
        other_means = [mean(row) for row in others]
        batch_mean = mean(other_means)
        v = mean([_unbiased_var(row) / m for row in others])
        s = mean([(x - batch_mean) ** 2 for x in other_means])
        lam = v / (v + s + epsilon)
        sample_mean = mean([x for row in others for x in row])
        for j in range(m):
            rloo = (sum(scores[p]) - scores[p][j]) / (m - 1)
            out.append(scores[p][j] - (rloo * (1 - lam) + sample_mean * lam))
    return out


def _standardise(out: list[float], center: bool, std_normalize: bool, eps: float) -> list[float]:
    if center:
        m = mean(out)
        out = [a - m for a in out]
    if std_normalize:
        mu = mean(out)
        sd = math.sqrt(sum((a - mu) ** 2 for a in out) / (len(out) - 1))
        out = [a / (sd + eps) for a in out]
    return out


class LoopSPO:
    """SPO's per-prompt Beta tracker as the EBPO authors' fork writes it (a dict of (alpha, beta) per prompt).

    Baselines are read before the step's update; each group's mean correctness (or, per response,
    each response) is one observation; all groups of one prompt are added under one discount.
    """

    def __init__(
        self,
        rho: float = 0.9,
        prior_count: float = 8.0,
        prior_mean: float = 0.5,
        per_response: bool = False,
        std_normalize: bool = True,
        center: bool = True,
        eps: float = 1e-6,
    ) -> None:
        self.rho, self.n0, self.v0, self.per_response = rho, prior_count, prior_mean, per_response
        self.std_normalize, self.center, self.eps = std_normalize, center, eps
        self.tracker: dict[int, tuple[float, float]] = {}

    def value(self, prompt: int) -> float:
        if prompt not in self.tracker:
            return self.v0
        alpha, beta = self.tracker[prompt]
        return alpha / (alpha + beta)

    def step(
        self, rewards: list[float], group_ids: list[int], prompt_ids: list[int], correctness: list[float] | None = None
    ) -> list[float]:
        correct = rewards if correctness is None else correctness
        out = [rewards[i] - self.value(prompt_ids[i]) for i in range(len(rewards))]
        out = _standardise(out, self.center, self.std_normalize, self.eps)
        observations: dict[int, list[float]] = {}
        for idx in groups_of(group_ids).values():
            prompt = prompt_ids[idx[0]]
            successes = [correct[i] for i in idx]
            y, trials = (sum(successes), float(len(idx))) if self.per_response else (mean(successes), 1.0)
            seen = observations.setdefault(prompt, [0.0, 0.0])
            seen[0] += y
            seen[1] += trials - y
        for prompt, (succ, fail) in observations.items():
            alpha, beta = self.tracker.get(prompt, (self.n0 * self.v0, self.n0 * (1 - self.v0)))
            self.tracker[prompt] = (self.rho * alpha + succ, self.rho * beta + fail)
        return out


class ScalarKalman:
    """The released KRPO code's 1D filter (KRPO_LLMs_RL train.py, KalmanFilter), on Python floats."""

    def __init__(self, process_var: float, meas_var: float, init_mean: float, init_var: float) -> None:
        self.q, self.r, self.x, self.p = process_var, meas_var, init_mean, init_var

    def update(self, z: float) -> tuple[float, float]:
        p_pred = self.p + self.q
        k = p_pred / (p_pred + self.r)
        self.x = self.x + k * (z - self.x)
        self.p = (1 - k) * p_pred
        return self.x, self.p


class LoopKRPO:
    """KRPO advantages (r - x) / (sqrt(P) + eps) after each response's own update, response by response.

    ``carry=False``: a fresh filter per group (the released code); ``carry=True``: a filter per prompt
    that persists across steps and reads every response of the prompt in batch order.
    """

    def __init__(
        self,
        process_var: float = 1e-5,
        meas_var: float = 1e-2,
        init_mean: float = 0.0,
        init_var: float = 1.0,
        eps: float = 1e-8,
        carry: bool = False,
    ) -> None:
        self.args = (process_var, meas_var, init_mean, init_var)
        self.eps, self.carry = eps, carry
        self.filters: dict[int, ScalarKalman] = {}

    def step(self, rewards: list[float], group_ids: list[int], prompt_ids: list[int] | None = None) -> list[float]:
        filters = self.filters if self.carry else {}
        keys = prompt_ids if self.carry else group_ids
        out = []
        for i, r in enumerate(rewards):
            kf = filters.setdefault(keys[i], ScalarKalman(*self.args))
            x, p = kf.update(r)
            out.append((r - x) / (math.sqrt(p) + self.eps))
        return out
