"""``ebpo train --allocation``: the step's budget spent exactly, unequal groups sampled and trained on, ranks that
agree, a resume that reproduces the uninterrupted run, ``--max-samples``, and clear errors.

The fast tests drive :meth:`Trainer.rollout_and_score` with a fake ``generate`` and verifier (as
tests/test_train_wiring.py does); the end-to-end ones run the tiny model (tests/runs.py's TINY).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import types

import pytest
import torch
from runs import TINY, fake_generate, saved_weights, timeless, torchrun

import ebpo.train.trainer as trainer_mod
from ebpo import build_estimator
from ebpo.allocation import ALLOCATORS
from ebpo.cli import main
from ebpo.grouping import stable_topic_ids
from ebpo.tasks.base import Problem
from ebpo.train.config import TrainConfig
from ebpo.train.distributed import Dist
from ebpo.train.tracking import read_metrics
from ebpo.train.trainer import Trainer, build_step_allocator, rank_prompts

POOL = 6  # the fake stream cycles through 6 prompts, so the history-reading allocators see prompts again
RATE = {f"p{i}": r for i, r in enumerate([0.0, 1.0, 0.5, 0.25, 0.0, 0.75])}  # p0, p4 never solved, p1 always


class _Stream:
    def __init__(self) -> None:
        self.problems = [Problem(id=f"p{i}", prompt="q", answer="a") for i in range(POOL)]
        self.position = 0

    def take(self, count: int) -> list[Problem]:
        out = [self.problems[(self.position + i) % POOL] for i in range(count)]
        self.position += count
        return out


def _fake_score(rollout, verifier):
    """Row k of a group of n is correct when k < round(rate x n): deterministic, mixed where 0 < rate < 1."""
    correct, seen = [], {}
    for p, g in zip(rollout.problems, rollout.group_ids.tolist()):
        n = int((rollout.group_ids == g).sum())
        k = seen[g] = seen.get(g, -1) + 1
        correct.append(float(k < round(RATE[p.id] * n)))
    rewards = torch.tensor(correct, dtype=torch.float64)
    return rewards, torch.ones(len(rewards), dtype=torch.bool), {}


def _trainer(monkeypatch, allocation: str, calls: list | None = None, **config) -> Trainer:
    def generate(*args, **kwargs):
        if calls is not None:
            calls.append((kwargs["group_size"], [p.id for p in args[2]]))
        return fake_generate(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "generate", generate)
    monkeypatch.setattr(trainer_mod, "score", _fake_score)
    trainer = object.__new__(Trainer)
    trainer.config = TrainConfig(allocation=allocation, **{"group_size": 4, "prompts_per_step": 3, **config})
    estimator = types.SimpleNamespace(min_group_size=2, population_prior=lambda topic_ids=None: (0.4, 0.1))
    trainer.dist, trainer.stream, trainer.model, trainer.tokenizer = Dist(), _Stream(), None, None
    trainer.device = torch.device("cpu")
    trainer.c = types.SimpleNamespace(
        verifier=None, estimator=estimator, allocator=build_step_allocator(trainer.config, estimator)
    )
    trainer.samples_total, trainer.mean_group_size, trainer.step = 0, 4.0, 0
    trainer._overlong = lambda rollout: torch.zeros(len(rollout.texts), dtype=torch.float64)
    return trainer


@pytest.mark.parametrize("allocation", sorted(ALLOCATORS.names()))
def test_every_allocation_spends_exactly_the_budget_in_groups_of_the_allocated_sizes(monkeypatch, allocation):
    calls: list = []
    trainer = _trainer(monkeypatch, allocation, calls, candidates_per_step=5)
    for step in range(1, 7):
        calls.clear()
        rollout, rewards, correctness, metrics = trainer.rollout_and_score()
        assert len(rollout.texts) == len(rewards) == 12  # 3 prompts x 4, every step
        assert metrics["rollout/samples"] == metrics["alloc/samples"] == 12.0
        assert metrics["rollout/samples_total"] == 12.0 * step
        sizes = torch.bincount(rollout.group_ids)
        sizes = sizes[sizes > 0]
        assert bool((sizes >= 2).all()) and int(sizes.sum()) == 12
        assert [c[0] for c in calls] == sorted({c[0] for c in calls})  # one call per size, increasing
        _, _, _, mixed = trainer_mod.group_outcomes(correctness, rollout.group_ids)
        equal_rows = sum(int((rollout.group_ids == g).sum()) for g in torch.unique(rollout.group_ids)[~mixed].tolist())
        assert metrics["rollout/all_equal_samples"] == float(equal_rows)
    if allocation != "uniform":
        assert trainer.c.allocator.history.keys.numel() == POOL  # every prompt observed under its stable key
    else:
        assert trainer.c.allocator.history.keys.numel() == 0  # uniform reads no history and is not fed one


def test_uniform_allocation_makes_the_calls_a_run_without_allocation_made(monkeypatch):
    """One generate call of group_size over this rank's prompts r, r + world, ...: the pre-allocation sampling."""
    calls: list = []
    trainer = _trainer(monkeypatch, "uniform", calls, prompts_per_step=5)
    trainer.rollout_and_score()
    assert calls == [(4, ["p0", "p1", "p2", "p3", "p4"])]
    for world in (2, 3):
        equal = torch.full((7,), 4)
        assert [rank_prompts(equal, r, world).tolist() for r in range(world)] == [
            list(range(r, 7, world)) for r in range(world)
        ]


