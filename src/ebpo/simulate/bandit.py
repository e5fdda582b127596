"""A softmax bandit per prompt: policy-gradient learning curves for each advantage estimator.

Prompt q has learnable logits z_q over K candidate answers, answer 0 the
correct one. Difficulty varies by design:

* the initial success rate theta_q = softmax(z_q)[0] is drawn from a
  population (default Beta(1, 3): most prompts hard, a few easy);
* the wrong answers' logits are drawn N(0, spread^2), so on a hard prompt
  the policy mostly picks one or two dominant distractors (a confident wrong
  belief, not a uniform guess), and z_q0 is then set so that
  softmax(z_q)[0] = theta_q exactly:
  z_q0 = logit(theta_q) + logsumexp(z_q,wrong).

Each step draws ``batch`` prompts without replacement, G answers for each
from the current policy, rewards r = [answer == 0], advantages from the
estimator, and ascends the REINFORCE surrogate of every drawn prompt at
once (no loop over prompts)::

    z_q += lr * (1/G) * sum_i A_{q,i} * (onehot(a_{q,i}) - softmax(z_q))

(the exact gradient of log softmax(z_q)[a] with respect to z_q).

Update scale. Plain SGD on the logits rewards estimators whose advantages
are simply larger (RLOO's are G/(G-1) times Dr. GRPO's; HA-DW multiplies by
lambda = 1.3 on average), which Adam-trained language models largely do not
see. ``update="rms"`` divides each step's advantages by their root mean
square over the batch, so every estimator takes steps of the same overall
size and only the direction and the split between prompts differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ebpo.estimators import build_estimator
from ebpo.simulate.baselines import SIGNAL_ESTIMATORS
from ebpo.simulate.populations import Population
from ebpo.stats_report import mean_ci, t_quantile

__all__ = ["BANDIT_ESTIMATORS", "BanditConfig", "init_logits", "reinforce_gradient", "run_bandit", "bandit_curves"]

# The estimators of the zero-signal analysis, so both parts of ebpo simulate compare the same set.
BANDIT_ESTIMATORS: dict[str, dict[str, Any]] = SIGNAL_ESTIMATORS

UPDATES = ("sgd", "rms")


@dataclass(frozen=True)
class BanditConfig:
    """The bandit's setting (one field per ``--bandit-*`` flag of ``ebpo simulate``)."""

    group_size: int = 4
    prompts: int = 512
    batch: int = 64
    answers: int = 8
    spread: float = 1.0
    steps: int = 300
    lr: float = 0.5
    update: str = "sgd"

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(
                f"bandit group size must be >= 2 (GRPO and RLOO need two responses), got {self.group_size}"
            )
        if not 1 <= self.batch <= self.prompts:
            raise ValueError(f"bandit batch must be in [1, prompts={self.prompts}], got {self.batch}")
        if self.answers < 2:
            raise ValueError(f"bandit needs at least 2 candidate answers, got {self.answers}")
        if self.steps < 1 or not self.lr > 0 or self.spread < 0:
            raise ValueError(
                f"bandit needs steps >= 1, lr > 0 and spread >= 0, got {self.steps}, {self.lr}, {self.spread}"
            )
        if self.update not in UPDATES:
            raise ValueError(f"bandit update must be one of {UPDATES}, got {self.update!r}")


def init_logits(theta: Tensor, answers: int, spread: float, generator: torch.Generator) -> Tensor:
    """Logits (P, K) with softmax(.)[:, 0] == theta (P,) and N(0, spread^2) wrong-answer logits."""
    theta = theta.double().clamp(1e-4, 1 - 1e-4)  # a finite logit for theta at 0 or 1
    wrong = spread * torch.randn(theta.numel(), answers - 1, generator=generator, dtype=torch.float64)  # (P, K-1)
    correct = torch.log(theta) - torch.log1p(-theta) + torch.logsumexp(wrong, dim=1)  # (P,)
    return torch.cat([correct.unsqueeze(1), wrong], dim=1)


def reinforce_gradient(probs: Tensor, answers: Tensor, advantages: Tensor) -> Tensor:
    """Gradient of (1/G) sum_i A_i log softmax(z)[a_i] with respect to the logits z, every prompt at once.

    Args:
        probs: softmax(z) of the drawn prompts (B, K).
        answers: the sampled answers (B, G) int64.
        advantages: (B * G,) in the same prompt-major order.

    Returns:
        (B, K): (1/G) sum_i A_i (onehot(a_i) - probs).
    """
    num_answers, g = probs.shape[1], answers.shape[1]
    onehot = torch.nn.functional.one_hot(answers, num_answers).to(probs.dtype)  # (B, G, K)
    return (advantages.view(-1, g, 1) * (onehot - probs.unsqueeze(1))).mean(1)


