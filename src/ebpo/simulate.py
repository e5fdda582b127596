"""``ebpo simulate``: the papers' theory, checked with simulated rewards and no model.

    ebpo simulate --quick --out runs/simulate
    ebpo simulate --dist beta:2,2 --out runs/simulate --json runs/simulate/all.json

Prompts have true success rates theta drawn from ``--dist`` (``beta:a,b``,
``uniform:lo,hi`` or a mixture ``mix:0.5*beta:1,5+0.5*beta:5,1``); each gets a
group of G binary rewards. Reported (markdown table, PNG plots, JSON):

1. Baseline MSE against theta per estimator: the group mean (GRPO's
   baseline), EBPO with each prior (its baseline is r - A_raw, read from the
   estimator with ``std_normalize=False, center=False``), and the oracle
   shrinkage that knows the population's mean and variance
   (S* = (E[theta(1-theta)]/G) / (E[theta(1-theta)]/G + Var theta)).
2. The fraction of responses with zero learning signal per estimator, and
   the sign and mean size of the advantage in all-failure groups.
3. HA-DW's bias analysis (arXiv 2601.08521): P(mu_hat > p | group not
   all-equal) averaged over p ~ U(0, 0.25) and U(0, 0.5), exactly (a sum over
   the binomial, integrated over p numerically on a fine midpoint grid) and by
   Monte Carlo; and the bias E[mu_hat | mixed] - p against p, closed form
   (METHODS.md §3) and Monte Carlo.
4. A softmax bandit: many prompts, each with learnable logits over K
   candidate answers (one correct), initial success rates from ``--dist``;
   policy-gradient steps using each estimator; learning and entropy curves,
   mean and 95% CI over seeds.

Every estimator is used through ``ebpo.build_estimator``: nothing here
re-implements them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ebpo.estimators import build_estimator
from ebpo.stats_report import mean_ci

__all__ = [
    "parse_dist",
    "hadw_probability_exact",
    "hadw_probability_mc",
    "bias_closed_form",
    "baseline_mse",
    "zero_signal",
    "bandit",
    "main",
]

# ------------------------------------------------------------------ distributions


def parse_dist(spec: str) -> Callable[[int, torch.Generator], Tensor]:
    """A sampler ``(n, generator) -> theta (n,)`` from ``beta:a,b``, ``uniform:lo,hi`` or ``mix:w*D+w*D``."""
    spec = spec.strip()
    if spec.startswith("mix:"):
        parts = []
        for term in spec[4:].split("+"):
            weight, _, sub = term.partition("*")
            if not sub:
                raise ValueError(f"mixture term {term!r} must look like 'w*beta:a,b'")
            parts.append((float(weight), parse_dist(sub)))
        weights = torch.tensor([w for w, _ in parts], dtype=torch.float64)
        if bool((weights <= 0).any()):
            raise ValueError(f"mixture weights must be positive in {spec!r}")

        def sample_mix(n: int, gen: torch.Generator) -> Tensor:
            which = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=gen)  # (n,)
            draws = torch.stack([sampler(n, gen) for _, sampler in parts])  # (components, n)
            return draws.gather(0, which.unsqueeze(0)).squeeze(0)

        return sample_mix
    kind, _, args = spec.partition(":")
    try:
        values = [float(x) for x in args.split(",")]
    except ValueError as exc:
        raise ValueError(f"cannot parse distribution {spec!r}: {exc}") from exc
    if kind == "beta" and len(values) == 2 and min(values) > 0:
        a, b = values

        def sample_beta(n: int, gen: torch.Generator) -> Tensor:
            # Beta from two Gammas; torch's Gamma has no generator argument, so draw with a seeded fork.
            seed = int(torch.randint(0, 2**62, (1,), generator=gen))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return torch.distributions.Beta(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).sample((n,))

        return sample_beta
    if kind == "uniform" and len(values) == 2 and 0 <= values[0] < values[1] <= 1:
        lo, hi = values
        return lambda n, gen: lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
    raise ValueError(f"unknown distribution {spec!r}: use 'beta:a,b' (a, b > 0), 'uniform:lo,hi' in [0, 1], or 'mix:w*D+w*D'")


def _rewards(theta: Tensor, g: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Binary rewards (M*G,) float64 and group ids for success rates theta (M,)."""
    rewards = (torch.rand(theta.numel(), g, generator=gen, dtype=torch.float64) < theta.unsqueeze(1)).double()
    return rewards.reshape(-1), torch.arange(theta.numel()).repeat_interleave(g)


# ------------------------------------------------------------------ HA-DW bias analysis


