"""Baseline MSE and zero learning signal, measured through the library's estimators.

Every estimator is built with :func:`ebpo.estimators.build_estimator` and
its baseline is read back from its output, never re-implemented here:

* group mean: Dr. GRPO's advantage is r - mu_q, so V = r - A;
* leave-one-out (RLOO): A_i = r_i - mean_{j != i} r_j, so V_i = r_i - A_i
  (one baseline per response; its MSE given p is p (1-p) / (G - 1));
* EBPO with each prior: built with ``std_normalize=False, center=False`` it
  returns A_raw = r - V_q, so V_q = r - A_raw.

The oracle shrinkage baseline is ours (it needs the true population):
V = (1 - S*) mu_q + S* E theta (see :mod:`ebpo.simulate.theory`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ebpo.estimators import AdvantagePipeline, build_estimator
from ebpo.simulate.populations import Population, sample_rewards
from ebpo.simulate.theory import (
    all_equal_probability,
    ebpo_population_shrinkage,
    oracle_shrinkage,
    shrinkage_mse_given_p,
    shrinkage_mse_population,
)

__all__ = ["EBPO_PRIORS", "MSE_BASELINES", "SIGNAL_ESTIMATORS", "baseline_mse", "zero_signal"]

EBPO_PRIORS: dict[str, dict[str, Any]] = {
    "ebpo-batch": {"prior": "batch"},
    "ebpo-running": {"prior": "running"},
    "ebpo-ema": {"prior": "ema", "decay": 0.9},
}

MSE_BASELINES = ["group mean", "leave-one-out", *EBPO_PRIORS, "oracle shrinkage"]


def _mean_se(values: list[float]) -> tuple[float, float]:
    x = torch.tensor(values, dtype=torch.float64)
    se = float(x.std(unbiased=True)) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return float(x.mean()), se


def baseline_mse(
    population: Population, group_size: int, prompts: int, batches: int, generator: torch.Generator, bins: int = 20
) -> dict[str, Any]:
    """Per-batch MSE of each baseline against the true theta, overall and by theta bin.

    ``batches`` successive batches of ``prompts`` prompts (theta drawn afresh
    each batch, G rewards each) go through one estimator per baseline, so the
    running and EMA priors accumulate over them as in training.

    Returns:
        ``{"per_batch": {name: [mse per batch]}, "mean": {name: float},
        "std_error": {name: float}, "closed_form": {...}, "shrinkage": {...},
        "bins": {"edges", "count", name: [mse per bin]},
        "closed_form_given_p": {"p", name: [MSE given p]}}``. The closed forms
        are the population values for the group mean (noise / G), the
        leave-one-out mean (noise / (G - 1)), the oracle and EBPO's
        large-batch limit.
    """
    if group_size < 2:
        raise ValueError(f"baseline MSE needs G >= 2 (the leave-one-out baseline), got {group_size}")
    if prompts < 2 or batches < 1:
        raise ValueError(f"need prompts >= 2 and batches >= 1, got prompts={prompts}, batches={batches}")
    estimators = {
        "group mean": build_estimator("dr_grpo"),
        "leave-one-out": build_estimator("rloo"),
        **{
            name: build_estimator("ebpo", std_normalize=False, center=False, **opts)
            for name, opts in EBPO_PRIORS.items()
        },
    }
    s_oracle = oracle_shrinkage(population, group_size)
    s_ebpo = ebpo_population_shrinkage(population, group_size)
    per_batch: dict[str, list[float]] = {name: [] for name in MSE_BASELINES}
    shrink: dict[str, list[float]] = {name: [] for name in EBPO_PRIORS}
    bin_sse = {name: torch.zeros(bins, dtype=torch.float64) for name in MSE_BASELINES}
    bin_count = torch.zeros(bins, dtype=torch.float64)
    for _ in range(batches):
        theta = population.sample(prompts, generator)  # (M,)
        rewards, group_ids = sample_rewards(theta, group_size, generator)  # (M * G,)
        which_bin = (theta * bins).long().clamp(0, bins - 1)  # (M,)
        bin_count += torch.bincount(which_bin, minlength=bins).double()
        sq_err: dict[str, Tensor] = {}  # name -> (M,) squared error per prompt (mean over its responses)
        for name, estimator in estimators.items():
            advantages, metrics = estimator(rewards, group_ids)
            baseline = (rewards - advantages).view(prompts, group_size)  # (M, G)
            sq_err[name] = ((baseline - theta.unsqueeze(1)) ** 2).mean(1)
            if name in shrink:
                shrink[name].append(metrics["ebpo/shrinkage"])
        group_mean = rewards.view(prompts, group_size).mean(1)  # (M,)
        oracle = (1 - s_oracle) * group_mean + s_oracle * population.mean
        sq_err["oracle shrinkage"] = (oracle - theta) ** 2
        for name, err in sq_err.items():
            per_batch[name].append(float(err.mean()))
            bin_sse[name] += torch.bincount(which_bin, weights=err, minlength=bins)
    stats = {name: _mean_se(values) for name, values in per_batch.items()}
    with_data = bin_count > 0
    p = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    return {
        "per_batch": per_batch,
        "mean": {name: m for name, (m, _) in stats.items()},
        "std_error": {name: se for name, (_, se) in stats.items()},
        "closed_form": {
            "group mean": population.noise / group_size,
            "leave-one-out": population.noise / (group_size - 1),
            "ebpo (large-batch limit)": shrinkage_mse_population(population, group_size, s_ebpo, population.mean),
            "oracle shrinkage": shrinkage_mse_population(population, group_size, s_oracle, population.mean),
        },
        "shrinkage": {
            **{name: sum(v) / len(v) for name, v in shrink.items()},
            "ebpo (large-batch limit)": s_ebpo,
            "oracle shrinkage": s_oracle,
        },
        "closed_form_given_p": {
            "p": p.tolist(),
            "group mean": shrinkage_mse_given_p(group_size, p, 0.0, 0.0).tolist(),
            "leave-one-out": (p * (1 - p) / (group_size - 1)).tolist(),
            "ebpo (large-batch limit)": shrinkage_mse_given_p(group_size, p, s_ebpo, population.mean).tolist(),
            "oracle shrinkage": shrinkage_mse_given_p(group_size, p, s_oracle, population.mean).tolist(),
        },
        "bins": {
            "edges": torch.linspace(0, 1, bins + 1, dtype=torch.float64).tolist(),
            "count": bin_count.tolist(),
            **{
                name: torch.where(with_data, sse / bin_count.clamp_min(1), torch.nan).tolist()
                for name, sse in bin_sse.items()
            },
        },
    }


SIGNAL_ESTIMATORS: dict[str, dict[str, Any]] = {
    "grpo": {"name": "grpo"},
    "dr_grpo": {"name": "dr_grpo"},
    "rloo": {"name": "rloo"},
    **{label: {"name": "ebpo", **opts} for label, opts in EBPO_PRIORS.items()},
    "ha_dw": {"name": "grpo", "weighting": "ha_dw"},
    "ebpo+ha_dw": {"name": "ebpo", "weighting": "ha_dw"},
}


def _build(spec: dict[str, Any]) -> AdvantagePipeline:
    return build_estimator(spec["name"], **{k: v for k, v in spec.items() if k != "name"})


def zero_signal(
    population: Population,
    group_size: int,
    prompts: int,
    batches: int,
    generator: torch.Generator,
    estimators: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Per estimator: the fraction of responses with zero advantage, and what all-failure groups get.

    ``estimators`` maps a label to ``build_estimator`` arguments
    (``{"name": ..., **options}``); default :data:`SIGNAL_ESTIMATORS`.

    Returns ``{"estimators": {label: {...}}, "all_equal_frac_expected", "all_failure_frac"}``;
    per estimator label: ``zero_signal_frac`` (responses with
    |A| <= 1e-12), ``all_failure_adv_mean`` (mean advantage of responses in
    all-failure groups; NaN if none occurred), ``all_failure_nonneg_frac``
    (the fraction of those that are >= 0: a zero or wrong-signed signal),
    and for EBPO
    ``raw_all_failure_adv`` = -S * mu_glob, the advantage before batch
    standardisation (docs/methods.md#all-failure-groups), from the estimator's own metrics.
    ``all_equal_frac_expected`` is E[theta^G + (1-theta)^G] over the drawn
    theta, which GRPO's zero fraction should match; ``all_failure_frac`` is
    the fraction of groups that failed entirely.
    """
    built = {label: _build(spec) for label, spec in (SIGNAL_ESTIMATORS if estimators is None else estimators).items()}
    acc: dict[str, dict[str, list[float]]] = {
        label: {"zero": [], "adv": [], "nonneg": [], "raw": []} for label in built
    }
    failures, all_equal = [], []
    for _ in range(batches):
        theta = population.sample(prompts, generator)
        rewards, group_ids = sample_rewards(theta, group_size, generator)
        failed_group = rewards.view(prompts, group_size).sum(1) == 0  # (M,)
        failed = failed_group.repeat_interleave(group_size)  # (N,)
        failures.append(float(failed_group.double().mean()))
        all_equal.append(all_equal_probability(theta, group_size))
        for label, estimator in built.items():
            advantages, metrics = estimator(rewards, group_ids)
            acc[label]["zero"].append(float((advantages.abs() <= 1e-12).double().mean()))
            if bool(failed.any()):
                acc[label]["adv"].append(float(advantages[failed].mean()))
                acc[label]["nonneg"].append(float((advantages[failed] >= 0).double().mean()))
            if "ebpo/shrinkage" in metrics:
                acc[label]["raw"].append(-metrics["ebpo/shrinkage"] * metrics["ebpo/mu_glob"])

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else math.nan

    table: dict[str, dict[str, float]] = {}
    for label, v in acc.items():
        table[label] = {
            "zero_signal_frac": mean(v["zero"]),
            "all_failure_adv_mean": mean(v["adv"]),
            "all_failure_nonneg_frac": mean(v["nonneg"]),
        }
        if v["raw"]:
            table[label]["raw_all_failure_adv"] = mean(v["raw"])
    return {"estimators": table, "all_equal_frac_expected": mean(all_equal), "all_failure_frac": mean(failures)}