def _success_entropy(logits: Tensor) -> tuple[float, float]:
    log_probs = torch.log_softmax(logits, dim=1)  # (P, K)
    return float(log_probs[:, 0].exp().mean()), float(-(log_probs.exp() * log_probs).sum(1).mean())


def run_bandit(spec: dict[str, Any], population: Population, config: BanditConfig, seed: int) -> dict[str, list[float]]:
    """One run: ``{"success": [...], "entropy": [...]}``, each of length ``steps + 1`` (before step 1 .. after the last).

    ``success`` is the mean over all prompts of the true success rate
    softmax(z_q)[0]; ``entropy`` the mean policy entropy in nats. The
    initial logits depend on ``seed`` only, so estimators compared at one
    seed start from the same prompts (and share random draws until their
    policies differ).
    """
    gen = torch.Generator().manual_seed(seed)
    logits = init_logits(population.sample(config.prompts, gen), config.answers, config.spread, gen)  # (P, K)
    estimator = build_estimator(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
    g = config.group_size
    success, entropy = [], []
    for _ in range(config.steps):
        s, e = _success_entropy(logits)
        success.append(s)
        entropy.append(e)
        chosen = torch.randperm(config.prompts, generator=gen)[: config.batch]  # (B,) distinct prompts
        probs = torch.softmax(logits[chosen], dim=1)  # (B, K)
        answers = torch.multinomial(probs, g, replacement=True, generator=gen)  # (B, G)
        rewards = (answers == 0).double().reshape(-1)  # (B * G,)
        advantages, _ = estimator(rewards, chosen.repeat_interleave(g))  # (B * G,)
        if config.update == "rms":
            rms = float(advantages.square().mean().sqrt())
            if rms > 0:  # an all-zero step (every group all-equal under GRPO) stays a zero step
                advantages = advantages / rms
        logits[chosen] += config.lr * reinforce_gradient(probs, answers, advantages)  # chosen are distinct: exact
    s, e = _success_entropy(logits)
    success.append(s)
    entropy.append(e)
    return {"success": success, "entropy": entropy}


def _mean_ci_curve(runs: list[list[float]], level: float = 0.95) -> dict[str, list[float]]:
    x = torch.tensor(runs, dtype=torch.float64)  # (seeds, steps + 1)
    mean = x.mean(0)
    if x.shape[0] < 2:
        half = torch.full_like(mean, math.nan)
    else:
        half = t_quantile(0.5 + level / 2, x.shape[0] - 1) * x.std(0, unbiased=True) / math.sqrt(x.shape[0])
    return {"mean": mean.tolist(), "ci_half_width": half.tolist()}


def bandit_curves(
    population: Population,
    config: BanditConfig,
    seeds: int,
    base_seed: int = 0,
    estimators: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Every estimator (default :data:`BANDIT_ESTIMATORS`; it must include ``"grpo"``) on ``seeds`` seeds; mean and 95% CI curves.

    Returns ``{label: {"success": {"mean", "ci_half_width"}, "entropy": {...},
    "final_success": {"mean", "ci_half_width", "per_seed"}, "final_entropy": {...},
    "final_success_minus_grpo": {"mean", "std", "ci_half_width", "n"},
    "auc": {...}, "auc_minus_grpo": {...}}}``, where ``auc`` is the success rate
    averaged over all steps (the area under the learning curve: speed, not
    only the end point). Differences to GRPO are paired by seed (the same
    seed gives every estimator the same initial logits), so their CIs are
    much tighter than the difference of two CIs.
    """
    specs = BANDIT_ESTIMATORS if estimators is None else estimators
    if seeds < 1:
        raise ValueError(f"need at least one bandit seed, got {seeds}")
    if "grpo" not in specs:
        raise ValueError(f"the bandit reports differences to 'grpo', which is missing from {sorted(specs)}")
    out: dict[str, Any] = {}
    for label, spec in specs.items():
        runs = [
            run_bandit(spec, population, config, seed=base_seed + 1000 * s + config.group_size) for s in range(seeds)
        ]
        entry: dict[str, Any] = {}
        for key in ("success", "entropy"):
            curve = _mean_ci_curve([r[key] for r in runs])
            entry[key] = curve
            entry[f"final_{key}"] = {
                "mean": curve["mean"][-1],
                "ci_half_width": curve["ci_half_width"][-1],
                "per_seed": [r[key][-1] for r in runs],
            }
        entry["auc"] = {**mean_ci(aucs := [sum(r["success"]) / len(r["success"]) for r in runs]), "per_seed": aucs}
        out[label] = entry
    for key in ("final_success", "auc"):
        reference = out["grpo"][key]["per_seed"]
        for entry in out.values():
            entry[f"{key}_minus_grpo"] = mean_ci([a - b for a, b in zip(entry[key]["per_seed"], reference)])
    return out
