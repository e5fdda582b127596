"""Advantage estimators: GRPO, Dr. GRPO, RLOO and EBPO behind one interface.

Every estimator is built by :func:`build_estimator` and called the same way::

    estimator = build_estimator("ebpo", prior="running", weighting="ha_dw")
    advantages, metrics = estimator(rewards, group_ids, training=True)

``rewards`` is a float tensor (N,), ``group_ids`` an integer tensor (N,) whose
values name each response's group within the batch (any values, any order,
groups of any size). ``advantages`` is (N,) in the rewards' dtype; ``metrics``
is a flat dict of namespaced Python floats. Optional ``prompt_ids`` (N,) name
each group's prompt across steps (a stable key such as
:func:`stable_prompt_ids` of the problem ids): the estimators that keep state
per prompt (``spo``, ``krpo`` with ``carry=True``) need them; the others
validate and ignore them.

The other baselines, JSPO, SPO and KRPO, live in :mod:`ebpo.estimators_shrinkage`
and register themselves in the same :data:`ESTIMATORS` when this module is imported.

One dispatch path: :func:`build_estimator` looks the name up in
:data:`ESTIMATORS` (or imports ``module:attr``), looks the optional weighting
up in :data:`ebpo.weighting.WEIGHTINGS`, and wraps both in an
:class:`AdvantagePipeline` that validates input, groups it, runs the
estimator, applies the weighting and adds the shared metrics. No estimator is
special-cased before the registry.

A registered estimator implements :class:`Estimator`: ``min_group_size``,
``compute(batch, training=...)`` on a validated :class:`GroupedBatch`, and
``state_dict()`` / ``load_state_dict()`` (empty for stateless ones).

Departures from papers / released code are flagged where they occur; see
also docs/methods.md#advantage-estimators.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from ebpo.grouping import GroupedBatch, stable_topic_ids
from ebpo.registry import Registry
from ebpo.stats import KeyedWelford, Welford, find_sorted
from ebpo.weighting import WEIGHTINGS, Weighting

__all__ = [
    "Estimator",
    "AdvantagePipeline",
    "PromptedBatch",
    "stable_prompt_ids",
    "ESTIMATORS",
    "build_estimator",
    "list_estimators",
    "GroupBaseline",
    "RLOO",
    "EBPO",
]

EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class PromptedBatch(GroupedBatch):
    """A :class:`~ebpo.grouping.GroupedBatch` that also names each group's prompt across steps.

    What :class:`AdvantagePipeline` hands to every estimator and weighting.

    Attributes:
        group_prompts: (M,) int64 the caller's prompt key of each group
            (``prompt_ids=`` of the call), or None when the caller gave none.
            A group id names a group within one batch (the trainer numbers
            each step's prompts from 0); a prompt key names the same prompt
            at every step, so an estimator that keeps state per prompt
            across steps keys it by ``group_prompts``, never by group ids.
            Two groups of one batch may share a prompt.
    """

    group_prompts: Tensor | None = None


def stable_prompt_ids(keys: Sequence[object]) -> Tensor:
    """Prompt ids (N,) int64 for each response's prompt key (a problem id, a dataset index, the prompt text).

    The 62-bit BLAKE2b hash of each key's text (as
    :func:`ebpo.grouping.stable_topic_ids`), so a prompt has the same id in
    every process, on every rank and after a resume; two keys collide with
    probability about k^2 / 2^63 for k distinct prompts.

    >>> ids = stable_prompt_ids(["p1", "p2", "p1"])
    >>> bool(ids[0] == ids[2]), bool(ids[0] == ids[1])
    (True, False)
    """
    missing = [i for i, key in enumerate(keys) if key is None]
    if missing:
        raise ValueError(f"prompt key at index {missing[0]} is None: every response needs its prompt's key")
    return stable_topic_ids(keys)


def _group_prompts(prompt_ids: Tensor | Sequence[int], group_ids: Any, batch: GroupedBatch) -> Tensor:
    """Validate per-response prompt ids (N,) and return each group's prompt id (M,) int64.

    Every response of a group answers the same prompt, so a group whose
    responses carry different prompt ids is a wiring bug and raises.
    """
    prompts = prompt_ids if isinstance(prompt_ids, Tensor) else torch.as_tensor(prompt_ids)
    if prompts.shape != batch.rewards.shape:
        raise ValueError(
            f"prompt_ids must have shape {tuple(batch.rewards.shape)} like group_ids, got {tuple(prompts.shape)}"
        )
    if prompts.is_floating_point() or prompts.is_complex() or prompts.dtype == torch.bool:
        raise ValueError(f"prompt_ids must be an integer tensor, got dtype {prompts.dtype}")
    prompts = prompts.to(device=batch.rewards.device, dtype=torch.long)
    low, high = batch.grouping.amin(prompts), batch.grouping.amax(prompts)  # (M,)
    mixed = high != low  # (M,)
    if bool(mixed.any()):
        slot = int(mixed.nonzero()[0, 0])
        ids = torch.as_tensor(group_ids).reshape(-1).to(batch.rewards.device)
        group = int(ids[batch.grouping.index == slot][0])
        raise ValueError(
            f"group {group} has responses with different prompt ids ({int(low[slot])} and {int(high[slot])}); "
            "a prompt id names the prompt a group answers, so all responses of a group need the same prompt id"
        )
    return low


class Estimator(Protocol):
    """What a registered advantage estimator implements."""

    min_group_size: int
    """The smallest group it accepts (2 for GRPO's std and RLOO's leave-one-out); the pipeline refuses smaller."""

    def compute(self, batch: PromptedBatch, *, training: bool) -> tuple[Tensor, dict[str, float]]:
        """Return float64 advantages (N,) and metrics. Must not change state when ``training`` is False."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Its state across steps (EBPO's running prior), saved with the run's checkpoints; {} when stateless."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, so a resumed run continues where it stopped."""
        ...


ESTIMATORS: Registry[Estimator] = Registry("advantage estimator")


class _Stateless:
    """Mixin for estimators without state (their checkpoint entry is empty)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} is stateless but got state keys {sorted(state)}")