def test_eb_moves_samples_from_prompts_it_has_seen_settled_to_the_uncertain_ones(monkeypatch):
    """Pool of 6 seen again each step: p0/p4 (never solved) and p1 (always) lose samples, the mixed ones gain."""
    trainer = _trainer(monkeypatch, "eb", prompts_per_step=6, candidates_per_step=6)
    for _ in range(6):
        rollout, *_ = trainer.rollout_and_score()
    per_prompt = {}
    for p in rollout.problems:
        per_prompt[p.id] = per_prompt.get(p.id, 0) + 1
    settled = sum(per_prompt.get(k, 0) for k in ("p0", "p1", "p4"))
    assert settled < sum(per_prompt.get(k, 0) for k in ("p2", "p3", "p5"))


@pytest.mark.parametrize("allocation", ["eb", "knapsack"])
def test_a_first_round_then_top_ups_of_the_groups_it_left_all_equal(monkeypatch, allocation):
    """2 completions per candidate first, observed; the other 12 of the 24 top groups up, merged into the same
    group, each group's rows together; eb gives none to p2, whose first two differ."""
    calls: list = []
    trainer = _trainer(
        monkeypatch, allocation, calls, prompts_per_step=6, candidates_per_step=6, allocation_first_round=2
    )
    rollout, rewards, correctness, metrics = trainer.rollout_and_score()
    assert len(rollout.texts) == 24 and metrics["rollout/samples"] == metrics["alloc/samples"] == 24.0
    assert metrics["alloc/first_round_samples"] == 12.0 and metrics["alloc/top_up_samples"] == 12.0
    assert calls[0] == (2, [f"p{i}" for i in range(6)])  # the first round: every candidate, 2 each
    ids = rollout.group_ids.tolist()
    assert ids == sorted(ids)  # a group's first-round rows and its top-ups are merged
    sizes = {p.id: ids.count(g) for p, g in zip(rollout.problems, ids)}
    if allocation == "eb":  # knapsack's point estimates (0/2, 2/2) value every top-up at 0 and spread them evenly
        assert sizes["p2"] == 2  # mixed after the first round: a top-up cannot make it more mixed
    history = trainer.c.allocator.history
    assert float(history.trials.sum()) == 24.0  # the first round and the top-ups, each observed once
    assert metrics["alloc/first_round_mixed"] == 1.0
    _, _, trials, mixed = trainer_mod.group_outcomes(correctness, rollout.group_ids)  # the merged groups, recounted
    assert metrics["rollout/all_equal_samples"] == float(trials[~mixed].sum())


def test_the_variance_value_tops_up_the_mixed_group_and_spreads_the_rest(monkeypatch):
    """``value: variance`` through the trainer: p2, the one group mixed after its first 2, has the largest
    posterior E[p (1 - p)] and gets a top-up (under ``groups`` it gets none); no group takes the whole top-up."""
    trainer = _trainer(
        monkeypatch,
        "eb",
        prompts_per_step=6,
        candidates_per_step=6,
        allocation_first_round=2,
        allocation_options={"value": "variance"},
    )
    rollout, _, _, metrics = trainer.rollout_and_score()
    assert len(rollout.texts) == 24 and metrics["alloc/top_up_samples"] == 12.0
    ids = rollout.group_ids.tolist()
    sizes = {p.id: ids.count(g) for p, g in zip(rollout.problems, ids)}
    assert sizes["p2"] > 2 and sizes["p2"] == max(sizes.values())
    assert sum(n > 2 for n in sizes.values()) >= 3


