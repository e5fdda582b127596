"""Markdown tables and PNG plots of an ``ebpo simulate`` result (the dict that ``--json`` writes)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ebpo.simulate.baselines import MSE_BASELINES

__all__ = ["PAPER_HADW", "markdown", "plots"]

# HA-DW (arXiv 2601.08521): P(mu_hat > p | mixed) averaged over p ~ U(0, upper), as printed in the paper.
PAPER_HADW: dict[str, dict[str, float]] = {
    "0.25": {"2": 1.0, "4": 1.0, "6": 0.8278, "8": 0.7811},
    "0.5": {"2": 1.0, "4": 0.7770, "6": 0.6897, "8": 0.6409},
}


def _f(x: float, digits: int = 4, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """The report: one section per analysis, every table from ``result``."""
    cfg = result["config"]
    lines = ["# ebpo simulate", "", f"Config: `{json.dumps(cfg, sort_keys=True)}`", ""]
    lines += _hadw_markdown(result["hadw_table"], result["bias_curve"])
    lines += _mse_markdown(result["mse"], cfg)
    lines += _zero_signal_markdown(result["zero_signal"])
    lines += _bandit_markdown(result["bandit"], cfg)
    if "topics" in result:
        lines += _topics_markdown(result["topics"], cfg)
    return "\n".join(lines)


def _hadw_markdown(table: dict[str, Any], curves: dict[str, Any]) -> list[str]:
    """Section 1: HA-DW's P(mu_hat > p | mixed) against the paper, and the bias of the group mean."""
    lines = [
        "## 1. HA-DW bias: P(mu_hat > p | group not all-equal), p ~ U(0, upper)",
        "",
        "Exact: the binomial sum for each p, integrated over p by Gauss-Legendre between the jumps p = k/G. "
        "Monte Carlo: p drawn uniformly, groups redrawn until mixed (± is one standard error). "
        "Pooled: the ratio of integrals (rejecting all-equal groups over the whole range) — not the paper's quantity.",
        "",
        "| p range | G | exact | Monte Carlo | paper | exact - paper | pooled |",
        "|---|---|---|---|---|---|---|",
    ]
    for upper, row in table.items():
        for g, v in row.items():
            mc = v["monte_carlo"]
            lines.append(
                f"| (0, {upper}) | {g} | {v['exact']:.4f} | {mc['estimate']:.4f} ± {mc['std_error']:.4f} | "
                f"{v['paper']:.4f} | {v['exact'] - v['paper']:+.5f} | {v['pooled']:.4f} |"
            )
    lines += [
        "",
        "Bias of the group mean given a mixed group, E[mu_hat | mixed] - p (closed form; Monte Carlo ± s.e.):",
        "",
    ]
    probe = [0.1, 0.3, 0.5, 0.7, 0.9]
    lines += ["| G | " + " | ".join(f"p = {p}" for p in probe) + " |", "|---" * (len(probe) + 1) + "|"]
    for g, curve in curves.items():
        cells = []
        for p in probe:
            i = min(range(len(curve["p"])), key=lambda j: abs(curve["p"][j] - p))
            cells.append(
                f"{curve['closed_form'][i]:+.4f} ({curve['monte_carlo'][i]:+.4f} ± {curve['std_error'][i]:.4f})"
            )
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return lines + [
        "",
        "Positive bias for p < 0.5: the group mean over-estimates p, so the advantage r - mu_hat of a hard prompt is under-estimated.",
        "",
    ]


