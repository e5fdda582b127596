"""Slow, loop-based reference implementations used as test oracles.

Written from docs/methods.md with plain Python floats and explicit loops, sharing
no code with ``ebpo`` so that a bug in the vectorised code cannot hide in the
oracle too.
"""

from __future__ import annotations

import math
from collections import OrderedDict


def groups_of(group_ids: list[int]) -> OrderedDict[int, list[int]]:
    groups: OrderedDict[int, list[int]] = OrderedDict()
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    return groups


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def std(xs: list[float], unbiased: bool) -> float:
    mu = mean(xs)
    n = len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1 if unbiased else n))


def grpo(
    rewards: list[float], group_ids: list[int], scale: str = "group", unbiased: bool = True, eps: float = 1e-6
) -> list[float]:
    out = [0.0] * len(rewards)
    batch_std = std(rewards, unbiased)
    for idx in groups_of(group_ids).values():
        rs = [rewards[i] for i in idx]
        mu = mean(rs)
        s = std(rs, unbiased) if scale == "group" else batch_std
        for i in idx:
            out[i] = rewards[i] - mu if scale == "none" else (rewards[i] - mu) / (s + eps)
    return out


def rloo(rewards: list[float], group_ids: list[int]) -> list[float]:
    out = [0.0] * len(rewards)
    for idx in groups_of(group_ids).values():
        for i in idx:
            others = [rewards[j] for j in idx if j != i]
            out[i] = rewards[i] - mean(others)
    return out


class LoopWelford:
    """Textbook one-value-at-a-time Welford with per-step exponential forgetting."""

    def __init__(self) -> None:
        self.n = 0.0
        self.mu = 0.0
        self.m2 = 0.0

    def forget(self, decay: float) -> None:
        self.n *= decay
        self.m2 *= decay
        if self.n == 0.0:
            self.mu = 0.0
            self.m2 = 0.0

    def add(self, x: float) -> None:
        self.n += 1.0
        d = x - self.mu
        self.mu += d / self.n
        self.m2 += d * (x - self.mu)

    @property
    def var(self) -> float:
        return self.m2 / self.n if self.n > 0 else 0.0


class LoopEBPO:
    """EBPO, docs/methods.md#ebpo, one step at a time, loops over responses and groups."""

    def __init__(self, decay: float, std_normalize: bool = True, center: bool = True, eps: float = 1e-6) -> None:
        self.decay, self.std_normalize, self.center, self.eps = decay, std_normalize, center, eps
        self.rewards_acc = LoopWelford()
        self.means_acc = LoopWelford()

    def step(self, rewards: list[float], group_ids: list[int]) -> tuple[list[float], dict[str, float]]:
        groups = groups_of(group_ids)
        self.rewards_acc.forget(self.decay)
        self.means_acc.forget(self.decay)
        for r in rewards:
            self.rewards_acc.add(r)
        group_mean = {g: mean([rewards[i] for i in idx]) for g, idx in groups.items()}
        for g in groups:
            self.means_acc.add(group_mean[g])
        sigma2, mu_glob, tau2 = self.rewards_acc.var, self.means_acc.mu, self.means_acc.var
        out = [0.0] * len(rewards)
        shrinks = []
        for g, idx in groups.items():
            noise = sigma2 / len(idx)
            s = 1.0 if noise + tau2 <= self.eps else noise / (noise + tau2)
            shrinks.append(s)
            baseline = (1 - s) * group_mean[g] + s * mu_glob
            for i in idx:
                out[i] = rewards[i] - baseline
        out = _batch_standardise(out, center=self.center, std_normalize=self.std_normalize, eps=self.eps)
        return out, {"shrinkage": mean(shrinks), "mu_glob": mu_glob, "sigma2": sigma2, "tau2": tau2}


class LoopHADW:
    """HA-DW weights, docs/methods.md#ha-dw, with both anchors, as documented in ebpo.weighting."""

    def __init__(
        self, anchor: str, lam: float, eta: float = 2.0, m: int = 10, k: int = 10, c0: float | None = None
    ) -> None:
        self.kind, self.lam, self.eta, self.m, self.k, self.c0 = anchor, lam, eta, m, k, c0
        self.anchor: float | None = None
        self.history: list[float] = []

    def step(self, advantages: list[float], rewards: list[float], group_ids: list[int]) -> list[float]:
        y = mean(rewards)
        if self.kind == "hard":
            self.history = (self.history + [y])[-self.k :]
            c = mean(self.history)
        else:
            c = self.anchor if self.anchor is not None else (y if self.c0 is None else self.c0)
            if not self.history:
                self.history = [c]
            window = self.history + [y]
            gain = min(max(self.eta * std(window, unbiased=False), 0.0), 1.0)
            self.anchor = (1 - gain) * c + gain * y
            self.history = (self.history + [self.anchor])[-self.m :]
        weights = [0.0] * len(rewards)
        for idx in groups_of(group_ids).values():
            mu = mean([rewards[i] for i in idx])
            diff = mu - c
            for i in idx:
                sign_a = (advantages[i] > 0) - (advantages[i] < 0)
                sign_d = (diff > 0) - (diff < 0)
                weights[i] = self.lam * math.exp(-sign_a * sign_d * abs(diff))
        return weights


