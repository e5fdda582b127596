"""``ebpo simulate``: the papers' theory, checked with simulated rewards and no model.

    ebpo simulate --quick --out runs/simulate                  # seconds
    ebpo simulate --out runs/simulate --json runs/simulate/all.json

Prompts have true success rates theta drawn from ``--dist`` (``beta:a,b``,
``uniform:lo,hi`` or a mixture ``mix:0.5*beta:1,5+0.5*beta:5,1``); each gets
a group of G binary rewards. Four analyses, written as ``report.md``, PNG
plots and (``--json``) every number:

1. HA-DW's bias analysis (arXiv 2601.08521): P(mu_hat > p | group not
   all-equal) averaged over p ~ U(0, 0.25) and U(0, 0.5) for G = 2, 4, 6, 8,
   exactly and by Monte Carlo, and the bias E[mu_hat | mixed] - p against p
   (closed form and Monte Carlo).
2. Baseline MSE against the true theta per estimator (group mean,
   leave-one-out, EBPO with each prior, the oracle shrinkage that knows the
   population), overall and per theta bin, for each ``--group-sizes``.
3. The fraction of responses with zero learning signal per estimator, and
   the sign and size of the advantage in all-failure groups.
4. A softmax bandit (many prompts of varied difficulty, learnable logits
   over candidate answers): learning and entropy curves for GRPO, Dr. GRPO,
   RLOO, EBPO (each prior), HA-DW and EBPO + HA-DW at small G.
5. A mixture of topics (Beta topics with means ``--topic-means``): baseline
   MSE of the hierarchical prior (no pooling and partial pooling) vs flat
   EBPO vs the group mean vs an oracle, balanced and with one topic reduced
   to ``--topic-small-groups`` groups.

The estimators are the library's own (``ebpo.estimators.build_estimator``);
the oracle and closed-form quantities live in :mod:`ebpo.simulate.theory`.
See docs/simulate.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ebpo.fileio import check_output_dir, check_output_file, make_output_dir
from ebpo.simulate.bandit import BANDIT_ESTIMATORS, UPDATES, BanditConfig, bandit_curves
from ebpo.simulate.baselines import SIGNAL_ESTIMATORS, baseline_mse, zero_signal
from ebpo.simulate.populations import Population, parse_dist, sample_rewards
from ebpo.simulate.report import PAPER_HADW, markdown, plots
from ebpo.simulate.theory import (
    bias_closed_form,
    bias_mc,
    hadw_probability_exact,
    hadw_probability_given_p,
    hadw_probability_mc,
    hadw_probability_pooled,
)
from ebpo.simulate.topics import topic_mixture_mse, topic_population

__all__ = [
    "Population",
    "parse_dist",
    "sample_rewards",
    "hadw_table",
    "bias_curves",
    "build_parser",
    "run",
    "main",
]

HADW_GROUP_SIZES = (2, 4, 6, 8)
HADW_UPPERS = (0.25, 0.5)


def hadw_table(mc_samples: int, generator: torch.Generator) -> dict[str, dict[str, dict[str, Any]]]:
    """``{upper: {G: {"exact", "pooled", "monte_carlo", "paper"}}}`` for the paper's ranges and group sizes."""
    return {
        str(upper): {
            str(g): {
                "exact": hadw_probability_exact(g, upper),
                "pooled": hadw_probability_pooled(g, upper),
                "monte_carlo": hadw_probability_mc(g, upper, mc_samples, generator),
                "paper": PAPER_HADW[str(upper)][str(g)],
            }
            for g in HADW_GROUP_SIZES
        }
        for upper in HADW_UPPERS
    }