def _binomial_pmf(g: int, p: Tensor) -> Tensor:
    """P(k successes of g) for every p (P,) -> (P, g + 1)."""
    k = torch.arange(g + 1, dtype=torch.float64)
    log_comb = torch.lgamma(torch.tensor(g + 1.0, dtype=torch.float64)) - torch.lgamma(k + 1) - torch.lgamma(g - k + 1)
    return torch.exp(log_comb + k * p.unsqueeze(1).log() + (g - k) * torch.log1p(-p.unsqueeze(1)))


def hadw_probability_exact(g: int, upper: float, points: int = 200_000) -> float:
    """Mean over p ~ U(0, upper) of P(mu_hat > p | 1 <= k <= G-1), midpoint rule over p."""
    p = (torch.arange(points, dtype=torch.float64) + 0.5) * (upper / points)  # (P,)
    pmf = _binomial_pmf(g, p)[:, 1:g]  # (P, G-1) mixed outcomes only
    k = torch.arange(1, g, dtype=torch.float64)
    above = (k.unsqueeze(0) / g > p.unsqueeze(1)).double()
    return float(((pmf * above).sum(1) / pmf.sum(1)).mean())


def hadw_probability_mc(g: int, upper: float, samples: int, gen: torch.Generator, groups_per_p: int = 200) -> float:
    """Monte Carlo of the same quantity: p ~ U(0, upper), then P(mu_hat > p | mixed) from ``groups_per_p`` groups.

    Each p gets equal weight, as in the paper's average (plain rejection of
    all-equal groups over all p would over-weight p near 0.5); a p whose groups
    are all all-equal (p very near 0) is skipped.
    """
    p = torch.rand(max(1, samples // groups_per_p), generator=gen, dtype=torch.float64) * upper  # (P,)
    k = (torch.rand(p.numel(), groups_per_p, g, generator=gen, dtype=torch.float64) < p.view(-1, 1, 1)).sum(2)  # (P, n)
    mixed = (k > 0) & (k < g)
    above = mixed & (k.double() / g > p.unsqueeze(1))
    has_mixed = mixed.sum(1) > 0
    return float((above.sum(1)[has_mixed].double() / mixed.sum(1)[has_mixed]).mean())


def bias_closed_form(g: int, p: Tensor) -> Tensor:
    """E[mu_hat | mixed] - p = (p (1-p)^G + p^(G+1) - p^G) / (1 - (1-p)^G - p^G) (METHODS.md §3)."""
    q = 1 - p
    return (p * q**g + p ** (g + 1) - p**g) / (1 - q**g - p**g)


def bias_mc(g: int, p: Tensor, samples: int, gen: torch.Generator) -> Tensor:
    k = (torch.rand(p.numel(), samples, g, generator=gen, dtype=torch.float64) < p.view(-1, 1, 1)).sum(2).double()
    mixed = (k > 0) & (k < g)
    return (k * mixed).sum(1) / g / mixed.sum(1) - p


# ------------------------------------------------------------------ baselines


EBPO_PRIORS = {"ebpo-batch": {"prior": "batch"}, "ebpo-running": {"prior": "running"}, "ebpo-ema": {"prior": "ema", "decay": 0.9}}


def baseline_mse(sampler: Callable, g: int, prompts: int, batches: int, gen: torch.Generator, population_draws: int = 400_000) -> dict[str, float]:
    """MSE of each baseline against theta, averaged over ``batches`` steps (priors accumulate across them)."""
    pop = sampler(population_draws, gen)
    pop_mean, pop_var = float(pop.mean()), float(pop.var(unbiased=False))
    within = float((pop * (1 - pop)).mean())  # E[theta (1 - theta)]: the Bernoulli noise variance
    oracle_s = (within / g) / (within / g + pop_var)
    raw = {name: build_estimator("ebpo", std_normalize=False, center=False, **opts) for name, opts in EBPO_PRIORS.items()}
    errors: dict[str, list[float]] = {"group mean": [], "oracle shrinkage": [], **{k: [] for k in raw}}
    shrink: dict[str, list[float]] = {k: [] for k in raw}
    for _ in range(batches):
        theta = sampler(prompts, gen)  # (M,)
        rewards, group_ids = _rewards(theta, g, gen)
        group_mean = rewards.view(prompts, g).mean(1)
        errors["group mean"].append(float(((group_mean - theta) ** 2).mean()))
        oracle = (1 - oracle_s) * group_mean + oracle_s * pop_mean
        errors["oracle shrinkage"].append(float(((oracle - theta) ** 2).mean()))
        for name, estimator in raw.items():
            a_raw, metrics = estimator(rewards, group_ids)
            baseline = (rewards - a_raw).view(prompts, g)[:, 0]  # V_q, the same for every response of q
            errors[name].append(float(((baseline - theta) ** 2).mean()))
            shrink[name].append(metrics["ebpo/shrinkage"])
    out = {name: sum(v) / len(v) for name, v in errors.items()}
    out.update({f"{name} shrinkage": sum(v) / len(v) for name, v in shrink.items()})
    out["oracle S"] = oracle_s
    return out


SIGNAL_ESTIMATORS: dict[str, dict[str, Any]] = {
    "grpo": {"name": "grpo"},
    "dr_grpo": {"name": "dr_grpo"},
    "rloo": {"name": "rloo"},
    **{k: {"name": "ebpo", **v} for k, v in EBPO_PRIORS.items()},
}


def zero_signal(sampler: Callable, g: int, prompts: int, batches: int, gen: torch.Generator) -> dict[str, dict[str, float]]:
    """Fraction of zero advantages and the advantage of all-failure groups, per estimator."""
    estimators = {label: build_estimator(spec["name"], **{k: v for k, v in spec.items() if k != "name"}) for label, spec in SIGNAL_ESTIMATORS.items()}
    acc: dict[str, dict[str, list[float]]] = {label: {"zero": [], "fail_adv": [], "fail_pos": []} for label in estimators}
    for _ in range(batches):
        theta = sampler(prompts, gen)
        rewards, group_ids = _rewards(theta, g, gen)
        all_fail = (rewards.view(prompts, g).sum(1) == 0).repeat_interleave(g)  # (N,)
        for label, estimator in estimators.items():
            advantages, _ = estimator(rewards, group_ids)
            acc[label]["zero"].append(float((advantages.abs() <= 1e-12).double().mean()))
            if bool(all_fail.any()):
                acc[label]["fail_adv"].append(float(advantages[all_fail].mean()))
                acc[label]["fail_pos"].append(float((advantages[all_fail] >= 0).double().mean()))
    return {
        label: {
            "zero_signal_frac": sum(v["zero"]) / len(v["zero"]),
            "all_failure_adv_mean": sum(v["fail_adv"]) / len(v["fail_adv"]) if v["fail_adv"] else math.nan,
            "all_failure_nonneg_frac": sum(v["fail_pos"]) / len(v["fail_pos"]) if v["fail_pos"] else math.nan,
        }
        for label, v in acc.items()
    }


# ------------------------------------------------------------------ softmax bandit

BANDIT_ESTIMATORS: dict[str, dict[str, Any]] = {
    "grpo": {"name": "grpo"},
    "dr_grpo": {"name": "dr_grpo"},
    "rloo": {"name": "rloo"},
    **{k: {"name": "ebpo", **v} for k, v in EBPO_PRIORS.items()},
    "ha_dw": {"name": "grpo", "weighting": "ha_dw"},
    "ebpo+ha_dw": {"name": "ebpo", "weighting": "ha_dw"},
}


def bandit(
    spec: dict[str, Any], sampler: Callable, *, g: int, prompts: int, batch: int, answers: int, steps: int, lr: float, seed: int
) -> dict[str, list[float]]:
    """Policy gradient on a softmax bandit per prompt; returns mean success and entropy per step.

    Prompt q has logits z_q over ``answers`` candidates, answer 0 correct,
    initialised so that its success rate is theta_q from ``sampler``. Each
    step samples ``batch`` prompts, G answers each, and ascends
    sum_i A_i * grad log pi(a_i) / G per prompt (exact softmax gradient:
    onehot(a) - pi), all prompts at once.
    """
    gen = torch.Generator().manual_seed(seed)
    theta = sampler(prompts, gen).clamp(1e-3, 1 - 1e-3)
    logits = torch.zeros(prompts, answers, dtype=torch.float64)
    logits[:, 0] = torch.log(theta / (1 - theta)) + math.log(answers - 1)  # softmax(logits)[0] = theta
    options = {k: v for k, v in spec.items() if k != "name"}
    estimator = build_estimator(spec["name"], **options)
    success, entropy = [], []
    for _ in range(steps):
        probs = torch.softmax(logits, dim=1)
        success.append(float(probs[:, 0].mean()))
        entropy.append(float(-(probs * probs.clamp_min(1e-300).log()).sum(1).mean()))
        chosen = torch.randperm(prompts, generator=gen)[:batch]  # (B,)
        draws = torch.multinomial(probs[chosen], g, replacement=True, generator=gen)  # (B, G)
        rewards = (draws == 0).double().reshape(-1)
        group_ids = chosen.repeat_interleave(g)
        advantages, _ = estimator(rewards, group_ids)
        onehot = torch.nn.functional.one_hot(draws.reshape(-1), answers).double()  # (B*G, K)
        grad = advantages.unsqueeze(1) * (onehot - probs[group_ids]) / g  # (B*G, K)
        logits.index_add_(0, group_ids, lr * grad)
    probs = torch.softmax(logits, dim=1)
    success.append(float(probs[:, 0].mean()))
    entropy.append(float(-(probs * probs.clamp_min(1e-300).log()).sum(1).mean()))
    return {"success": success, "entropy": entropy}


# ------------------------------------------------------------------ report


def run(args: argparse.Namespace) -> dict[str, Any]:
    sampler = parse_dist(args.dist)
    gen = torch.Generator().manual_seed(args.seed)
    result: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "json")}}

    result["hadw"] = {
        str(upper): {str(g): {"exact": hadw_probability_exact(g, upper), "monte_carlo": hadw_probability_mc(g, upper, args.mc_samples, gen)} for g in (2, 4, 6, 8)}
        for upper in (0.25, 0.5)
    }
    ps = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    result["bias_curve"] = {
        str(g): {"p": ps.tolist(), "closed_form": bias_closed_form(g, ps).tolist(), "monte_carlo": bias_mc(g, ps, args.mc_samples // 20, gen).tolist()}
        for g in (2, 4, 8)
    }
    result["mse"] = {str(g): baseline_mse(sampler, g, args.prompts, args.batches, gen) for g in args.group_sizes}
    result["zero_signal"] = {str(g): zero_signal(sampler, g, args.prompts, args.batches, gen) for g in args.group_sizes}
    result["bandit"] = {}
    for g in args.bandit_group_sizes:
        per_estimator = {}
        for label, spec in BANDIT_ESTIMATORS.items():
            runs = [
                bandit(spec, parse_dist(args.bandit_dist), g=g, prompts=args.bandit_prompts, batch=args.bandit_batch, answers=args.bandit_answers, steps=args.bandit_steps, lr=args.bandit_lr, seed=1000 * s + g)
                for s in range(args.bandit_seeds)
            ]
            per_estimator[label] = {
                "success_mean": [sum(r["success"][t] for r in runs) / len(runs) for t in range(args.bandit_steps + 1)],
                "entropy_mean": [sum(r["entropy"][t] for r in runs) / len(runs) for t in range(args.bandit_steps + 1)],
                "final_success": mean_ci([r["success"][-1] for r in runs]),
                "final_entropy": mean_ci([r["entropy"][-1] for r in runs]),
            }
        result["bandit"][str(g)] = per_estimator
    return result


def report(result: dict[str, Any]) -> str:
    lines = ["# ebpo simulate", "", f"Config: `{json.dumps(result['config'])}`", ""]
    lines += ["## HA-DW: P(mu_hat > p | mixed group), p uniform", "", "| p range | G | exact | Monte Carlo | paper |", "|---|---|---|---|---|"]
    paper = {"0.25": {"2": 1.0, "4": 1.0, "6": 0.8278, "8": 0.7811}, "0.5": {"2": 1.0, "4": 0.7770, "6": 0.6897, "8": 0.6409}}
    for upper, row in result["hadw"].items():
        for g, v in row.items():
            lines.append(f"| (0, {upper}) | {g} | {v['exact']:.4f} | {v['monte_carlo']:.4f} | {paper[upper][g]:.4f} |")
    lines += ["", "## Baseline MSE against the true success rate", ""]
    names = ["group mean", "ebpo-batch", "ebpo-running", "ebpo-ema", "oracle shrinkage"]
    lines += ["| G | " + " | ".join(names) + " | EBPO S (batch) | oracle S |", "|---" * (len(names) + 3) + "|"]
    for g, row in result["mse"].items():
        lines.append(f"| {g} | " + " | ".join(f"{row[n]:.4f}" for n in names) + f" | {row['ebpo-batch shrinkage']:.3f} | {row['oracle S']:.3f} |")
    lines += ["", "## Zero learning signal and all-failure groups", "", "| G | estimator | zero-advantage fraction | mean advantage of all-failure groups | fraction >= 0 |", "|---|---|---|---|---|"]
    for g, row in result["zero_signal"].items():
        for label, v in row.items():
            lines.append(f"| {g} | {label} | {v['zero_signal_frac']:.3f} | {v['all_failure_adv_mean']:+.3f} | {v['all_failure_nonneg_frac']:.2f} |")
    lines += ["", "## Softmax bandit: final mean success rate and entropy (mean ± 95% CI over seeds)", "", "| G | estimator | final success | final entropy |", "|---|---|---|---|"]
    for g, row in result["bandit"].items():
        for label, v in row.items():
            s, e = v["final_success"], v["final_entropy"]
            lines.append(f"| {g} | {label} | {s['mean']:.3f} ± {s['ci_half_width']:.3f} | {e['mean']:.3f} ± {e['ci_half_width']:.3f} |")
    lines += ["", "![MSE](mse.png) ![bias](hadw_bias.png) ![bandit](bandit.png)", ""]
    return "\n".join(lines)


def plots(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    gs = [int(g) for g in result["mse"]]
    for name in ["group mean", "ebpo-batch", "ebpo-running", "ebpo-ema", "oracle shrinkage"]:
        ax.plot(gs, [result["mse"][str(g)][name] for g in gs], "o-", label=name)
    ax.set(xscale="log", yscale="log", xlabel="group size G", ylabel="baseline MSE", title="Baseline MSE vs true success rate")
    ax.set_xticks(gs, [str(g) for g in gs])
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "mse.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for g, curve in result["bias_curve"].items():
        (line,) = ax.plot(curve["p"], curve["closed_form"], label=f"G={g} closed form")
        ax.plot(curve["p"], curve["monte_carlo"], ".", color=line.get_color(), label=f"G={g} Monte Carlo")
    ax.axhline(0, color="k", lw=0.5)
    ax.set(xlabel="true success rate p", ylabel="E[mu_hat | mixed] - p", title="Bias of the group mean given a mixed group")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "hadw_bias.png", dpi=100)
    plt.close(fig)

    sizes = list(result["bandit"])
    fig, axes = plt.subplots(2, len(sizes), figsize=(5 * len(sizes), 7), squeeze=False)
    for col, g in enumerate(sizes):
        for label, v in result["bandit"][g].items():
            axes[0][col].plot(v["success_mean"], label=label)
            axes[1][col].plot(v["entropy_mean"], label=label)
        axes[0][col].set(title=f"softmax bandit, G = {g}", ylabel="mean success rate")
        axes[1][col].set(xlabel="step", ylabel="mean entropy (nats)")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bandit.png", dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ebpo simulate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dist", default="beta:2,2", help="true success rates of the prompts for the MSE and zero-signal tables")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[2, 4, 8, 16, 32], help="G for the MSE and zero-signal tables")
    parser.add_argument("--prompts", type=int, default=512, help="prompts per batch (the paper's setting: 512)")
    parser.add_argument("--batches", type=int, default=50, help="batches (steps) averaged; running/ema priors accumulate over them")
    parser.add_argument("--mc-samples", type=int, default=400_000, help="Monte Carlo samples for the HA-DW checks")
    parser.add_argument("--bandit-dist", default="beta:1,3", help="initial success rates of the bandit's prompts (mostly hard)")
    parser.add_argument("--bandit-group-sizes", type=int, nargs="+", default=[2, 4], help="G of the bandit simulation")
    parser.add_argument("--bandit-prompts", type=int, default=512, help="prompts of the bandit")
    parser.add_argument("--bandit-batch", type=int, default=64, help="prompts per bandit step")
    parser.add_argument("--bandit-answers", type=int, default=8, help="candidate answers per prompt (one correct)")
    parser.add_argument("--bandit-steps", type=int, default=300, help="policy-gradient steps")
    parser.add_argument("--bandit-lr", type=float, default=0.5, help="step size on the logits")
    parser.add_argument("--bandit-seeds", type=int, default=5, help="seeds of the bandit simulation")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything but the bandit")
    parser.add_argument("--quick", action="store_true", help="fewer batches, samples and steps (seconds)")
    parser.add_argument("--out", default="runs/simulate", help="directory for report.md and the PNG plots")
    parser.add_argument("--json", default=None, help="also write every number to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.batches, args.mc_samples = min(args.batches, 8), min(args.mc_samples, 100_000)
        args.bandit_steps, args.bandit_seeds, args.bandit_prompts = min(args.bandit_steps, 60), min(args.bandit_seeds, 3), min(args.bandit_prompts, 256)
    try:
        parse_dist(args.dist), parse_dist(args.bandit_dist)
    except ValueError as exc:
        print(f"ebpo simulate: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    text = report(result)
    (out / "report.md").write_text(text)
    plots(result, out)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(text)
    print(f"\nwrote {out / 'report.md'} and plots" + (f", {args.json}" if args.json else ""))
    return 0