def test_eb_starts_each_prompt_from_its_topic_prior_under_a_hierarchical_ebpo(monkeypatch):
    """With ``hierarchical: true``, the request carries each candidate's topic prior (mu_k*, Var(p) from tau_k*^2)."""
    trainer = _trainer(monkeypatch, "eb", prompts_per_step=6, candidates_per_step=6)
    easy = {"p1", "p2", "p5"}  # success rates 1, 0.5, 0.75 against 0, 0.25, 0 for the others
    trainer.stream.problems = [
        dataclasses.replace(p, topic="easy" if p.id in easy else "hard") for p in trainer.stream.problems
    ]
    trainer.c.estimator = build_estimator("ebpo", prior="running", hierarchical=True)
    requests: list = []
    allocate = trainer.c.allocator.allocate
    monkeypatch.setattr(
        trainer.c.allocator, "allocate", lambda request: (requests.append(request), allocate(request))[1]
    )
    candidates = stable_topic_ids([p.topic for p in trainer.stream.problems])  # 6 candidates = the pool, in order
    for step in range(2):
        rollout, rewards, _, _ = trainer.rollout_and_score()
        topics = stable_topic_ids([p.topic for p in rollout.problems])
        trainer.c.estimator(rewards, rollout.group_ids, topic_ids=topics)  # the training step's estimator call
        if step == 0:  # what the second step's allocation must start from
            mean, tau2 = trainer.c.estimator.population_prior(candidates)
            g = trainer.mean_group_size  # of the groups the estimator saw
    assert requests[0].prior_mean is None and requests[0].prior_var is None  # no statistics before the first step
    request = requests[1]
    expected_var = ((g * tau2 - mean * (1 - mean)) / (g - 1)).clamp_min(0.0)  # the binomial noise removed
    assert torch.equal(request.prior_mean, mean.clamp(0, 1)) and torch.allclose(request.prior_var, expected_var)
    assert mean.unique().numel() == 2  # one prior per topic
    is_easy = torch.tensor([p.id in easy for p in trainer.stream.problems])
    assert float(request.prior_mean[is_easy].min()) > float(request.prior_mean[~is_easy].max())


def test_rank_prompts_deals_every_sampled_prompt_once_and_balances_the_ranks():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        sizes = torch.randint(0, 9, (23,), generator=generator)
        sizes[sizes == 1] = 0
        for world in (1, 2, 3, 4):
            dealt = [rank_prompts(sizes, r, world) for r in range(world)]
            together = torch.cat(dealt).sort().values
            assert together.tolist() == torch.nonzero(sizes).squeeze(1).tolist()
            loads = [int(sizes[d].sum()) for d in dealt]
            assert max(loads) - min(loads) <= int(sizes.max())


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "config,needle",
    [
        ({"allocation": "eb", "dynamic_sampling": True}, "cannot be combined with allocation"),
        ({"allocation": "nope"}, "nope"),
        ({"allocation": "skip", "allocation_first_round": 2}, "cannot top up a first round"),
        ({"allocation": "eb", "allocation_first_round": 5}, "must fit the step's budget"),
        (
            {"allocation": "eb", "allocation_options": {"max_group_size": 2}, "candidates_per_step": 3},
            "cannot be spread",
        ),
        ({"allocation": "eb", "allocation_options": {"min_group_size": 1}}, "below the 2 completions"),
        ({"allocation": "eb", "allocation_options": {"bogus": 1}}, "bad options for rollout allocation"),
    ],
)
def test_bad_allocation_settings_fail_before_training(config, needle):
    from ebpo.train.trainer import build_components

    with pytest.raises(ValueError, match=needle):
        build_components(TrainConfig(estimator="grpo", task="arithmetic", prompts_per_step=4, group_size=4, **config))