def bias_curves(groups_per_p: int, generator: torch.Generator) -> dict[str, dict[str, list[float]]]:
    """Bias E[mu_hat | mixed] - p on p = 0.01..0.99: closed form, Monte Carlo (± s.e.), and P(mu_hat > p | mixed, p)."""
    p = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    out = {}
    for g in HADW_GROUP_SIZES:
        mc = bias_mc(g, p, groups_per_p, generator)
        out[str(g)] = {
            "p": p.tolist(),
            "closed_form": bias_closed_form(g, p).tolist(),
            "monte_carlo": mc["bias"].tolist(),
            "std_error": mc["std_error"].tolist(),
            "prob_above_given_p": hadw_probability_given_p(g, p).tolist(),
        }
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ebpo simulate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--dist",
        default="beta:2,2",
        help="population of true success rates for the MSE and zero-signal analyses: beta:a,b | uniform:lo,hi | mix:w*D+w*D (default: %(default)s, the EBPO paper's check)",
    )
    add(
        "--group-sizes",
        type=int,
        nargs="+",
        default=[2, 4, 8, 16, 32],
        help="group sizes G of the MSE and zero-signal analyses (default: %(default)s)",
    )
    add("--prompts", type=int, default=512, help="prompts per batch (default: %(default)s, the EBPO paper's setting)")
    add(
        "--batches",
        type=int,
        default=50,
        help="batches averaged; the running and EMA priors accumulate over them (default: %(default)s)",
    )
    add("--bins", type=int, default=20, help="theta bins of the MSE-against-theta curves (default: %(default)s)")
    add(
        "--mc-samples",
        type=int,
        default=400_000,
        help="Monte Carlo draws of p for each HA-DW table entry; the bias curve uses 1/40 of it per p (default: %(default)s)",
    )
    add(
        "--bandit-dist",
        default="beta:1,3",
        help="initial success rates of the bandit's prompts (default: %(default)s, mostly hard)",
    )
    add(
        "--bandit-group-sizes",
        type=int,
        nargs="+",
        default=[2, 4],
        help="group sizes of the bandit (default: %(default)s)",
    )
    add("--bandit-prompts", type=int, default=512, help="prompts in the bandit (default: %(default)s)")
    add("--bandit-batch", type=int, default=64, help="prompts drawn per bandit step (default: %(default)s)")
    add(
        "--bandit-answers", type=int, default=8, help="candidate answers per prompt, one correct (default: %(default)s)"
    )
    add(
        "--bandit-spread",
        type=float,
        default=1.0,
        help="std of the wrong answers' initial logits: larger makes dominant distractors (default: %(default)s)",
    )
    add("--bandit-steps", type=int, default=300, help="policy-gradient steps (default: %(default)s)")
    add("--bandit-lr", type=float, default=0.5, help="step size on the logits (default: %(default)s)")
    add(
        "--bandit-seeds",
        type=int,
        default=5,
        help="seeds per estimator; curves show mean and 95%% CI (default: %(default)s)",
    )
    add(
        "--bandit-updates",
        nargs="+",
        choices=UPDATES,
        default=list(UPDATES),
        help="sgd: advantages as given; rms: each step's advantages divided by their RMS, equal step sizes across estimators (default: both)",
    )
    add(
        "--hadw-anchor",
        choices=["soft", "hard"],
        default="soft",
        help="HA-DW difficulty anchor: soft (paper) or hard (released code) (default: %(default)s)",
    )
    add(
        "--hadw-lam",
        type=float,
        default=1.3,
        help="HA-DW scale lambda (paper's best 1.3; released code 1.5) (default: %(default)s)",
    )
    add(
        "--topic-means",
        type=float,
        nargs="+",
        default=[0.05, 0.3, 0.7, 0.95],
        help="mean success rate of each topic of the mixture analysis (default: %(default)s, docs/hierarchical-prior.md)",
    )
    add(
        "--topic-concentration",
        type=float,
        default=4.0,
        help="Beta concentration a + b of every topic (default: %(default)s)",
    )
    add("--topic-groups", type=int, default=16, help="groups (prompts) per topic per batch (default: %(default)s)")
    add(
        "--topic-group-sizes",
        type=int,
        nargs="+",
        default=[2, 4, 8],
        help="group sizes G of the balanced mixture (default: %(default)s)",
    )
    add(
        "--topic-small-groups",
        type=int,
        nargs="+",
        default=[1, 2],
        help="unbalanced case: one topic (each in turn) has this many groups, at G = 4 (default: %(default)s)",
    )
    add(
        "--topic-batches",
        type=int,
        default=400,
        help="batches of the balanced mixture; the unbalanced runs use half (default: %(default)s)",
    )
    add("--seed", type=int, default=0, help="seed of every random draw (default: %(default)s)")
    add("--quick", action="store_true", help="small settings that finish in seconds (used by the tests)")
    add("--out", default="runs/simulate", help="directory for report.md and the PNG plots (default: %(default)s)")
    add("--json", default=None, help="also write every number (config included) to this JSON file")
    return parser


def _validate(args: argparse.Namespace) -> None:
    if min(args.group_sizes) < 2 or min(args.bandit_group_sizes) < 2:
        raise ValueError(
            "group sizes must be >= 2 (the group mean, GRPO and leave-one-out baselines need two responses)"
        )
    if args.prompts < 2 or args.batches < 1 or args.bins < 1:
        raise ValueError(
            f"need --prompts >= 2, --batches >= 1 and --bins >= 1, got {args.prompts}, {args.batches}, {args.bins}"
        )
    if not args.hadw_lam > 0:
        raise ValueError(f"--hadw-lam must be > 0, got {args.hadw_lam}")
    if args.mc_samples < 40 or args.bandit_seeds < 1:
        raise ValueError(f"need --mc-samples >= 40 and --bandit-seeds >= 1, got {args.mc_samples}, {args.bandit_seeds}")
    parse_dist(args.dist)
    parse_dist(args.bandit_dist)
    for mean in args.topic_means:
        topic_population(mean, args.topic_concentration)
    if (
        min(args.topic_group_sizes) < 2
        or args.topic_groups < 1
        or min(args.topic_small_groups) < 1
        or args.topic_batches < 2
    ):
        raise ValueError(
            "need --topic-group-sizes >= 2, --topic-groups >= 1, --topic-small-groups >= 1 and --topic-batches >= 2"
        )
    for g in args.bandit_group_sizes:  # BanditConfig validates the rest
        _bandit_config(args, g, args.bandit_updates[0])


