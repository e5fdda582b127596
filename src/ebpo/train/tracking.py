"""Metrics out of the trainer: ``metrics.jsonl``, the ``--report-to`` backends, the console, a learning-curve PNG.

Only rank 0 writes (:class:`Tracker` on other ranks is a no-op). Every step's
flat dict of namespaced scalars goes to ``metrics.jsonl`` (one JSON object a
line, with ``step``) and to each ``--report-to`` backend (TensorBoard by
default, wandb, mlflow: :mod:`ebpo.train.trackers`); every ``log_every``
steps one readable line goes to the console.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ebpo.fileio import append_line
from ebpo.train.trackers import Backend, open_backends

__all__ = ["Tracker", "accuracy_change_se", "format_line", "plot_curves", "read_metrics", "CURVE_PANELS"]

# (metric, label, format) shown on the console line, in order.
_CONSOLE = (
    ("reward/mean", "reward", "{:.3f}"),
    ("train/accuracy", "acc", "{:.3f}"),
    ("eval/accuracy", "eval_acc", "{:.3f}"),
    ("ebpo/shrinkage", "shrink", "{:.3f}"),
    ("loss/divergence", "kl", "{:.2e}"),
    ("loss/approx_kl", "approx_kl", "{:.2e}"),
    ("adv/zero_signal_frac", "zero_adv", "{:.2f}"),
    ("time/step_seconds", "step_s", "{:.2f}"),
)


def format_line(step: int, total: int, metrics: dict[str, float]) -> str:
    parts = [f"step {step:>{len(str(total))}}/{total}"]
    parts += [f"{label} {fmt.format(metrics[key])}" for key, label, fmt in _CONSOLE if key in metrics]
    return " | ".join(parts)


class Tracker:
    def __init__(
        self,
        run_dir: str,
        *,
        enabled: bool,
        report_to: Sequence[str] = ("tensorboard",),
        config: Mapping[str, Any] | None = None,
        resume_step: int,
        echo: Callable[[str], None],
    ) -> None:
        """``report_to``: backends of :mod:`ebpo.train.trackers` (``--report-to``); ``config``: the run's config,
        logged once as the wandb config / mlflow params."""
        self.enabled, self.echo = enabled, echo
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.backends: list[Backend] = []
        if not enabled:
            return
        _truncate_after(self.path, resume_step, echo)  # a resumed run rewrites the steps after its checkpoint
        self.backends = open_backends(report_to, run_dir, config=config or {}, resume_step=resume_step, echo=echo)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        if bad:  # loud, but keep the record: the jsonl shows where it went wrong
            self.echo(f"warning: non-finite metrics at step {step}: {bad}")
        # One write of a whole line, cut back if the disk fills part-way: a reader never meets a torn row.
        append_line(self.path, json.dumps({"step": step, **metrics}) + "\n")
        for backend in self.backends:
            backend.log(step, metrics)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []


def _truncate_after(path: str, step: int, echo: Callable[[str], None] = print) -> None:
    """Keep the rows up to ``step`` (a resumed run rewrites the later ones), replacing the file atomically.

    A line that is not a whole JSON row (a write torn by a kill or a full disk, before rows were written
    whole, or a power cut) is dropped with a warning naming it, instead of making every resume fail.
    """
    if not os.path.exists(path):
        return
    torn: list[int] = []
    rows = read_metrics(path, torn=torn)
    for number in torn:
        echo(f"warning: {path} line {number} is not a whole JSON row (a torn write); dropped it")
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    try:
        with open(tmp, "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows if row["step"] <= step)
        os.replace(tmp, path)  # the old file stays whole until the new one is
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_metrics(path: str, *, torn: list[int] | None = None) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``.

    ``torn``: a list that receives the line numbers of lines that are not a JSON object with a ``step``
    (dropped); without it such a line raises ValueError naming the file and line. A last line without its
    newline that does not parse is always dropped: it is the row a kill or a full disk was writing.
    """
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = handle.read().split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a JSON object with a step")
        except ValueError as exc:
            if number == len(lines) and torn is None:  # no newline after it: the torn last write
                continue
            if torn is None:
                raise ValueError(f"{path}:{number}: not a whole metrics row ({exc})") from None
            torn.append(number)
            continue
        rows.append(row)
    return rows