def test_rewards_that_are_not_success_counts_stop_a_history_reading_allocation(monkeypatch):
    def twos(rollout, verifier):
        return torch.full((len(rollout.texts),), 2.0), torch.ones(len(rollout.texts), dtype=torch.bool), {}

    trainer = _trainer(monkeypatch, "eb")
    monkeypatch.setattr(trainer_mod, "score", twos)
    with pytest.raises(ValueError, match=r"rewards in \[0, 1\]"):
        trainer.rollout_and_score()
    uniform = _trainer(monkeypatch, "uniform")
    monkeypatch.setattr(trainer_mod, "score", twos)
    uniform.rollout_and_score()  # uniform reads no history: any reward scale trains as before

    def minus_one_and_two(rollout, verifier):  # each group of 4 sums to 2: in [0, trials], yet not success counts
        rewards = torch.tensor([-1.0, 2.0, 0.0, 1.0] * (len(rollout.texts) // 4), dtype=torch.float64)
        return rewards, torch.ones(len(rewards), dtype=torch.bool), {}

    trainer = _trainer(monkeypatch, "eb")
    monkeypatch.setattr(trainer_mod, "score", minus_one_and_two)
    with pytest.raises(ValueError, match=r"rewards in \[0, 1\]"):
        trainer.rollout_and_score()


def test_a_first_round_the_verifier_partly_dropped_is_topped_up(monkeypatch):
    """A verifier returning None for some completions leaves first groups with fewer counted rows than sampled."""

    def drop_first_rows(rollout, verifier):
        rewards, keep, info = _fake_score(rollout, verifier)
        keep[0] = False  # the first row of the step: its group counts one completion
        return rewards, keep, info

    trainer = _trainer(monkeypatch, "eb", prompts_per_step=6, candidates_per_step=6, allocation_first_round=2)
    monkeypatch.setattr(trainer_mod, "score", drop_first_rows)
    rollout, _, _, metrics = trainer.rollout_and_score()
    assert metrics["rollout/samples"] == 24.0 and len(rollout.texts) == 22  # two dropped: one per scored part


# ------------------------------------------------------------------ end to end (tiny model)
RUN = [*TINY, "--task-options", "{num_train: 12, num_eval: 8, max_terms: 1, max_digits: 2}", "--seed", "3"]
EB = ["--allocation", "eb", "--candidates-per-step", "6", "--allocation-options", "{max_group_size: 8}"]


def test_eb_run_resumes_to_the_uninterrupted_run_and_max_samples_stops_it(tmp_path):
    """4 steps of eb on a 12-prompt pool (prompts seen again), checkpoints at 2 and 4; the copy without step 4
    resumes from step 2 and reproduces steps 3 and 4: metrics, the allocator's history, the weights."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ["--steps", "4", "--save-every", "2", "--keep-checkpoints", "2", *RUN, *EB]
    assert main(["train", "--out", str(full), *args]) == 0
    rows = [timeless(r) for r in read_metrics(str(full / "metrics.jsonl"))]
    steps = [r for r in rows if "alloc/samples" in r]
    assert [r["rollout/samples"] for r in steps] == [16.0] * 4
    assert [r["rollout/samples_total"] for r in steps] == [16.0, 32.0, 48.0, 64.0]
    assert any(r["alloc/prompts_skipped"] > 0 for r in steps)  # eb used its freedom at least once
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    assert main(["train", "--resume", str(resumed), "--no-progress"]) == 0
    assert [timeless(r) for r in read_metrics(str(resumed / "metrics.jsonl"))] == rows
    a, b = (
        torch.load(run / "checkpoints" / "step-000004" / "trainer_state.pt", weights_only=True)
        for run in (full, resumed)
    )
    history = a["allocation"]["allocator"]["history"]
    assert history["keys"].numel() == 12 and a["allocation"]["samples_total"] == 64
    assert all(torch.equal(history[k], b["allocation"]["allocator"]["history"][k]) for k in history)
    wa, wb = (saved_weights(str(run / "checkpoints" / "step-000004" / "model")) for run in (full, resumed))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    capped = tmp_path / "capped"  # 40 samples: steps of 16 reach it after the third
    assert main(["train", "--out", str(capped), "--steps", "10", "--max-samples", "40", *RUN, *EB]) == 0
    summary = __import__("json").loads((capped / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["samples"] == 48


@pytest.mark.slow  # a 2-process launch, 20 to 45 s; the default suite has rank_prompts and the allocators' agreement
def test_two_processes_allocate_alike_and_train_on_unequal_groups(tmp_path):
    """2 gloo processes with eb: the trainer checks every step that both ranks allocated the same sizes
    (a RuntimeError otherwise), ranks hold different numbers of completions, and the run finishes."""
    out = tmp_path / "dp"
    launcher = torchrun(2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    first = ["--allocation-first-round", "2"]  # 12 completions first, 4 top-ups: both allocations checked
    args = ["-m", "ebpo", "train", "--out", str(out), "--steps", "3", "--device", "cpu", *RUN, *EB, *first]
    result = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in read_metrics(str(out / "metrics.jsonl")) if "alloc/samples" in r]
    assert [r["rollout/samples"] for r in rows] == [16.0] * 3
    assert [r["alloc/top_up_samples"] for r in rows] == [4.0] * 3
    summary = __import__("json").loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