def _bandit_config(args: argparse.Namespace, group_size: int, update: str) -> BanditConfig:
    return BanditConfig(
        group_size=group_size,
        prompts=args.bandit_prompts,
        batch=args.bandit_batch,
        answers=args.bandit_answers,
        spread=args.bandit_spread,
        steps=args.bandit_steps,
        lr=args.bandit_lr,
        update=update,
    )


def _with_hadw_options(specs: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The estimator specs with ``--hadw-*`` passed to every HA-DW weighting."""
    options = {"anchor": args.hadw_anchor, "lam": args.hadw_lam}
    return {
        label: {**spec, "weighting_options": options} if spec.get("weighting") == "ha_dw" else spec
        for label, spec in specs.items()
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every analysis; the returned dict is what ``--json`` writes."""
    gen = torch.Generator().manual_seed(args.seed)
    population = parse_dist(args.dist)
    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "json")},
        "seconds": {},
    }

    def timed(key: str, fn: Any) -> Any:
        start = time.perf_counter()
        value = fn()
        result["seconds"][key] = time.perf_counter() - start
        return value

    result["hadw_table"] = timed("hadw_table", lambda: hadw_table(args.mc_samples, gen))
    result["bias_curve"] = timed("bias_curve", lambda: bias_curves(max(10, args.mc_samples // 40), gen))
    result["population"] = {"mean": population.mean, "var": population.var, "noise": population.noise}
    result["mse"] = timed(
        "mse",
        lambda: {
            str(g): baseline_mse(population, g, args.prompts, args.batches, gen, bins=args.bins)
            for g in args.group_sizes
        },
    )
    signal_specs = _with_hadw_options(SIGNAL_ESTIMATORS, args)
    result["zero_signal"] = timed(
        "zero_signal",
        lambda: {
            str(g): zero_signal(population, g, args.prompts, args.batches, gen, signal_specs) for g in args.group_sizes
        },
    )
    bandit_specs = _with_hadw_options(BANDIT_ESTIMATORS, args)
    bandit_population = parse_dist(args.bandit_dist)
    result["bandit"] = timed(
        "bandit",
        lambda: {
            update: {
                str(g): bandit_curves(
                    bandit_population, _bandit_config(args, g, update), args.bandit_seeds, args.seed, bandit_specs
                )
                for g in args.bandit_group_sizes
            }
            for update in args.bandit_updates
        },
    )
    result["topics"] = timed("topics", lambda: topic_analysis(args, gen))
    return result


UNBALANCED_G = 4


def topic_analysis(args: argparse.Namespace, gen: torch.Generator) -> dict[str, Any]:
    """The mixture of topics: balanced at each ``--topic-group-sizes``; unbalanced (each topic in turn small) at G = 4."""
    means, k = args.topic_means, len(args.topic_means)
    balanced = {
        str(g): topic_mixture_mse(means, args.topic_concentration, [args.topic_groups] * k, g, args.topic_batches, gen)
        for g in args.topic_group_sizes
    }
    unbalanced = {}
    for small in args.topic_small_groups:
        for which in range(k):
            groups = [args.topic_groups] * k
            groups[which] = small
            unbalanced[f"{small}@{means[which]}"] = topic_mixture_mse(
                means, args.topic_concentration, groups, UNBALANCED_G, max(2, args.topic_batches // 2), gen
            )
    return {"balanced": balanced, "unbalanced": unbalanced, "unbalanced_group_size": UNBALANCED_G}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.batches = min(args.batches, 8)
        args.mc_samples = min(args.mc_samples, 40_000)
        args.bandit_steps = min(args.bandit_steps, 60)
        args.bandit_seeds = min(args.bandit_seeds, 3)
        args.bandit_prompts = min(args.bandit_prompts, 256)
        args.bandit_batch = min(args.bandit_batch, 32)
        args.topic_batches = min(args.topic_batches, 20)
    try:
        _validate(args)
        out = Path(args.out)
        check_output_dir(out, "ebpo simulate", reuse=True)
        if args.json:
            check_output_file(args.json, "ebpo simulate", flag="--json")
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2 and the usage line
    make_output_dir(out, "ebpo simulate")
    # Every tensor here is small (<= a few thousand rows): intra-op threads cost more in start-up and
    # contention than they save (measured 4x slower with 2 threads on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run(args)
    finally:
        torch.set_num_threads(threads)
    text = markdown(result)
    (out / "report.md").write_text(text + "\n")
    images = plots(result, out)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        # NaN (e.g. a CI from one seed) is written as JSON null, so the file is strict JSON.
        path.write_text(json.dumps(_nan_to_none(result), indent=1, allow_nan=False))
    print(text)
    print(f"\nwrote {out / 'report.md'}, {len(images)} plots" + (f" and {args.json}" if args.json else ""))
    return 0


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float):
        return None if value != value else value
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value