class LoopHierEBPO:
    """Hierarchical EBPO, written literally from docs/hierarchical-prior.md: dicts of accumulators, loops over topics and groups."""

    def __init__(
        self,
        decay: float,
        pooling: str = "partial",
        nu: float = 2.0,
        std_normalize: bool = True,
        center: bool = True,
        eps: float = 1e-6,
    ) -> None:
        self.decay, self.pooling, self.nu = decay, pooling, nu
        self.std_normalize, self.center, self.eps = std_normalize, center, eps
        self.rewards_acc, self.means_acc = LoopWelford(), LoopWelford()
        self.topic_rewards: dict[int, LoopWelford] = {}
        self.topic_means: dict[int, LoopWelford] = {}

    def step(
        self, rewards: list[float], group_ids: list[int], topic_ids: list[int]
    ) -> tuple[list[float], dict[str, float]]:
        groups = groups_of(group_ids)
        group_topic = {g: topic_ids[idx[0]] for g, idx in groups.items()}
        for acc in [self.rewards_acc, self.means_acc, *self.topic_rewards.values(), *self.topic_means.values()]:
            acc.forget(self.decay)
        for i, r in enumerate(rewards):
            self.rewards_acc.add(r)
            self.topic_rewards.setdefault(topic_ids[i], LoopWelford()).add(r)
        group_mean = {g: mean([rewards[i] for i in idx]) for g, idx in groups.items()}
        for g in groups:
            self.means_acc.add(group_mean[g])
            self.topic_means.setdefault(group_topic[g], LoopWelford()).add(group_mean[g])
        mu_glob = self.means_acc.mu
        known = [k for k in self.topic_means if self.topic_means[k].n > 0]
        # pooled within-topic variances and the between-topic variance
        sigma2_w = sum(self.topic_rewards[k].m2 for k in known) / sum(self.topic_rewards[k].n for k in known)
        tau2_w = sum(self.topic_means[k].m2 for k in known) / sum(self.topic_means[k].n for k in known)
        omega2 = sum(self.topic_means[k].n * (self.topic_means[k].mu - mu_glob) ** 2 for k in known) / sum(
            self.topic_means[k].n for k in known
        )
        pooled: dict[int, tuple[float, float, float]] = {}
        for k in known:
            m_k, mu_k = self.topic_means[k].n, self.topic_means[k].mu
            sigma2_k, tau2_k = self.topic_rewards[k].var, self.topic_means[k].var
            if self.pooling == "none":
                pooled[k] = (sigma2_k, tau2_k, mu_k)
                continue
            w = m_k / (m_k + self.nu)
            sigma2_star = sigma2_w + w * (sigma2_k - sigma2_w)
            tau2_star = tau2_w + w * (tau2_k - tau2_w)
            noise_of_mean = tau2_star / m_k
            b = 1.0 if noise_of_mean + omega2 <= self.eps else noise_of_mean / (noise_of_mean + omega2)
            pooled[k] = (sigma2_star, tau2_star, (1 - b) * mu_k + b * mu_glob)
        self.pooled = pooled  # each known topic's (sigma_k*^2, tau_k*^2, mu_k*) after this step
        out = [0.0] * len(rewards)
        for g, idx in groups.items():
            sigma2_star, tau2_star, mu_star = pooled[group_topic[g]]
            noise = sigma2_star / len(idx)
            s = 1.0 if noise + tau2_star <= self.eps else noise / (noise + tau2_star)
            baseline = (1 - s) * group_mean[g] + s * mu_star
            for i in idx:
                out[i] = rewards[i] - baseline
        out = _batch_standardise(out, center=self.center, std_normalize=self.std_normalize, eps=self.eps)
        return out, {"omega2": omega2, "tau2_within": tau2_w, "sigma2_within": sigma2_w, "mu_glob": mu_glob}


def _batch_standardise(out: list[float], *, center: bool, std_normalize: bool, eps: float) -> list[float]:
    """EBPO's batch-level step, shared by the flat and hierarchical loop oracles: centre, then divide by std (N-1) + eps."""
    if center:
        m = mean(out)
        out = [a - m for a in out]
    if std_normalize:
        raw_std = std(out, unbiased=True)
        out = [a / (raw_std + eps) for a in out]
    return out
