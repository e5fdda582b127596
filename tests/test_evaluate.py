"""ebpo eval reproduces the accuracy the trainer logged for the same checkpoint and sampling settings."""

from __future__ import annotations

import json

import torch

from ebpo.cli import main
from ebpo.evaluate import by_topic, summarise
from ebpo.tasks.base import Problem

TINY = [
    "--task",
    "arithmetic",  # the small built-in task (the default is stepwise)
    "--steps",
    "2",
    "--prompts-per-step",
    "4",
    "--group-size",
    "2",
    "--warmstart-steps",
    "20",
    "--warmstart-batch-size",
    "16",
    "--max-eval-problems",
    "12",
    "--eval-samples",
    "3",
    "--no-progress",
    "--no-tensorboard",
    "--threads",
    "1",
]


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
    # per topic, the same as the trainer's own per-topic accuracy of that evaluation
    topics = result["by_topic"][next(iter(result["results"]))]
    trainer = json.loads((run / "summary.json").read_text())["accuracy_by_topic"]
    assert topics and set(topics) == set(trainer)
    for topic, row in topics.items():
        assert abs(row["avg"] - trainer[topic]["after"]) < 1e-12, topic


def test_summary_pass_at_k_and_majority():
    rewards = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    texts = [["4", "5", "4"], ["1", "2", "3"]]
    metrics = summarise(rewards, texts, [1, 2])
    assert metrics["avg@3"] == 2 / 6
    assert metrics["pass@2"] == (1 - 0 + 0) / 2  # problem 0: 1 - C(1,2)/C(3,2) = 1; problem 1: 0
    assert metrics["maj@3"] == 0.5


def test_by_topic_matches_a_loop_over_problems():
    gen = torch.Generator().manual_seed(0)
    rewards = (torch.rand(9, 4, generator=gen) > 0.5).double()
    rewards[3, 1] = float("nan")  # an unscored sample counts in neither numerator nor denominator
    names = ["a", "b", None, "a", "c", "b", "a", None, "c"]
    problems = [Problem(id=str(i), prompt=f"p{i}", answer="1", topic=t) for i, t in enumerate(names)]
    got = by_topic(rewards, problems)
    assert set(got) == {"a", "b", "c"}  # problems without a topic are left out
    for topic in got:
        values = [v for i, t in enumerate(names) if t == topic for v in rewards[i].tolist() if v == v]
        assert got[topic]["problems"] == names.count(topic)
        assert abs(got[topic]["avg"] - sum(values) / len(values)) < 1e-12


def test_without_a_run_config_eval_uses_the_default_task_of_ebpo_train(tmp_path):
    from ebpo.train.config import TrainConfig

    argv = [
        "eval",
        "--model",
        "builtin:tiny",
        "--limit",
        "3",
        "--samples",
        "1",
        "--max-new-tokens",
        "4",
        "--threads",
        "1",
    ]
    assert main([*argv, "--out", str(tmp_path / "e")]) == 0
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert list(result["results"]) == [TrainConfig.task] == ["stepwise"]
