"""The trainer's wiring of the estimator: correctness vs shaped reward, DAPO's filter, topic ids.

The trainer is assembled without a model: ``generate`` and ``score`` are
replaced by stubs that return fixed correctness, so these tests read exactly
what ``rollout_and_score`` and ``compute_advantages`` hand on.
"""

from __future__ import annotations

import types

import torch
from runs import fake_generate

import ebpo.train.trainer as trainer_mod
from ebpo.allocation import build_allocator
from ebpo.grouping import stable_topic_ids
from ebpo.tasks.base import Problem
from ebpo.train.config import TrainConfig
from ebpo.train.distributed import Dist
from ebpo.train.trainer import Trainer, group_outcomes

G = 2
# correctness of each problem's G responses and the overlong penalty of each
CORRECT = {"p0": [1.0, 1.0], "p1": [1.0, 0.0], "p2": [0.0, 0.0], "p3": [0.0, 1.0], "p4": [1.0, 0.0], "p5": [0.0, 1.0]}
OVERLONG = {
    "p0": [0.0, -0.5],
    "p1": [0.0, -1.0],
    "p2": [-1.0, 0.0],
    "p3": [0.0, 0.0],
    "p4": [0.0, 0.0],
    "p5": [0.0, 0.0],
}
TOPIC = {"p0": "algebra", "p1": "algebra", "p2": "geometry", "p3": None, "p4": "geometry", "p5": "algebra"}


class _Stream:
    def __init__(self) -> None:
        self.problems = [Problem(id=f"p{i}", prompt="q", answer="a", topic=TOPIC[f"p{i}"]) for i in range(6)]
        self.position = 0

    def take(self, count: int) -> list[Problem]:
        out = self.problems[self.position : self.position + count]
        self.position += count
        return out


def _fake_score(rollout, verifier):
    rewards = torch.tensor([CORRECT[p.id][i % G] for i, p in enumerate(rollout.problems)], dtype=torch.float64)
    return rewards, torch.ones(len(rewards), dtype=torch.bool), {}


def _trainer(monkeypatch, **config) -> Trainer:
    monkeypatch.setattr(trainer_mod, "generate", fake_generate)
    monkeypatch.setattr(trainer_mod, "score", _fake_score)
    trainer = object.__new__(Trainer)
    trainer.config = TrainConfig(group_size=G, **config)
    trainer.dist, trainer.stream, trainer.model, trainer.tokenizer = Dist(), _Stream(), None, None
    trainer.device = torch.device("cpu")
    trainer.c = types.SimpleNamespace(verifier=None, estimator=None, allocator=build_allocator("uniform"))
    trainer.samples_total, trainer.mean_group_size = 0, float(G)
    trainer._overlong = lambda rollout: torch.tensor(
        [OVERLONG[p.id][i % G] for i, p in enumerate(rollout.problems)], dtype=torch.float64
    )
    return trainer


def test_dynamic_sampling_filters_on_correctness_not_on_the_overlong_penalty(monkeypatch):
    """DAPO keeps a group when 0 < #correct < G; p0 (both correct, one overlong) differs only by the penalty."""
    trainer = _trainer(monkeypatch, prompts_per_step=2, dynamic_sampling=True, max_resample_rounds=3, overlong_buffer=1)
    rollout, rewards, correctness, _ = trainer.rollout_and_score()
    kept = sorted({p.id for p in rollout.problems})
    assert kept == ["p1", "p3"]  # p0 and p2 are all-correct / all-wrong although their shaped rewards differ
    assert torch.equal(
        correctness, torch.tensor([CORRECT[p.id][i % G] for i, p in enumerate(rollout.problems)], dtype=torch.float64)
    )
    shaped = torch.tensor(
        [CORRECT[p.id][i % G] + OVERLONG[p.id][i % G] for i, p in enumerate(rollout.problems)], dtype=torch.float64
    )
    assert torch.equal(rewards, shaped)  # the policy is still trained on the shaped reward


def test_mixed_groups_reads_correctness():
    correctness = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    ids, _, _, mixed = group_outcomes(correctness, torch.tensor([5, 5, 9, 9, 2, 2]))
    assert ids[mixed].tolist() == [9]


def test_compute_advantages_passes_correctness_and_stable_topic_ids(monkeypatch):
    trainer = _trainer(monkeypatch, prompts_per_step=3, overlong_buffer=1)
    seen = {}

    def estimator(rewards, group_ids, *, topic_ids=None, correctness=None, prompt_ids=None, training=True):
        seen.update(
            rewards=rewards, group_ids=group_ids, topic_ids=topic_ids, correctness=correctness, prompt_ids=prompt_ids
        )
        return rewards.clone(), {}

    trainer.c.estimator = estimator
    rollout, rewards, correctness, _ = trainer.rollout_and_score()
    trainer.compute_advantages(rollout, rewards, correctness)
    assert torch.equal(seen["correctness"], correctness) and torch.equal(seen["rewards"], rewards)
    topics = [p.topic for p in rollout.problems]
    assert torch.equal(seen["topic_ids"], stable_topic_ids(topics))
    # same label -> same id, different labels -> different ids, None is a topic of its own
    ids = seen["topic_ids"].tolist()
    assert ids[0] == ids[2] and ids[0] != ids[4] and len(set(ids)) == 2
    # the prompt's key across steps (per-prompt trackers: spo, krpo carry=True): its problem id, hashed
    from ebpo.estimators import stable_prompt_ids

    assert torch.equal(seen["prompt_ids"], stable_prompt_ids([p.id for p in rollout.problems]))


def test_stable_topic_ids_do_not_depend_on_the_process_or_order():
    a = stable_topic_ids(["algebra", "geometry", None, "algebra"])
    b = stable_topic_ids(["geometry", "algebra"])
    assert a[0] == a[3] == b[1] and a[1] == b[0] and a[2] != a[0]
    # pinned values: a hash of the label's UTF-8 text, the same on every rank and after a resume
    assert a.dtype == torch.int64 and int(a[0]) == int(stable_topic_ids(["algebra"])[0])


def test_config_refuses_a_combination_that_cannot_work_before_training():
    from ebpo.train.cli import build_parser, resolve_config
    from ebpo.train.trainer import build_components

    def components(*flags: str):
        return build_components(resolve_config(build_parser().parse_args(list(flags))))

    # DAPO's overlong shaping gives negative rewards; a weighting that cannot take them is refused now, not at step k
    bad = ["--method", "dapo", "--weighting", "tests_support_estimator:NonNegativeOnly"]
    try:
        components(*bad)
    except ValueError as exc:
        assert "cannot train" in str(exc) and "NonNegativeOnly needs rewards >= 0" in str(exc)
    else:
        raise AssertionError("build_components accepted a weighting that rejects DAPO's shaped rewards")
    components(*bad, "--overlong-buffer", "0")  # without shaping the same weighting works
    components("--method", "dapo", "--weighting", "ha_dw")  # HA-DW reads correctness: DAPO + HA-DW works
    components("--method", "ebpo+ha_dw", "--overlong-buffer", "4")
