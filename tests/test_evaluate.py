"""ebpo eval reproduces the accuracy the trainer logged for the same checkpoint and sampling settings."""

from __future__ import annotations

import json

import torch

from ebpo.cli import main
from ebpo.evaluate import summarise

TINY = [
    "--task", "arithmetic",  # the small built-in task (the default is stepwise)
    "--steps", "2", "--prompts-per-step", "4", "--group-size", "2", "--warmstart-steps", "20",
    "--warmstart-batch-size", "16", "--max-eval-problems", "12", "--eval-samples", "3", "--no-progress",
    "--no-tensorboard", "--threads", "1",
]  # fmt: skip


def test_eval_on_a_run_dir_reproduces_the_logged_accuracy(tmp_path, monkeypatch):
    monkeypatch.setenv("EBPO_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    logged = json.loads((run / "summary.json").read_text())["accuracy_after"]
    assert main(["eval", "--model", str(run), "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    (metrics,) = result["results"].values()
    assert metrics["avg@3"] == logged
    assert metrics["problems"] == 12


def test_summary_pass_at_k_and_majority():
    rewards = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    texts = [["4", "5", "4"], ["1", "2", "3"]]
    metrics = summarise(rewards, texts, [1, 2])
    assert metrics["avg@3"] == 2 / 6
    assert metrics["pass@2"] == (1 - 0 + 0) / 2  # problem 0: 1 - C(1,2)/C(3,2) = 1; problem 1: 0
    assert metrics["maj@3"] == 0.5
