"""A reasoning-gym task trains end to end through `ebpo train --task reasoning_gym:<name>`, offline."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("reasoning_gym")

from ebpo.cli import main  # noqa: E402


def test_reasoning_gym_task_trains_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("EBPO_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--task",
            "reasoning_gym:chain_sum",
            "--model",
            "builtin:medium",  # chain_sum's prompts (about 100 tokens) do not fit builtin:tiny's 64 positions
            "--task-options",
            "{size: 64, eval_size: 8}",
            "--steps",
            "2",
            "--prompts-per-step",
            "4",
            "--group-size",
            "2",
            "--max-new-tokens",
            "6",
            "--warmstart-steps",
            "0",
            "--eval-samples",
            "1",
            "--no-progress",
            "--no-tensorboard",
            "--threads",
            "1",
            "--out",
            str(run),
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "reasoning_gym:chain_sum" and summary["steps"] == 2
