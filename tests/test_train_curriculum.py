"""EBPO-diff: the difficulty curriculum estimates the starting model's pass rates once, caches and reuses them."""

from __future__ import annotations

import torch

from ebpo.cli import main

ARGS = [
    "train",
    "--task",
    "arithmetic",
    "--method",
    "ebpo-diff",
    "--task-options",
    "{num_train: 24, num_eval: 8}",
    "--difficulty-samples",
    "3",
    "--steps",
    "1",
    "--prompts-per-step",
    "4",
    "--group-size",
    "2",
    "--warmstart-steps",
    "60",
    "--warmstart-batch-size",
    "32",
    "--eval-samples",
    "1",
    "--no-progress",
    "--no-tensorboard",
    "--threads",
    "1",
]


def test_difficulty_curriculum_estimates_and_caches_pass_rates(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EBPO_CACHE_DIR", str(tmp_path / "cache"))
    assert main([*ARGS, "--out", str(tmp_path / "a")]) == 0
    assert "estimating the starting model's pass rate on 24 prompts x 3 samples" in capsys.readouterr().out
    (cached,) = (tmp_path / "cache" / "difficulty").glob("*.pt")
    pass_rates = torch.load(cached)
    assert pass_rates.shape == (24,) and bool(((pass_rates >= 0) & (pass_rates <= 1)).all())
    assert set((pass_rates * 3).round().tolist()) <= {0.0, 1.0, 2.0, 3.0}  # k/3 for k of 3 samples correct
    assert main([*ARGS, "--out", str(tmp_path / "b")]) == 0
    assert "estimating" not in capsys.readouterr().out  # the second run reuses the cache
