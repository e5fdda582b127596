"""What a first ``ebpo train`` shows: console lines, the final line's standard error, the learning-curve panels."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from ebpo.cli import main
from ebpo.train.tracking import accuracy_change_se, plot_curves

TINY = [
    "--task",
    "arithmetic",  # the small built-in task (the default is stepwise)
    "--prompts-per-step",
    "2",
    "--group-size",
    "2",
    "--max-new-tokens",
    "4",
    "--warmstart-steps",
    "20",
    "--warmstart-batch-size",
    "16",
    "--max-eval-problems",
    "12",
    "--eval-samples",
    "2",
    "--no-progress",
    "--no-tensorboard",
    "--threads",
    "1",
    "--save-every",
    "0",
]


def test_paired_standard_error_matches_a_hand_computation():
    before = torch.tensor([1.0, 0.0, 0.5, 0.0, float("nan")])
    after = torch.tensor([1.0, 1.0, 0.5, 0.25, 1.0])  # the last problem was not scored before: left out
    # differences 0, 1, 0, 0.25: mean 0.3125, sample variance 0.671875 / 3, SE = sqrt(0.223958) / 2
    se, kind = accuracy_change_se(before, after, accuracy_before=0.0, accuracy_after=0.0, samples=1)
    assert kind == "paired" and se == pytest.approx(math.sqrt(0.671875 / 3) / 2, rel=1e-12)


def test_binomial_standard_error_when_the_starting_scores_are_gone():
    se, kind = accuracy_change_se(None, torch.ones(3), accuracy_before=0.3, accuracy_after=0.4, samples=100)
    assert kind == "binomial" and se == pytest.approx(math.sqrt((0.3 * 0.7 + 0.4 * 0.6) / 100), rel=1e-12)
    with pytest.raises(ValueError, match="samples >= 1"):
        accuracy_change_se(None, None, accuracy_before=0.3, accuracy_after=0.4, samples=0)


def test_console_prints_first_every_and_last_step_and_a_final_line_with_its_se(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EBPO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--steps", "5", "--log-every", "2", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out.splitlines()
    steps = [int(m.group(1)) for line in printed if (m := re.match(r"step\s+(\d+)/5 \|", line))]
    assert steps == [1, 2, 4, 5]
    assert any(line.startswith("warm start: step 20/20 | loss ") for line in printed)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy_gain_se_kind"] == "paired" and summary["accuracy_gain_se"] >= 0
    assert summary["threads"] == 1 and set(summary["versions"]) >= {"torch", "transformers"}
    final = printed[-1]
    assert final.startswith("done: held-out accuracy")
    assert f"{summary['accuracy_gain']:+.3f} ± {summary['accuracy_gain_se']:.3f} paired SE" in final
    assert (out / "config.yaml").read_text().startswith(f"# ebpo train with torch {torch.__version__}")


def _write_metrics(path, *, entropy: bool) -> None:
    rows = []
    for step in range(1, 7):
        row = {
            "step": step,
            "reward/mean": 0.2 + 0.02 * step,
            "train/accuracy": 0.2 + 0.02 * step,
            "loss/divergence": 1e-3 * step,
            "loss/approx_kl": 0.0,
        }
        if entropy:
            row["policy/entropy"] = 1.5 - 0.1 * step
        rows.append(row)
        if step % 3 == 0:
            rows.append({"step": step, "eval/accuracy": 0.25 + 0.01 * step})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_learning_curve_has_a_panel_per_quantity_and_starts_at_step_zero(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics, entropy=True)
    layout = plot_curves(str(metrics), str(tmp_path / "curve.png"), "ebpo on arithmetic", accuracy_before=0.21)
    assert layout == {
        "held-out accuracy": ["held-out accuracy"],
        "training reward": ["train accuracy"],  # reward/mean equals it (no shaping): not drawn twice
        "divergence to the reference": ["divergence"],
        "policy entropy": ["entropy"],
    }
    assert (tmp_path / "curve.png").stat().st_size > 10_000
    _write_metrics(metrics, entropy=False)
    assert "policy entropy" not in plot_curves(str(metrics), str(tmp_path / "curve2.png"), "t", accuracy_before=0.21)


def test_learning_curve_plots_the_pre_rl_point(tmp_path, monkeypatch):
    import matplotlib.axes

    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics, entropy=False)
    plotted: list[tuple] = []
    original = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        plotted.append((kwargs.get("label"), list(args[0])))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    plot_curves(str(metrics), str(tmp_path / "curve.png"), "t", accuracy_before=0.21)
    assert dict(plotted)["held-out accuracy"] == [0, 3, 6]
