"""Metrics out of the trainer: ``metrics.jsonl``, TensorBoard, the console, a learning-curve PNG.

Only rank 0 writes (:class:`Tracker` on other ranks is a no-op). Every step's
flat dict of namespaced scalars goes to ``metrics.jsonl`` (one JSON object a
line, with ``step``) and to TensorBoard; every ``log_every`` steps one
readable line goes to the console.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

__all__ = ["Tracker", "format_line", "plot_curves", "read_metrics"]

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
    def __init__(self, run_dir: str, *, enabled: bool, tensorboard: bool, resume_step: int, echo: Callable[[str], None]) -> None:
        self.enabled, self.echo = enabled, echo
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.writer = None
        if not enabled:
            return
        _truncate_after(self.path, resume_step)  # a resumed run rewrites the steps after its checkpoint
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        if bad:  # loud, but keep the record: the jsonl shows where it went wrong
            self.echo(f"warning: non-finite metrics at step {step}: {bad}")
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _truncate_after(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    rows = read_metrics(path)
    with open(path, "w") as handle:
        for row in rows:
            if row["step"] <= step:
                handle.write(json.dumps(row) + "\n")


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_curves(metrics_path: str, png_path: str, title: str) -> None:
    """Training reward and held-out accuracy against step (matplotlib Agg, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, style in (("reward/mean", "train reward", "-"), ("eval/accuracy", "held-out accuracy", "o-")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, style, label=label)
    ax.set_xlabel("RL step")
    ax.set_ylabel("accuracy / reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