_SCALES = ("group", "batch", "none")


@ESTIMATORS.register("grpo")
class GroupBaseline(_Stateless):
    """GRPO (DeepSeekMath, arXiv 2402.03300): A = (r - mu_m) / (s + eps).

    Args:
        scale: ``"group"`` divides by each group's reward std (GRPO);
            ``"batch"`` by the std of all rewards in the batch (as TRL's
            ``scale_rewards="batch"``); ``"none"`` does not scale (Dr. GRPO).
        unbiased_std: std with divisor G-1 (default, as ``torch.std`` in TRL
            and verl) or G.
        eps: added to the std; 1e-6 as in verl.
    """

    min_group_size = 2

    def __init__(self, scale: str = "group", unbiased_std: bool = True, eps: float = EPS) -> None:
        if scale not in _SCALES:
            raise ValueError(f"grpo scale must be one of {_SCALES}, got {scale!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.scale, self.unbiased_std, self.eps = scale, unbiased_std, eps

    def compute(self, batch: GroupedBatch, *, training: bool) -> tuple[Tensor, dict[str, float]]:
        centred = batch.centred  # (N,) r - mu_m, exactly 0 in all-equal groups
        eps = self.eps
        if self.scale == "group":
            std = batch.group_var(unbiased=self.unbiased_std).sqrt()  # (M,)
            return batch.grouping.map(lambda c, s: c / (s + eps), centred, std), {}
        if self.scale == "batch":
            std = batch.rewards.std(unbiased=self.unbiased_std)  # N >= 2 since G >= 2
            return centred / (std + eps), {}
        return centred, {}


@ESTIMATORS.register("dr_grpo")
def dr_grpo(unbiased_std: bool = True, eps: float = EPS) -> GroupBaseline:
    """Dr. GRPO (arXiv 2503.20783): A = r - mu_m, no std division."""
    return GroupBaseline(scale="none", unbiased_std=unbiased_std, eps=eps)


@ESTIMATORS.register("rloo")
class RLOO(_Stateless):
    """REINFORCE leave-one-out (Ahmadian et al., arXiv 2402.14740).

    A_i = r_i - mean_{j != i} r_j = G/(G-1) * (r_i - mu_m).

    Computed in the second form (float64, from the centred rewards): the
    first, (G mu - r_i) / (G - 1), cancels and leaves rounding noise in
    all-equal groups.
    """

    min_group_size = 2

    def compute(self, batch: GroupedBatch, *, training: bool) -> tuple[Tensor, dict[str, float]]:
        return batch.grouping.map(lambda c, g: c * (g / (g - 1.0)), batch.centred, batch.group_sizes), {}  # (N,)


_PRIOR_DECAY = {"batch": 0.0, "running": 1.0}
_POOLINGS = ("partial", "none")
_TOPIC_PRIOR_GROUPS = 2.0  # nu: pseudo-groups of the pooled within-topic variances (docs/hierarchical-prior.md)


@ESTIMATORS.register("ebpo")
class EBPO:
    """Empirical Bayes Policy Optimization (arXiv 2602.05165), docs/methods.md#ebpo.

    The group baseline is shrunk toward a global prior::

        S_q   = (sigma^2/G_q) / (sigma^2/G_q + tau^2)      (S_q = 1 if denominator <= eps)
        V_q   = (1 - S_q) * mu_q + S_q * mu_glob
        A_raw = r - V_q
        A     = (A_raw - mean(A_raw)) / (std(A_raw, N-1) + eps)   (batch-level standardisation)

    sigma^2 is the population variance of every individual reward and
    (mu_glob, tau^2) the mean and population variance of the raw group means,
    kept by two :class:`~ebpo.stats.Welford` accumulators into which the
    current batch is merged before anything is computed.

    Args:
        prior: where the statistics come from.
            ``"batch"`` (default): the current batch only, exactly as the
            authors' released verl code (it builds fresh accumulators on every
            call). ``"running"``: Welford across all training steps, the
            paper's Algorithm 1. ``"ema"``: like running, but the weight of
            past steps decays by ``decay`` per step, because the policy moves
            and old statistics go stale (our addition).
        decay: per-step forgetting factor for ``prior="ema"`` (default 0.9:
            an effective memory of about 10 steps).
        std_normalize: divide by the batch std of A_raw (N-1, eps 1e-6); on by
            default as in the paper.
        center: subtract the batch mean of A_raw (default True). With
            ``center=False, std_normalize=False`` the estimator returns
            A_raw itself (used by ``ebpo simulate`` to read the baseline).
        eps: the shrinkage and standardisation epsilon (1e-6).
        hierarchical: a two-level prior (our extension; derivation in
            docs/hierarchical-prior.md): each group shrinks
            toward its topic's mean (``topic_ids=`` of the call), and each
            topic's mean and variances are partially pooled toward the
            global ones. Without topic ids, or with one topic, it is flat
            EBPO (to rounding, 1e-12). Per-topic accumulators follow
            ``prior`` (batch / running / ema) and are part of the state.
        pooling: ``"partial"`` (default) or ``"none"``, the no-pooling
            form (each topic's statistics on their own).
        topic_prior_groups: nu, how many groups' worth of weight the pooled
            within-topic variances get against a topic's own (default 2).

    Because of the prior, EBPO gives a baseline to groups of any size,
    including G = 1, so ``min_group_size`` is 1. With std_normalize the
    batch needs at least 2 responses.
    """

    min_group_size = 1

    def __init__(
        self,
        prior: str = "batch",
        decay: float | None = None,
        std_normalize: bool = True,
        center: bool = True,
        eps: float = EPS,
        hierarchical: bool = False,
        pooling: str | None = None,
        topic_prior_groups: float | None = None,
    ) -> None:
        if prior == "ema":
            decay = 0.9 if decay is None else decay
            if not 0.0 < decay < 1.0:
                raise ValueError(f"ebpo prior='ema' needs decay in (0, 1), got {decay}")
        elif prior in _PRIOR_DECAY:
            if decay is not None:
                raise ValueError(f"ebpo decay applies only to prior='ema', not prior={prior!r}")
            decay = _PRIOR_DECAY[prior]
        else:
            raise ValueError(f"ebpo prior must be one of ['batch', 'running', 'ema'], got {prior!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not hierarchical and (pooling is not None or topic_prior_groups is not None):
            raise ValueError("ebpo pooling and topic_prior_groups apply only with hierarchical=True")
        pooling = "partial" if pooling is None else pooling
        topic_prior_groups = _TOPIC_PRIOR_GROUPS if topic_prior_groups is None else float(topic_prior_groups)
        if pooling not in _POOLINGS:
            raise ValueError(f"ebpo pooling must be one of {list(_POOLINGS)}, got {pooling!r}")
        if not (math.isfinite(topic_prior_groups) and topic_prior_groups >= 0):
            raise ValueError(f"ebpo topic_prior_groups must be a finite number >= 0, got {topic_prior_groups}")
        self.prior, self.decay = prior, float(decay)
        self.std_normalize, self.center, self.eps = std_normalize, center, eps
        self.hierarchical, self.pooling, self.topic_prior_groups = hierarchical, pooling, float(topic_prior_groups)
        self.reward_stats = Welford()  # over individual rewards -> sigma^2
        self.group_stats = Welford()  # over group means -> mu_glob, tau^2
        self.topic_reward_stats = KeyedWelford.empty()  # hierarchical: per topic, over rewards -> sigma_k^2
        self.topic_group_stats = KeyedWelford.empty()  # hierarchical: per topic, over group means -> mu_k, tau_k^2

    def compute(self, batch: GroupedBatch, *, training: bool) -> tuple[Tensor, dict[str, float]]:
        if self.std_normalize and batch.num_responses < 2:
            raise ValueError("ebpo batch-level standardisation needs at least 2 responses in the batch")
        # The current batch enters the statistics before they are used (Algorithm 1, step 2).
        # Everything below computes the new state without storing it; it is committed at the end,
        # once nothing can fail (a rejected batch leaves the prior as it was).
        reward_stats = self.reward_stats.decayed(self.decay).merge(Welford.from_values(batch.rewards))
        group_stats = self.group_stats.decayed(self.decay).merge(Welford.from_values(batch.group_means))
        sigma2, mu_glob, tau2 = reward_stats.var, group_stats.mean, group_stats.var
        if not all(math.isfinite(x) for x in (sigma2, mu_glob, tau2)):
            raise ValueError(
                f"ebpo statistics overflow float64 (sigma^2={sigma2}, mu_glob={mu_glob}, tau^2={tau2}): "
                f"rewards up to {float(batch.rewards.abs().max()):.3g} are too large; rescale the rewards"
            )
        metrics = {
            "ebpo/mu_glob": mu_glob,
            "ebpo/sigma2": sigma2,
            "ebpo/tau2": tau2,
            "ebpo/prior_count": group_stats.count,
        }
        if self.hierarchical:
            topic_rewards, topic_groups, (group_sigma2, group_tau2, target), topic_metrics = self._topic_prior(
                batch, mu_glob
            )
            metrics.update(topic_metrics)
        else:  # flat EBPO: one prior for every group
            group_sigma2, group_tau2, target = sigma2, tau2, mu_glob

        noise = group_sigma2 / batch.group_sizes  # (M,) sigma^2 / G_q
        denom = noise + group_tau2
        shrinkage = torch.where(denom > self.eps, noise / denom.clamp_min(self.eps), torch.ones_like(noise))  # (M,)
        baseline = (1.0 - shrinkage) * batch.group_means + shrinkage * target  # (M,)
        advantages = batch.grouping.map(
            torch.sub, batch.rewards, baseline
        )  # (N,) A_raw = r - V_q (fresh: in place below)
        raw_mean = float(advantages.mean())
        if self.center:
            advantages.sub_(raw_mean)
        if self.std_normalize:
            advantages.div_(advantages.std(unbiased=True) + self.eps)
        metrics.update({"ebpo/shrinkage": float(shrinkage.mean()), "ebpo/raw_adv_mean": raw_mean})
        if training:  # evaluation must never move the prior; commit only once nothing can fail here
            self.reward_stats, self.group_stats = reward_stats, group_stats
            if self.hierarchical:
                self.topic_reward_stats, self.topic_group_stats = topic_rewards, topic_groups
        return advantages, metrics

    def _topic_prior(
        self, batch: GroupedBatch, mu_glob: float
    ) -> tuple[KeyedWelford, KeyedWelford, tuple[Tensor, Tensor, Tensor], dict[str, float]]:
        """The hierarchical prior of each group (docs/hierarchical-prior.md): (sigma_k*^2, tau_k*^2, mu_k*) per group (M,).

        Per topic k: sigma_k^2, mu_k, tau_k^2 from the topic's accumulators
        (the batch merged in); pooled within-topic sigma_w^2, tau_w^2 and the
        between-topic omega^2 over every topic the prior knows; then
        w_k = m_k / (m_k + nu) pulls the topic's variances toward the pooled
        ones and B_k = (tau_k*^2/m_k) / (tau_k*^2/m_k + omega^2) its mean toward mu_glob.
        """
        keys, topic_of_group = torch.unique(batch.group_topics, sorted=True, return_inverse=True)  # (K,), (M,)
        topic_rewards = self.topic_reward_stats.decayed(self.decay).merge(
            KeyedWelford.from_grouped_values(batch.rewards, batch.grouping, batch.group_sizes, keys, topic_of_group)
        )
        topic_groups = self.topic_group_stats.decayed(self.decay).merge(
            KeyedWelford.from_values(batch.group_means, batch.group_topics)
        )
        sigma2_pooled, tau2_pooled, topic_mean, pool, (sigma2_within, tau2_within, omega2) = self._pooled(
            topic_rewards, topic_groups, mu_glob
        )
        slot = topic_groups.lookup(batch.group_topics)  # (M,) each group's topic
        metrics = {
            "ebpo/num_topics": float(keys.numel()),
            "ebpo/omega2": omega2,
            "ebpo/tau2_within": tau2_within,
            "ebpo/sigma2_within": sigma2_within,
            "ebpo/topic_pooling": float(pool[slot].mean()),
        }
        return topic_rewards, topic_groups, (sigma2_pooled[slot], tau2_pooled[slot], topic_mean[slot]), metrics

    def _pooled(
        self, topic_rewards: KeyedWelford, topic_groups: KeyedWelford, mu_glob: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[float, float, float]]:
        """Each known topic's (sigma_k*^2, tau_k*^2, mu_k*, B_k), all (K,), and (sigma_w^2, tau_w^2, omega^2).

        ``topic_rewards`` and ``topic_groups`` see the same topics with the same decay, so their keys agree.
        """
        m_k, mu_k = topic_groups.count, topic_groups.mean  # (K,) effective groups, topic means
        sigma2_k, tau2_k = topic_rewards.var, topic_groups.var  # (K,)
        sigma2_within = float(topic_rewards.m2.sum() / topic_rewards.count.sum())
        tau2_within = float(topic_groups.m2.sum() / m_k.sum())
        omega2 = float((m_k * (mu_k - mu_glob) ** 2).sum() / m_k.sum())
        if self.pooling == "none":  # the no-pooling form of docs/hierarchical-prior.md: each topic on its own
            return sigma2_k, tau2_k, mu_k, torch.zeros_like(mu_k), (sigma2_within, tau2_within, omega2)
        weight = m_k / (m_k + self.topic_prior_groups)  # (K,) trust in the topic's own variances
        sigma2_pooled = sigma2_within + weight * (sigma2_k - sigma2_within)
        tau2_pooled = tau2_within + weight * (tau2_k - tau2_within)
        mean_noise = tau2_pooled / m_k  # (K,) variance of mu_k as an estimate of the topic's mean
        denom = mean_noise + omega2
        pool = torch.where(denom > self.eps, mean_noise / denom.clamp_min(self.eps), torch.ones_like(denom))  # B_k
        topic_mean = (1.0 - pool) * mu_k + pool * mu_glob
        return sigma2_pooled, tau2_pooled, topic_mean, pool, (sigma2_within, tau2_within, omega2)

    def population_prior(
        self, topic_ids: Tensor | Sequence[int] | None = None
    ) -> tuple[float, float] | tuple[Tensor, Tensor] | None:
        """(mu_glob, tau^2) of the statistics as they stand (after the last training batch); None before any.

        What a rollout allocator starts a prompt it knows nothing about from (``ebpo train
        --allocation eb``): the mean and variance of observed group means, over the batch
        (``prior='batch'``) or every step (``'running'``, ``'ema'``).

        With ``hierarchical=True`` and ``topic_ids`` (P,) (one per prompt, as the call's
        ``topic_ids=``): two (P,) float64 tensors, each prompt's topic prior as the estimator
        shrinks toward it, (mu_k*, tau_k*^2) of docs/hierarchical-prior.md; a topic the
        statistics have not seen gets the global (mu_glob, tau^2). Without ``hierarchical``,
        ``topic_ids`` is ignored (the flat prior is every topic's).
        """
        topics = None
        if topic_ids is not None and self.hierarchical:
            topics = torch.as_tensor(topic_ids).reshape(-1)
            if topics.is_floating_point() or topics.is_complex() or topics.dtype == torch.bool:
                raise ValueError(f"topic_ids must be integers, got dtype {topics.dtype}")
            topics = topics.to(torch.long)
        if self.group_stats.count <= 0:
            return None
        mu_glob, tau2 = float(self.group_stats.mean), float(self.group_stats.var)
        if topics is None:
            return mu_glob, tau2
        mean = torch.full(topics.shape, mu_glob, dtype=torch.float64)  # on the CPU, as the allocator wants them
        var = torch.full(topics.shape, tau2, dtype=torch.float64)
        known = self.topic_group_stats
        if known.keys.numel() == 0:
            return mean, var
        _, tau2_pooled, topic_mean, _, _ = self._pooled(self.topic_reward_stats, known, mu_glob)
        slot, seen = find_sorted(known.keys.cpu(), topics.cpu())  # (P,) each
        mean[seen], var[seen] = topic_mean.cpu()[slot[seen]], tau2_pooled.cpu()[slot[seen]]
        return mean, var

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "prior": self.prior,
            "decay": self.decay,
            "reward_stats": self.reward_stats.state_dict(),
            "group_stats": self.group_stats.state_dict(),
        }
        if self.hierarchical:
            state["topic_reward_stats"] = self.topic_reward_stats.state_dict()
            state["topic_group_stats"] = self.topic_group_stats.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("prior") != self.prior or float(state.get("decay", math.nan)) != self.decay:
            raise ValueError(
                f"ebpo state was saved with prior={state.get('prior')!r}, decay={state.get('decay')!r} "
                f"but this estimator has prior={self.prior!r}, decay={self.decay!r}"
            )
        has_topics = "topic_group_stats" in state
        if has_topics != self.hierarchical:
            raise ValueError(
                f"ebpo state was saved {'with' if has_topics else 'without'} a hierarchical (per-topic) prior "
                f"but this estimator has hierarchical={self.hierarchical}"
            )
        reward_stats = Welford.from_state_dict(state["reward_stats"])
        group_stats = Welford.from_state_dict(state["group_stats"])
        if self.hierarchical:
            topic_rewards = KeyedWelford.from_state_dict(state["topic_reward_stats"])
            topic_groups = KeyedWelford.from_state_dict(state["topic_group_stats"])
            if not torch.equal(topic_rewards.keys, topic_groups.keys):
                raise ValueError("ebpo state: the per-topic reward and group-mean accumulators name different topics")
            self.topic_reward_stats, self.topic_group_stats = topic_rewards, topic_groups
        self.reward_stats, self.group_stats = reward_stats, group_stats


class AdvantagePipeline:
    """Validate -> group -> estimate -> weight -> metrics. What ``build_estimator`` returns.

    Attributes:
        name: the estimator's registry name (or import path).
        estimator: the registered :class:`Estimator`.
        weighting: an optional :class:`~ebpo.weighting.Weighting` whose
            per-response weights multiply the advantages (HA-DW: the weight
            sits inside both branches of the clipped objective, so scaling
            the advantage is exact).
    """

    def __init__(self, name: str, estimator: Estimator, weighting: Weighting | None = None) -> None:
        self.name, self.estimator, self.weighting = name, estimator, weighting

    @property
    def min_group_size(self) -> int:
        return int(self.estimator.min_group_size)

    def population_prior(
        self, topic_ids: Tensor | Sequence[int] | None = None
    ) -> tuple[float, float] | tuple[Tensor, Tensor] | None:
        """The estimator's (mean, variance) of group mean rewards when it keeps a population prior (EBPO), else None.

        With ``topic_ids`` (P,), an estimator with per-topic priors gives each prompt its topic's, two (P,)
        tensors (:meth:`EBPO.population_prior`); others give their one prior.
        """
        prior = getattr(self.estimator, "population_prior", None)  # optional: most estimators keep none
        if prior is None:
            return None
        return prior(topic_ids) if topic_ids is not None else prior()

    def __call__(
        self,
        rewards: Tensor | Sequence[float],
        group_ids: Tensor | Sequence[int],
        *,
        topic_ids: Tensor | Sequence[int] | None = None,
        correctness: Tensor | Sequence[float] | None = None,
        prompt_ids: Tensor | Sequence[int] | None = None,
        training: bool = True,
    ) -> tuple[Tensor, dict[str, float]]:
        """Advantages (N,) in the rewards' dtype and metrics.

        Args:
            rewards: (N,) the rewards the policy is trained on (possibly shaped).
            group_ids: (N,) integer id of each response's group in this batch.
            topic_ids: optional (N,) integer topic id of each response (one
                topic per group). Estimators without a use for them (all but
                ``ebpo`` with ``hierarchical=True``) ignore them; they are
                validated all the same.
            prompt_ids: optional (N,) integer id of each response's prompt,
                the same at every step (one prompt per group; see
                :func:`stable_prompt_ids`). Needed by the estimators that
                keep state per prompt (``spo``; ``krpo`` with
                ``carry=True``); validated and ignored by the others.
            correctness: optional (N,) the verifier's correctness before any
                shaping; what HA-DW's accuracy and difficulty read. Defaults
                to ``rewards``.
            training: False computes the same advantages without moving any state.

        Transactional: a batch that is rejected anywhere (validation, the
        estimator, the weighting, non-finite or unrepresentable advantages)
        raises and leaves the estimator's and the weighting's state exactly as
        before the call, so a caller that catches the error and skips the batch
        continues from uncorrupted statistics.
        """
        batch = PromptedBatch.from_inputs(rewards, group_ids, topic_ids=topic_ids, correctness=correctness)
        if prompt_ids is not None:
            batch = dataclasses.replace(batch, group_prompts=_group_prompts(prompt_ids, group_ids, batch))
        batch.require_min_group_size(self.min_group_size, self.name)
        if not training:  # nothing moves: no snapshot needed
            return self._run(batch, training=False)
        # Components are asked to validate before they change state, but a later component (the
        # weighting, the final checks) can still reject the batch after an earlier one has moved:
        # commit all or nothing by restoring the snapshot on any failure.
        snapshot = copy.deepcopy(self.state_dict())
        try:
            return self._run(batch, training=True)
        except BaseException:
            self.load_state_dict(snapshot)
            raise

    def _run(self, batch: PromptedBatch, *, training: bool) -> tuple[Tensor, dict[str, float]]:
        advantages, metrics = self.estimator.compute(batch, training=training)  # (N,) float64
        metrics = dict(metrics)
        if self.weighting is not None:
            weights, weight_metrics = self.weighting(advantages, batch, training=training)  # (N,)
            advantages = advantages * weights
            metrics.update(weight_metrics)
        total = advantages.sum()  # NaN or inf iff an advantage is (or, finite, their sum overflows)
        if not math.isfinite(float(total)) and not bool(torch.isfinite(advantages).all()):
            raise FloatingPointError(f"{self.name} produced non-finite advantages")  # a bug, never a user's input
        low, high = advantages.aminmax()
        if batch.dtype != torch.float64 and not bool(torch.isfinite(torch.stack([low, high]).to(batch.dtype)).all()):
            # Computed in float64, but the caller asked for its rewards' dtype, which cannot hold them:
            # refuse rather than return inf (a half-precision reward pipeline with large rewards).
            # Rounding is monotone, so the extremes overflow iff any advantage does.
            largest = float(torch.maximum(-low, high))
            raise ValueError(
                f"{self.name} advantages reach {largest:.6g}, beyond the range of the rewards' dtype {batch.dtype} "
                f"(max {torch.finfo(batch.dtype).max:.6g}); pass the rewards as float32 or rescale them"
            )
        metrics.update(_advantage_metrics(advantages, batch, total, low, high))
        return advantages.to(batch.dtype), metrics

    def state_dict(self) -> dict[str, Any]:
        return {
            "estimator": self.name,
            "estimator_state": self.estimator.state_dict(),
            "weighting_state": self.weighting.state_dict() if self.weighting is not None else {},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("estimator") != self.name:
            raise ValueError(f"state belongs to estimator {state.get('estimator')!r}, not {self.name!r}")
        self.estimator.load_state_dict(state["estimator_state"])
        weighting_state = state.get("weighting_state", {})
        if self.weighting is not None:
            self.weighting.load_state_dict(weighting_state)
        elif weighting_state:
            raise ValueError("state has a weighting state but this estimator has no weighting")


def _advantage_metrics(
    advantages: Tensor, batch: GroupedBatch, total: Tensor, low: Tensor, high: Tensor
) -> dict[str, float]:
    """The shared metrics from advantages (N,) and their sum, min and max; one host sync for all of them."""
    # Zero signal: an advantage that is rounding noise next to the batch's largest (group-relative
    # estimators give all-equal groups exact zeros; see GroupedBatch.centred).
    threshold = 1e-12 * torch.maximum(-low, high)  # max |A| * 1e-12
    n = batch.num_responses
    # |A| <= t counted as (A <= t) - (A < -t): two (N,) bool masks instead of an (N,) float64 |A|.
    zero = torch.count_nonzero(advantages <= threshold) - torch.count_nonzero(advantages < -threshold)
    values = torch.stack(
        [
            total / n,
            torch.linalg.vector_norm(advantages, ord=1) / n,  # mean |A| without materialising |A|
            high,
            low,
            zero.to(torch.float64) / n,
            batch.all_equal.sum().to(torch.float64) / batch.num_groups,  # (M,) group statistic
            batch.rewards.mean(),
        ]
    ).tolist()
    names = (
        "adv/mean",
        "adv/abs_mean",
        "adv/max",
        "adv/min",
        "adv/zero_signal_frac",
        "adv/all_equal_group_frac",
        "reward/mean",
    )
    return dict(zip(names, values))


def build_estimator(
    name: str, *, weighting: str | None = None, weighting_options: Mapping[str, Any] | None = None, **options: Any
) -> AdvantagePipeline:
    """Build an advantage estimator by registry name or ``module:attr`` path.

    Args:
        name: one of :func:`list_estimators` or an import path to a factory
            returning an :class:`Estimator`.
        weighting: optional weighting name (``"ha_dw"``) or import path; it
            composes with every estimator.
        weighting_options: options for the weighting (``{"anchor": "hard", "lam": 1.5}``).
        **options: options for the estimator.

    >>> est = build_estimator("grpo")
    >>> adv, _ = est(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([7, 7, 3, 3]))
    >>> [round(a, 4) for a in adv.tolist()]
    [0.7071, -0.7071, 0.0, 0.0]
    """
    estimator = ESTIMATORS.build(name, **options)
    for attr in ("compute", "state_dict", "load_state_dict", "min_group_size"):
        if not hasattr(estimator, attr):
            raise ValueError(
                f"advantage estimator {name!r} does not implement {attr!r} (see ebpo.estimators.Estimator)"
            )
    if weighting_options and weighting is None:
        raise ValueError("weighting_options given without a weighting name")
    weighting_obj = WEIGHTINGS.build(weighting, **dict(weighting_options or {})) if weighting is not None else None
    return AdvantagePipeline(name, estimator, weighting_obj)


def list_estimators() -> list[str]:
    return ESTIMATORS.names()


# The other baselines (JSPO, SPO, KRPO) register themselves in ESTIMATORS; imported last because that module
# builds on the names above.
from ebpo import estimators_shrinkage as _estimators_shrinkage  # noqa: E402, F401