def _mse_markdown(mse: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Section 2: baseline MSE per estimator and group size, simulated and in closed form."""
    lines = [
        f"## 2. Baseline MSE against the true success rate (`{cfg['dist']}`, {cfg['prompts']} prompts x {cfg['batches']} batches)",
        "",
        "Mean of the per-batch MSE (± one standard error over batches). Closed forms: group mean E[θ(1-θ)]/G, "
        "leave-one-out E[θ(1-θ)]/(G-1), oracle (1-S*)²E[θ(1-θ)]/G + S*²Var θ, and EBPO's large-batch limit.",
        "",
        "| G | "
        + " | ".join(MSE_BASELINES)
        + " | EBPO limit (closed form) | S (ebpo-batch) | S (EBPO limit) | S* (oracle) |",
        "|---" * (len(MSE_BASELINES) + 5) + "|",
    ]
    for g, row in mse.items():
        cells = [f"{row['mean'][n]:.4f} ± {row['std_error'][n]:.4f}" for n in MSE_BASELINES]
        s = row["shrinkage"]
        lines.append(
            f"| {g} | " + " | ".join(cells) + f" | {row['closed_form']['ebpo (large-batch limit)']:.4f} | "
            f"{s['ebpo-batch']:.3f} | {s['ebpo (large-batch limit)']:.3f} | {s['oracle shrinkage']:.3f} |"
        )
    lines += [
        "",
        "Closed forms of the same (population) quantities:",
        "",
        "| G | group mean | leave-one-out | EBPO limit | oracle |",
        "|---|---|---|---|---|",
    ]
    for g, row in mse.items():
        c = row["closed_form"]
        lines.append(
            f"| {g} | {c['group mean']:.4f} | {c['leave-one-out']:.4f} | {c['ebpo (large-batch limit)']:.4f} | {c['oracle shrinkage']:.4f} |"
        )
    return lines + ["", "![MSE against the true success rate](mse_vs_p.png)", "", "![MSE against G](mse_vs_g.png)", ""]


def _zero_signal_markdown(zero: dict[str, Any]) -> list[str]:
    """Section 3: the fraction of zero advantages and the advantage in all-failure groups, per estimator."""
    lines = [
        "## 3. Zero learning signal and all-failure groups",
        "",
        "| G | estimator | zero-advantage fraction | mean advantage in all-failure groups | fraction of those >= 0 | raw -S·mu_glob (before centring) |",
        "|---|---|---|---|---|---|",
    ]
    for g, row in zero.items():
        for label, v in row["estimators"].items():
            lines.append(
                f"| {g} | {label} | {v['zero_signal_frac']:.3f} | {_f(v['all_failure_adv_mean'], 3, sign=True)} | "
                f"{_f(v['all_failure_nonneg_frac'], 2)} | {_f(v.get('raw_all_failure_adv', math.nan), 3, sign=True)} |"
            )
        lines.append(
            f"| {g} | *expected all-equal fraction* | {row['all_equal_frac_expected']:.3f} | all-failure groups: {row['all_failure_frac']:.3f} | | |"
        )
    return lines + ["", "![zero signal](zero_signal.png)", ""]


def _bandit_markdown(bandit: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Section 4: the softmax bandit's final success and entropy, and its area under the learning curve."""
    lines = [
        f"## 4. Softmax bandit (`{cfg['bandit_dist']}`, {cfg['bandit_prompts']} prompts, {cfg['bandit_answers']} answers, "
        f"{cfg['bandit_batch']} prompts/step, {cfg['bandit_steps']} steps, lr {cfg['bandit_lr']}, {cfg['bandit_seeds']} seeds)",
        "",
        "Final mean true success rate and entropy (nats), mean ± 95% CI over seeds. `sgd`: advantages as the estimator "
        "gives them; `rms`: each step's advantages divided by their root mean square (equal step sizes across estimators). "
        "Δ vs GRPO: the final success minus GRPO's at the same seed (same initial logits), mean ± 95% CI of the paired differences.",
        "",
    ]
    sizes = sorted({g for per_g in bandit.values() for g in per_g}, key=int)
    lines += _bandit_final_table(bandit, sizes)
    lines += [
        "",
        "Success rate averaged over all steps (area under the learning curve), and its paired difference to GRPO:",
        "",
    ]
    lines += _bandit_auc_table(bandit, sizes)
    return lines + [""] + [f"![bandit, {u} updates](bandit_{u}.png)" for u in bandit] + [""]


def _bandit_final_table(bandit: dict[str, Any], sizes: list[str]) -> list[str]:
    lines = [
        "| update | estimator | "
        + " | ".join(f"success G={g} | Δ vs GRPO G={g} | entropy G={g}" for g in sizes)
        + " |",
        "|---" * (2 + 3 * len(sizes)) + "|",
    ]
    for update, per_g in bandit.items():
        labels = list(next(iter(per_g.values())))
        for label in labels:
            cells = []
            for g in sizes:
                s, e, d = (
                    per_g[g][label]["final_success"],
                    per_g[g][label]["final_entropy"],
                    per_g[g][label]["final_success_minus_grpo"],
                )
                cells.append(
                    f"{s['mean']:.3f} ± {_f(s['ci_half_width'], 3)} | {d['mean']:+.3f} ± {_f(d['ci_half_width'], 3)} | "
                    f"{e['mean']:.3f} ± {_f(e['ci_half_width'], 3)}"
                )
            lines.append(f"| {update} | {label} | " + " | ".join(cells) + " |")
    return lines


def _bandit_auc_table(bandit: dict[str, Any], sizes: list[str]) -> list[str]:
    lines = [
        "| update | estimator | " + " | ".join(f"mean success G={g} | Δ vs GRPO G={g}" for g in sizes) + " |",
        "|---" * (2 + 2 * len(sizes)) + "|",
    ]
    for update, per_g in bandit.items():
        for label in next(iter(per_g.values())):
            cells = [
                f"{per_g[g][label]['auc']['mean']:.3f} ± {_f(per_g[g][label]['auc']['ci_half_width'], 3)} | "
                f"{per_g[g][label]['auc_minus_grpo']['mean']:+.3f} ± {_f(per_g[g][label]['auc_minus_grpo']['ci_half_width'], 3)}"
                for g in sizes
            ]
            lines.append(f"| {update} | {label} | " + " | ".join(cells) + " |")
    return lines


def _topics_markdown(topics: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    from ebpo.simulate.topics import TOPIC_BASELINES

    lines = [
        f"## 5. A mixture of topics (means {cfg['topic_means']}, Beta concentration {cfg['topic_concentration']})",
        "",
        f"Baseline MSE against the true θ, per-batch prior, mean over batches (± s.e.). Balanced: {cfg['topic_groups']} groups "
        "per topic. Oracle: shrinks toward each topic's true mean with its optimal factor (knows the population).",
        "",
        "| G | " + " | ".join(TOPIC_BASELINES) + " |",
        "|---" * (len(TOPIC_BASELINES) + 1) + "|",
    ]
    for g, row in topics["balanced"].items():
        lines.append(
            f"| {g} | "
            + " | ".join(f"{row['mean'][n]:.4f} ± {row['std_error'][n]:.4f}" for n in TOPIC_BASELINES)
            + " |"
        )
    lines += [
        "",
        f"Unbalanced (G = {topics['unbalanced_group_size']}): one topic has only a few groups; MSE over that topic's groups "
        "(and over the whole batch):",
        "",
        "| small topic | groups | "
        + " | ".join(TOPIC_BASELINES)
        + " | whole batch: no pooling | whole batch: partial |",
        "|---" * (len(TOPIC_BASELINES) + 4) + "|",
    ]
    for row in topics["unbalanced"].values():
        small = min(row["groups"])
        cells = " | ".join(f"{row['smallest_topic'][n]:.4f}" for n in TOPIC_BASELINES)
        lines.append(
            f"| {row['smallest_topic_mean']} | {small} | {cells} | {row['mean']['hierarchical (no pooling)']:.4f} | "
            f"{row['mean']['hierarchical (partial)']:.4f} |"
        )
    return lines + [""]


def plots(result: dict[str, Any], out: Path) -> list[Path]:
    """Write the PNGs into ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)

    save(_hadw_figure(plt, result["bias_curve"]), "hadw.png")
    save(_mse_vs_p_figure(plt, result["mse"]), "mse_vs_p.png")
    save(_mse_vs_g_figure(plt, result["mse"]), "mse_vs_g.png")
    save(_zero_signal_figure(plt, result["zero_signal"]), "zero_signal.png")
    for update, per_g in result["bandit"].items():
        save(_bandit_figure(plt, update, per_g), f"bandit_{update}.png")
    return written


def _hadw_figure(plt: Any, curves: dict[str, Any]) -> Any:
    """HA-DW: the integrand P(mu_hat > p | mixed, p) and the bias curve."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for g, curve in curves.items():
        (line,) = left.plot(curve["p"], curve["prob_above_given_p"], label=f"G={g}")
        right.plot(curve["p"], curve["closed_form"], color=line.get_color(), label=f"G={g} closed form")
        right.errorbar(
            curve["p"],
            curve["monte_carlo"],
            yerr=curve["std_error"],
            fmt=".",
            ms=3,
            color=line.get_color(),
            label=f"G={g} Monte Carlo",
        )
    left.set(
        xlabel="true success rate p", ylabel="P(mu_hat > p | mixed, p)", title="Group mean over-estimates p (HA-DW)"
    )
    right.axhline(0, color="k", lw=0.5)
    right.set(
        xlabel="true success rate p", ylabel="E[mu_hat | mixed] - p", title="Bias of the group mean given a mixed group"
    )
    left.legend(fontsize=8)
    right.legend(fontsize=6, ncol=2)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return fig


def _mse_vs_p_figure(plt: Any, mse: dict[str, Any]) -> Any:
    """MSE against the true success rate, one panel per G: points from the simulation, lines closed forms."""
    cols = min(3, len(mse))
    rows = -(-len(mse) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    colours = {name: f"C{i}" for i, name in enumerate(MSE_BASELINES)}
    for ax, (g, row) in zip(axes.flat, mse.items()):
        edges = row["bins"]["edges"]
        centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        for name in MSE_BASELINES:
            ax.plot(centres, row["bins"][name], "o", ms=3, color=colours[name], label=name)
        closed = row["closed_form_given_p"]
        for name, colour in (
            ("group mean", colours["group mean"]),
            ("leave-one-out", colours["leave-one-out"]),
            ("oracle shrinkage", colours["oracle shrinkage"]),
            ("ebpo (large-batch limit)", colours["ebpo-batch"]),
        ):
            ax.plot(closed["p"], closed[name], "-", lw=0.9, color=colour)
        ax.set(title=f"G = {g}", xlabel="true success rate θ", ylabel="baseline MSE")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(mse) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, title="points: simulation per θ bin;\nlines: closed form given θ", title_fontsize=7)
    return fig


def _mse_vs_g_figure(plt: Any, mse: dict[str, Any]) -> Any:
    """Overall baseline MSE against G on log axes: points from the simulation, lines closed forms."""
    from matplotlib.ticker import NullLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    gs = [int(g) for g in mse]
    for name in MSE_BASELINES:
        (line,) = ax.plot(gs, [mse[str(g)]["mean"][name] for g in gs], "o", label=name)
        key = "ebpo (large-batch limit)" if name.startswith("ebpo") else name
        if name == "ebpo-batch" or not name.startswith("ebpo"):
            ax.plot(gs, [mse[str(g)]["closed_form"][key] for g in gs], "-", lw=0.8, color=line.get_color())
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="group size G",
        ylabel="baseline MSE",
        title="Baseline MSE (points: simulation, lines: closed form)",
    )
    ax.set_xticks(gs, [str(g) for g in gs])
    ax.xaxis.set_minor_locator(NullLocator())  # only the G ticks, no log-scale minor labels
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def _zero_signal_figure(plt: Any, zero: dict[str, Any]) -> Any:
    """Bars per estimator and G: the zero-advantage fraction and the mean advantage in all-failure groups."""
    labels = list(next(iter(zero.values()))["estimators"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(zero)
    for j, (g, row) in enumerate(zero.items()):
        xs = [i + j * width for i in range(len(labels))]
        left.bar(xs, [row["estimators"][k]["zero_signal_frac"] for k in labels], width, label=f"G={g}")
        right.bar(xs, [row["estimators"][k]["all_failure_adv_mean"] for k in labels], width, label=f"G={g}")
    for ax, title in (
        (left, "fraction of responses with zero advantage"),
        (right, "mean advantage in all-failure groups"),
    ):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    right.axhline(0, color="k", lw=0.5)
    left.legend(fontsize=7)
    return fig


def _bandit_figure(plt: Any, update: str, per_g: dict[str, Any]) -> Any:
    """Learning (top) and entropy (bottom) curves of one update rule, one column per G, mean and 95% CI band."""
    fig, axes = plt.subplots(2, len(per_g), figsize=(5.5 * len(per_g), 7), squeeze=False)
    for col, (g, per_label) in enumerate(per_g.items()):
        for label, v in per_label.items():
            for row, key in enumerate(("success", "entropy")):
                mean, half = v[key]["mean"], v[key]["ci_half_width"]
                steps = range(len(mean))
                (line,) = axes[row][col].plot(steps, mean, lw=1.2, label=label)
                if not any(math.isnan(h) for h in half):
                    lo = [m - h for m, h in zip(mean, half)]
                    hi = [m + h for m, h in zip(mean, half)]
                    axes[row][col].fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        axes[0][col].set(title=f"softmax bandit, G = {g}, {update} updates", ylabel="mean true success rate")
        axes[1][col].set(xlabel="step", ylabel="mean policy entropy (nats)")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    return fig
