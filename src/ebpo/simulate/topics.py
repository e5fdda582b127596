"""Baseline MSE on a mixture of topics: hierarchical EBPO vs flat EBPO vs the group mean (docs/hierarchical-prior.md).

Topic k has success rates theta ~ Beta(c m_k, c (1 - m_k)) (mean m_k,
concentration c); a batch holds ``groups[k]`` prompts of topic k, each with a
group of G Bernoulli(theta) rewards and its topic id. Every baseline is read
back from the library's estimator (``std_normalize=False, center=False``
returns A_raw = r - V_q), all with the per-batch prior:

* group mean (Dr. GRPO: V = r - A);
* flat EBPO (one global prior);
* hierarchical EBPO, no pooling (the per-topic form of docs/hierarchical-prior.md);
* hierarchical EBPO, partial pooling (docs/hierarchical-prior.md);
* oracle: knows each topic's Beta and shrinks toward the topic's true mean
  with the MSE-optimal linear factor S*_k = (E[θ(1-θ)]/G) / (E[θ(1-θ)]/G + Var θ)
  (exact population moments; not an estimator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ebpo.estimators import build_estimator
from ebpo.simulate.populations import parse_dist, sample_rewards

__all__ = ["TOPIC_BASELINES", "topic_population", "topic_mixture_mse"]

TOPIC_BASELINES = ["group mean", "flat ebpo", "hierarchical (no pooling)", "hierarchical (partial)", "oracle"]

_ESTIMATORS: dict[str, dict[str, Any]] = {
    "group mean": {"name": "dr_grpo"},
    "flat ebpo": {"name": "ebpo", "std_normalize": False, "center": False},
    "hierarchical (no pooling)": {
        "name": "ebpo",
        "std_normalize": False,
        "center": False,
        "hierarchical": True,
        "pooling": "none",
    },
    "hierarchical (partial)": {"name": "ebpo", "std_normalize": False, "center": False, "hierarchical": True},
}


def topic_population(mean: float, concentration: float) -> Any:
    """Beta(c m, c (1 - m)) as a :class:`~ebpo.simulate.populations.Population` (exact moments)."""
    if not 0.0 < mean < 1.0 or not concentration > 0:
        raise ValueError(f"topic means must be in (0, 1) and the concentration > 0, got {mean}, {concentration}")
    return parse_dist(f"beta:{concentration * mean!r},{concentration * (1.0 - mean)!r}")


def topic_mixture_mse(
    topic_means: Sequence[float],
    concentration: float,
    groups: Sequence[int],
    group_size: int,
    batches: int,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Per-batch baseline MSE against the true theta for each baseline, overall and in the topic with fewest groups.

    Returns ``{"mean": {name: mse}, "std_error": {...}, "smallest_topic": {name: mse}, "smallest_topic_mean": m_k,
    "groups": [...]}``; the smallest topic's MSE is pooled over all its groups in every batch.
    """
    if len(topic_means) != len(groups) or min(groups) < 1 or group_size < 2 or batches < 1:
        raise ValueError(
            f"need one group count >= 1 per topic, G >= 2 and batches >= 1; got {list(groups)}, G={group_size}, {batches}"
        )
    populations = [topic_population(m, concentration) for m in topic_means]
    estimators = {
        name: build_estimator(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
        for name, spec in _ESTIMATORS.items()
    }
    # oracle: the MSE-optimal linear shrinkage toward each topic's true mean
    s_star = torch.tensor(
        [p.noise / group_size / (p.noise / group_size + p.var) for p in populations], dtype=torch.float64
    )
    topic_of_group = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor(list(groups)))  # (M,)
    true_mean = torch.tensor(list(topic_means), dtype=torch.float64)[topic_of_group]  # (M,)
    smallest = int(torch.tensor(list(groups)).argmin())
    in_smallest = topic_of_group == smallest  # (M,)
    per_batch: dict[str, list[float]] = {name: [] for name in TOPIC_BASELINES}
    small_sse = {name: 0.0 for name in TOPIC_BASELINES}
    for _ in range(batches):
        theta = torch.cat([p.sample(n, generator) for p, n in zip(populations, groups)])  # (M,)
        rewards, group_ids = sample_rewards(theta, group_size, generator)  # (M * G,)
        topic_ids = topic_of_group.repeat_interleave(group_size)  # (M * G,)
        baselines = {}
        for name, estimator in estimators.items():
            advantages, _ = estimator(rewards, group_ids, topic_ids=topic_ids)
            baselines[name] = (rewards - advantages).view(-1, group_size)[:, 0]  # (M,) V_q (one per group)
        group_mean = rewards.view(-1, group_size).mean(1)
        s = s_star[topic_of_group]
        baselines["oracle"] = (1 - s) * group_mean + s * true_mean
        for name, baseline in baselines.items():
            err = (baseline - theta) ** 2  # (M,)
            per_batch[name].append(float(err.mean()))
            small_sse[name] += float(err[in_smallest].sum())
    small_count = batches * int(in_smallest.sum())
    mean = {name: sum(v) / len(v) for name, v in per_batch.items()}
    std_error = {
        name: (
            float(torch.tensor(v, dtype=torch.float64).std(unbiased=True)) / math.sqrt(len(v))
            if len(v) > 1
            else math.nan
        )
        for name, v in per_batch.items()
    }
    return {
        "groups": list(groups),
        "mean": mean,
        "std_error": std_error,
        "smallest_topic_mean": float(topic_means[smallest]),
        "smallest_topic": {name: sse / small_count for name, sse in small_sse.items()},
    }