def accuracy_change_se(
    scores_before: Any, scores_after: Any, *, accuracy_before: float, accuracy_after: float, samples: int
) -> tuple[float, str]:
    """Standard error of the held-out accuracy change, and which one it is (``"paired"`` or ``"binomial"``).

    Paired when both evaluations' per-problem scores (mean reward over a
    problem's samples, NaN where none was scored) are at hand: the SE of the
    mean per-problem difference, ``std(after_i - before_i, ddof=1) / sqrt(n)``
    over the problems scored both times. The same problems are evaluated
    twice, so this removes the between-problem variance that the unpaired
    formula counts. Otherwise (a resumed run does not keep the starting
    scores) the binomial SE of two independent proportions over ``samples``
    scored completions each: ``sqrt(p0 (1 - p0) / n + p1 (1 - p1) / n)``.
    """
    import torch

    if scores_before is not None and scores_after is not None and len(scores_before) == len(scores_after):
        diff = torch.as_tensor(scores_after, dtype=torch.float64) - torch.as_tensor(scores_before, dtype=torch.float64)
        diff = diff[~torch.isnan(diff)]  # (n,) problems scored both times
        if diff.numel() >= 2:
            return float(diff.std(unbiased=True) / math.sqrt(diff.numel())), "paired"
    if samples < 1:
        raise ValueError(f"accuracy_change_se needs samples >= 1 for the binomial SE, got {samples}")
    variance = (accuracy_before * (1 - accuracy_before) + accuracy_after * (1 - accuracy_after)) / samples
    return math.sqrt(max(variance, 0.0)), "binomial"


#: The learning-curve panels: (title, [(metric, label, style)], y label).
CURVE_PANELS = (
    ("held-out accuracy", (("eval/accuracy", "held-out accuracy", "o-"),), "accuracy"),
    (
        "training reward",
        (("train/accuracy", "train accuracy", "-"), ("reward/mean", "reward (shaped)", ":")),
        "mean over rollouts",
    ),
    ("divergence to the reference", (("loss/divergence", "divergence", "-"),), "per token"),
    ("policy entropy", (("policy/entropy", "entropy", "-"),), "nats per token"),
)


def plot_curves(
    metrics_path: str, png_path: str, title: str, *, accuracy_before: float | None = None
) -> dict[str, list[str]]:
    """The learning curve PNG: one panel per quantity that the run logged (matplotlib Agg, no display needed).

    Panels (:data:`CURVE_PANELS`, each drawn when one of its metrics is in
    ``metrics.jsonl``): held-out accuracy, starting at step 0 with
    ``accuracy_before`` (the evaluation before RL); training reward
    (``train/accuracy``, and ``reward/mean`` where shaping makes it differ);
    divergence to the reference (``loss/divergence``);
    policy entropy (``policy/entropy``). Steps are integers on the x axis.
    Returns the layout drawn, ``{panel title: [series labels]}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    panels = []
    for panel_title, series, ylabel in CURVE_PANELS:
        drawn = []
        for key, label, style in series:
            points = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
            if key == "eval/accuracy" and accuracy_before is not None:
                points = [(0, accuracy_before)] + points
            if key == "reward/mean" and points == [
                (r["step"], r["train/accuracy"]) for r in rows if "train/accuracy" in r
            ]:
                continue  # identical to train/accuracy without reward shaping: one line is enough
            if points:
                drawn.append((label, style, points))
        if drawn:
            panels.append((panel_title, ylabel, drawn))
    columns = 2 if len(panels) > 1 else 1
    rows_count = max(1, math.ceil(len(panels) / columns))
    fig, axes = plt.subplots(rows_count, columns, figsize=(5.5 * columns, 3.2 * rows_count), squeeze=False)
    layout: dict[str, list[str]] = {}
    for ax, (panel_title, ylabel, drawn) in zip(axes.flat, panels):
        for label, style, points in drawn:
            xs, ys = zip(*points)
            ax.plot(xs, ys, style, label=label, markersize=4)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(drawn) > 1 or panel_title == "held-out accuracy":
            ax.legend(loc="best", fontsize=8)
        layout[panel_title] = [label for label, _, _ in drawn]
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no metrics logged", ha="center", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return layout
