"""JSPO, SPO and KRPO (ebpo.estimators_shrinkage) against loop oracles, state, errors and the trainer.

Oracles (tests/oracles_shrinkage.py) are written from each paper and its authors' released code; every
comparison is in float64 with a tolerance relative to the norm of the expected advantages (tolerances.py).
"""

from __future__ import annotations

import copy
import math

import oracles_shrinkage as oracles
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close_norm

from ebpo import build_estimator, list_estimators
from ebpo.estimators import stable_prompt_ids

# 1e-4 float32 ulps = 1.2e-11 of the norm: float64 rounding with room; a wrong term is orders of magnitude more.
F64_ULPS = 1e-4
NAMES = ["jspo", "spo", "krpo"]


def random_batch(seed: int, num_groups: int = 10, min_g: int = 2, max_g: int = 7, binary: bool = True):
    """Variable group sizes, arbitrary (negative, sparse) group ids, shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(min_g, max_g + 1, (num_groups,), generator=gen)
    ids = torch.randperm(1000, generator=gen)[:num_groups] - 500
    group_ids = torch.repeat_interleave(ids, sizes)
    n = int(sizes.sum())
    if binary:
        p = torch.rand(num_groups, generator=gen)
        rewards = (torch.rand(n, generator=gen) < torch.repeat_interleave(p, sizes)).double()
    else:
        rewards = torch.randn(n, generator=gen, dtype=torch.float64) * 3 + 1
    perm = torch.randperm(n, generator=gen)
    return rewards[perm], group_ids[perm]


def pool_step(seed: int, pool: int = 6, num_groups: int = 5, min_g: int = 1, max_g: int = 5):
    """One step drawn from a small pool of prompts, so prompts come back (and may repeat within the step).

    Returns rewards (shaped: correctness minus a penalty on some responses), correctness in {0, 1},
    group ids (fresh per step, as the trainer's) and stable prompt ids, shuffled.
    """
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, pool, (num_groups,), generator=gen)
    sizes = torch.randint(min_g, max_g + 1, (num_groups,), generator=gen)
    skill = torch.linspace(0.05, 0.95, pool, dtype=torch.float64)
    prompt_of = torch.repeat_interleave(prompts, sizes)
    n = int(sizes.sum())
    correctness = (torch.rand(n, generator=gen, dtype=torch.float64) < skill[prompt_of]).double()
    penalty = (torch.rand(n, generator=gen) < 0.3).double() * 0.25
    group_ids = torch.repeat_interleave(torch.arange(num_groups) * 3 + 100, sizes)
    prompt_ids = stable_prompt_ids([f"problem-{int(p)}" for p in prompt_of])
    perm = torch.randperm(n, generator=gen)
    return (correctness - penalty)[perm], correctness[perm], group_ids[perm], prompt_ids[perm]


def as_expected(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_registry_holds_the_other_baselines():
    assert set(NAMES) <= set(list_estimators())


def test_docstring_examples():
    import doctest

    import ebpo.estimators_shrinkage

    result = doctest.testmod(ebpo.estimators_shrinkage, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------- JSPO


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("paper_factor", [False, True])
def test_jspo_matches_loop_oracle(seed, binary, paper_factor):
    rewards, group_ids = random_batch(seed, binary=binary)
    advantages, metrics = build_estimator("jspo", paper_factor=paper_factor)(rewards, group_ids)
    expected, lambdas = oracles.jspo(rewards.tolist(), group_ids.tolist(), paper_factor=paper_factor)
    assert advantages.dtype == torch.float64
    assert_close_norm(advantages, as_expected(expected), ulps=F64_ULPS, what="jspo")
    assert metrics["jspo/lambda"] == pytest.approx(sum(lambdas) / len(lambdas), rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_jspo_default_is_the_released_code_on_equal_groups(seed):
    """On the (n prompts, m responses) layout the released code handles, the default reproduces its arithmetic."""
    gen = torch.Generator().manual_seed(seed)
    table = (torch.rand(8, 4, generator=gen) < torch.rand(8, 1, generator=gen)).double()  # (n, m)
    advantages, _ = build_estimator("jspo")(table.reshape(-1), torch.arange(8).repeat_interleave(4))
    expected = oracles.jspo_released(table.tolist())
    assert_close_norm(advantages, as_expected(expected), ulps=F64_ULPS, what="jspo vs released code")


def test_jspo_all_failure_group_is_pulled_toward_the_other_prompts():
    """An all-zero group gets -lambda * mu_{-q} (GRPO and RLOO: exactly 0); lambda from the other groups only."""
    rewards = torch.tensor([0.0] * 4 + [1.0, 0.0, 1.0, 1.0] + [1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    group_ids = torch.arange(3).repeat_interleave(4)
    advantages, _ = build_estimator("jspo")(rewards, group_ids)
    v = (0.25 / 4 + (1 / 3) / 4) / 2  # mean over the other prompts of s^2 / G
    other_mean = (0.75 + 0.5) / 2
    s = ((0.75 - other_mean) ** 2 + (0.5 - other_mean) ** 2) / 2
    lam = v / (v + s + 1e-6)
    assert torch.allclose(advantages[:4], torch.full((4,), -lam * other_mean, dtype=torch.float64), rtol=1e-12)
    rloo, _ = build_estimator("rloo")(rewards, group_ids)
    assert torch.equal(rloo[:4], torch.zeros(4, dtype=torch.float64))


def test_jspo_single_prompt_is_rloo_and_equal_rewards_give_zero():
    rewards, group_ids = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0]), torch.zeros(5, dtype=torch.long)
    jspo, metrics = build_estimator("jspo")(rewards, group_ids)
    rloo, _ = build_estimator("rloo")(rewards, group_ids)
    assert torch.equal(jspo, rloo) and metrics["jspo/lambda"] == 0.0
    flat, _ = build_estimator("jspo")(torch.full((8,), 0.3), torch.arange(8) // 4)
    assert torch.equal(flat, torch.zeros(8))  # v = s = 0: lambda = 0, and every leave-one-out mean is the reward


# ---------------------------------------------------------------- SPO


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"per_response": True},
        {"rho": 1.0, "prior_count": 2.0, "prior_mean": 0.2, "std_normalize": False},
        {"rho": 0.7, "std_normalize": False, "center": False},
    ],
)
def test_spo_matches_loop_oracle_over_steps(options):
    estimator = build_estimator("spo", **options)
    oracle = oracles.LoopSPO(**options)
    for step in range(6):  # prompts come back, sometimes twice in a step; the tracker carries across steps
        rewards, correctness, group_ids, prompt_ids = pool_step(step)
        advantages, metrics = estimator(rewards, group_ids, correctness=correctness, prompt_ids=prompt_ids)
        expected = oracle.step(rewards.tolist(), group_ids.tolist(), prompt_ids.tolist(), correctness.tolist())
        assert_close_norm(advantages, as_expected(expected), ulps=F64_ULPS, what=f"spo step {step}")
    state = estimator.state_dict()["estimator_state"]
    assert sorted(state["keys"].tolist()) == sorted(oracle.tracker)
    for key, (alpha, beta) in zip(state["keys"].tolist(), state["values"].tolist()):
        assert (alpha, beta) == pytest.approx(oracle.tracker[key], rel=1e-12)
    assert metrics["spo/tracked_prompts"] == len(oracle.tracker)


def test_spo_baseline_is_the_prior_then_the_prompts_history():
    """Closed form: an unseen prompt's baseline is v0; after one visit with mean y it is (rho n0 v0 + y) / (rho n0 + 1)."""
    estimator = build_estimator("spo", std_normalize=False, center=False)
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    prompts = torch.tensor([42] * 4)
    first, m1 = estimator(rewards, torch.zeros(4, dtype=torch.long), prompt_ids=prompts)
    assert torch.equal(first, rewards - 0.5) and m1["spo/new_prompt_frac"] == 1.0
    second, m2 = estimator(rewards, torch.full((4,), 9), prompt_ids=prompts)
    value = (0.9 * 4.0 + 0.75) / (0.9 * 8.0 + 1.0)
    assert torch.allclose(second, rewards - value, rtol=0, atol=1e-15) and m2["spo/new_prompt_frac"] == 0.0


def test_spo_keys_prompts_not_group_ids():
    """The trainer numbers each step's groups from 0: a different prompt under group id 0 must start afresh."""
    estimator = build_estimator("spo", std_normalize=False, center=False)
    ones, group = torch.ones(4), torch.zeros(4, dtype=torch.long)
    estimator(ones, group, prompt_ids=stable_prompt_ids(["a"] * 4))
    fresh, metrics = estimator(ones, group, prompt_ids=stable_prompt_ids(["b"] * 4))
    assert torch.equal(fresh, torch.full((4,), 0.5)) and metrics["spo/new_prompt_frac"] == 1.0


# ---------------------------------------------------------------- KRPO


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("binary", [True, False])
def test_krpo_matches_loop_oracle(seed, binary):
    """A fresh filter per group (the released code), groups of any size in any order, G = 1 included."""
    rewards, group_ids = random_batch(seed, min_g=1, binary=binary)
    advantages, _ = build_estimator("krpo")(rewards, group_ids)
    expected = oracles.LoopKRPO().step(rewards.tolist(), group_ids.tolist())
    assert_close_norm(advantages, as_expected(expected), ulps=F64_ULPS, what="krpo")


def test_krpo_options_match_loop_oracle():
    options = {"process_var": 1e-3, "meas_var": 0.2, "init_mean": 0.5, "init_var": 0.3, "eps": 1e-6}
    rewards, group_ids = random_batch(11, binary=False)
    advantages, _ = build_estimator("krpo", **options)(rewards, group_ids)
    expected = oracles.LoopKRPO(**options).step(rewards.tolist(), group_ids.tolist())
    assert_close_norm(advantages, as_expected(expected), ulps=F64_ULPS, what="krpo options")


def test_krpo_carry_matches_loop_oracle_over_steps():
    estimator = build_estimator("krpo", carry=True)
    oracle = oracles.LoopKRPO(carry=True)
    for step in range(5):
        rewards, _, group_ids, prompt_ids = pool_step(40 + step)
        advantages, metrics = estimator(rewards, group_ids, prompt_ids=prompt_ids)
        expected = oracle.step(rewards.tolist(), group_ids.tolist(), prompt_ids.tolist())
        assert_close_norm(advantages, as_expected(expected), ulps=F64_ULPS, what=f"krpo carry step {step}")
    state = estimator.state_dict()["estimator_state"]
    for key, (x, p) in zip(state["keys"].tolist(), state["values"].tolist()):
        assert (x, p) == pytest.approx((oracle.filters[key].x, oracle.filters[key].p), rel=1e-12)
    assert metrics["krpo/tracked_prompts"] == len(oracle.filters)


def test_krpo_all_zero_group_gets_zero_and_all_one_group_positive():
    rewards = torch.tensor([0.0] * 4 + [1.0] * 4)
    advantages, _ = build_estimator("krpo")(rewards, torch.arange(2).repeat_interleave(4))
    assert torch.equal(advantages[:4], torch.zeros(4))
    assert bool((advantages[4:] > 0).all())  # the filter starts at x_0 = 0 and lags behind the 1s


# ---------------------------------------------------------------- state, resume, data parallel

STATEFUL = [("spo", {}), ("spo", {"per_response": True}), ("krpo", {"carry": True})]


def _run(estimator, steps, **kwargs):
    out = []
    for step in steps:
        rewards, correctness, group_ids, prompt_ids = pool_step(step, min_g=2)  # G >= 2, as jspo needs
        out.append(estimator(rewards, group_ids, correctness=correctness, prompt_ids=prompt_ids, **kwargs))
    return out


@pytest.mark.parametrize("name,options", STATEFUL)
def test_state_dict_round_trip_and_eval_does_not_move_state(name, options, tmp_path):
    estimator = build_estimator(name, **options)
    _run(estimator, range(3))
    state = copy.deepcopy(estimator.state_dict())
    torch.save(state, tmp_path / "state.pt")
    assert state["estimator_state"]["keys"].numel() > 0

    [(eval_advantages, eval_metrics)] = _run(estimator, [99], training=False)
    assert_states_equal(estimator.state_dict(), state)  # evaluation must not move the tracker

    restored = build_estimator(name, **options)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert_states_equal(restored.state_dict(), state)
    [(a, ma)] = _run(estimator, [99])
    [(b, mb)] = _run(restored, [99])
    assert torch.equal(a, b) and ma == mb
    assert torch.equal(a, eval_advantages) and ma == eval_metrics  # training=False computes the same thing
    assert not torch.equal(estimator.state_dict()["estimator_state"]["values"], state["estimator_state"]["values"])


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_states_equal(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("name,options", [*STATEFUL, ("jspo", {}), ("krpo", {})])
def test_resume_equals_uninterrupted(name, options, tmp_path):
    """k steps, save to disk, load into a fresh estimator, more steps == the same steps without the break."""
    whole = build_estimator(name, **options)
    expected = _run(whole, range(6))
    first = build_estimator(name, **options)
    _run(first, range(3))
    torch.save(first.state_dict(), tmp_path / "state.pt")
    second = build_estimator(name, **options)
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    resumed = _run(second, range(3, 6))
    for (a, ma), (b, mb) in zip(resumed, expected[3:]):
        assert torch.equal(a, b) and ma == mb
    assert_states_equal(second.state_dict(), whole.state_dict())


@pytest.mark.parametrize("name,options", STATEFUL)
def test_data_parallel_ranks_hold_identical_state(name, options):
    """Each rank gathers every rank's rewards and prompt ids, runs its own estimator and keeps its slice: the
    slices are the single-process advantages and the states are bit-identical."""
    single = build_estimator(name, **options)
    ranks = [build_estimator(name, **options) for _ in range(2)]
    for step in range(4):
        rewards, correctness, group_ids, prompt_ids = pool_step(60 + step)
        expected, _ = single(rewards, group_ids, correctness=correctness, prompt_ids=prompt_ids)
        cut = int(rewards.numel()) // 2 + 1  # uneven shards
        shards = [slice(0, cut), slice(cut, None)]
        for rank, estimator in enumerate(ranks):
            gathered = [torch.cat([t[s] for s in shards]) for t in (rewards, correctness, group_ids, prompt_ids)]
            advantages, _ = estimator(gathered[0], gathered[2], correctness=gathered[1], prompt_ids=gathered[3])
            assert torch.equal(advantages[shards[rank]], expected[shards[rank]])
    for estimator in ranks:
        assert_states_equal(estimator.state_dict(), single.state_dict())


def test_a_rejected_batch_leaves_the_tracker_as_it_was():
    estimator = build_estimator("spo")
    _run(estimator, range(2))
    before = copy.deepcopy(estimator.state_dict())
    rewards, _, group_ids, prompt_ids = pool_step(7)
    with pytest.raises(ValueError, match=r"correctness in \[0, 1\]"):
        estimator(rewards, group_ids, correctness=rewards + 2.0, prompt_ids=prompt_ids)
    assert_states_equal(estimator.state_dict(), before)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "rewards,group_ids,message",
    [
        ([1.0, float("nan")], [0, 0], "NaN reward at index 1"),
        ([1.0, float("inf")], [0, 0], "infinite reward at index 1"),
        ([1.0, 0.0, 1.0], [0, 0], "mismatched group ids"),
        ([], [], "empty"),
        ([[1.0, 0.0]], [[0, 0]], "1-D"),
        ([1.0, 0.0], [0.0, 0.0], "integer"),
    ],
)
@pytest.mark.parametrize("name", NAMES)
def test_bad_input_raises_clear_error(name, rewards, group_ids, message):
    with pytest.raises(ValueError, match=message):
        build_estimator(name)(torch.tensor(rewards), torch.tensor(group_ids), prompt_ids=torch.zeros(2).long())


@pytest.mark.parametrize(
    "prompt_ids,message",
    [
        (torch.tensor([1, 1, 2, 3]), r"group 8 has responses with different prompt ids \(2 and 3\)"),
        (torch.tensor([1.0, 1.0, 2.0, 2.0]), "prompt_ids must be an integer tensor"),
        (torch.tensor([1, 1, 2]), r"prompt_ids must have shape \(4,\)"),
    ],
)
@pytest.mark.parametrize("name", NAMES)
def test_bad_prompt_ids_raise_for_every_estimator(name, prompt_ids, message):
    with pytest.raises(ValueError, match=message):
        build_estimator(name)(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([5, 5, 8, 8]), prompt_ids=prompt_ids)


@pytest.mark.parametrize("name,options", [("spo", {}), ("krpo", {"carry": True})])
def test_per_prompt_state_without_prompt_ids_raises(name, options):
    with pytest.raises(ValueError, match=r"needs prompt_ids=.*stable_prompt_ids"):
        build_estimator(name, **options)(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))


def test_spo_refuses_successes_outside_the_unit_interval():
    with pytest.raises(ValueError, match=r"spo .* needs correctness in \[0, 1\], got values in \[-0.5, 1\]"):
        build_estimator("spo")(torch.tensor([1.0, -0.5]), torch.tensor([0, 0]), prompt_ids=torch.tensor([3, 3]))
    # shaped rewards are fine when the correctness says what the verifier saw
    build_estimator("spo")(
        torch.tensor([1.0, -0.5]), torch.tensor([0, 0]), correctness=torch.tensor([1.0, 0.0]), prompt_ids=[3, 3]
    )


def test_jspo_rejects_singleton_groups():
    with pytest.raises(ValueError, match=r"jspo is group-relative and needs at least 2 responses per prompt.*G = 1"):
        build_estimator("jspo")(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]))


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("jspo", {"eps": 0.0}, "jspo eps must be > 0"),
        ("jspo", {"shrink": 1}, "bad options for advantage estimator 'jspo'"),
        ("spo", {"rho": 0.0}, r"spo rho must be in \(0, 1\]"),
        ("spo", {"prior_count": -1.0}, "spo prior_count must be"),
        ("spo", {"prior_mean": 1.5}, r"spo prior_mean must be in \[0, 1\]"),
        ("krpo", {"meas_var": 0.0}, "krpo meas_var must be a finite number > 0"),
        ("krpo", {"process_var": -1.0}, "krpo process_var must be"),
        ("krpo", {"init_mean": math.inf}, "krpo init_mean must be finite"),
    ],
)
def test_bad_options_raise(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_estimator(name, **options)


def test_load_state_rejects_mismatched_configuration():
    spo = build_estimator("spo")
    _run(spo, range(2))
    with pytest.raises(ValueError, match="spo state was saved with"):
        build_estimator("spo", rho=0.8).load_state_dict(spo.state_dict())
    carried = build_estimator("krpo", carry=True)
    _run(carried, range(2))
    with pytest.raises(ValueError, match="carry=False is stateless"):
        build_estimator("krpo").load_state_dict(carried.state_dict())
    with pytest.raises(ValueError, match="carry=True got an empty state"):
        build_estimator("krpo", carry=True).load_state_dict(build_estimator("krpo").state_dict())
    with pytest.raises(ValueError, match="jspo is stateless"):
        build_estimator("jspo").load_state_dict({**spo.state_dict(), "estimator": "jspo"})
    state = copy.deepcopy(spo.state_dict())
    state["estimator_state"]["keys"] = state["estimator_state"]["keys"].flip(0)
    with pytest.raises(ValueError, match="sorted and unique"):
        build_estimator("spo").load_state_dict(state)


# ---------------------------------------------------------------- fuzzing

finite = {
    torch.float32: st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32),
    torch.float64: st.floats(-1e100, 1e100, allow_nan=False),
}


@st.composite
def batches(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    kind = draw(st.sampled_from(["random", "all_equal", "unit", "singletons"]))
    n = draw(st.integers(2, 30))
    if kind == "all_equal":
        rewards = [draw(finite[dtype])] * n
    elif kind == "unit":
        rewards = draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n))
    else:
        rewards = draw(st.lists(finite[dtype], min_size=n, max_size=n))
    group_ids = list(range(n)) if kind == "singletons" else draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    return torch.tensor(rewards, dtype=dtype), torch.tensor(group_ids)


@settings(max_examples=60, deadline=None)
@given(batches(), st.sampled_from([("jspo", {}), ("spo", {}), ("krpo", {}), ("krpo", {"carry": True})]))
def test_fuzz_finite_input_gives_finite_advantages_or_a_clear_error(batch, spec):
    rewards, group_ids = batch
    name, options = spec
    estimator = build_estimator(name, **options)
    prompt_ids = group_ids * 7 + 1  # one prompt per group, the same prompts on both calls
    for _ in range(2):  # twice, so per-prompt state is exercised too
        try:
            advantages, metrics = estimator(rewards, group_ids, prompt_ids=prompt_ids)
        except ValueError as exc:
            assert "at least 2 responses per prompt" in str(exc) or "correctness in [0, 1]" in str(exc), exc
            return
        assert advantages.dtype == rewards.dtype
        assert bool(torch.isfinite(advantages).all())
        assert all(math.isfinite(v) for v in metrics.values())


# ---------------------------------------------------------------- composition with the trainer


@pytest.mark.parametrize("estimator", ["jspo", "krpo"])
def test_ebpo_train_runs_with_the_estimator(tmp_path, estimator):
    from runs import MINI

    from ebpo.cli import main
    from ebpo.train.tracking import read_metrics

    out = tmp_path / "run"
    assert main(["train", "--estimator", estimator, "--steps", "2", "--out", str(out), "--log-every", "1", *MINI]) == 0
    rows = [
        r for r in read_metrics(str(out / "metrics.jsonl")) if f"{estimator}/baseline_mean" in r or "jspo/lambda" in r
    ]
    assert len(rows) == 2 and all(math.isfinite(v) for row in rows for v in row.values())


def test_ebpo_train_runs_with_spo(tmp_path, capsys):
    from runs import MINI

    from ebpo.cli import main
    from ebpo.train.tracking import read_metrics

    out = tmp_path / "run"
    code = main(["train", "--estimator", "spo", "--steps", "2", "--out", str(out), "--log-every", "1", *MINI])
    assert code == 0, capsys.readouterr().err
    rows = [r for r in read_metrics(str(out / "metrics.jsonl")) if "spo/baseline_mean" in r]
    assert len(rows) == 2 and rows[1]["spo/tracked_prompts"] >= 2


def _binary_reward(completions, **_):
    """0/1 rewards that differ within groups even for an untrained model."""
    return [float(len(c) % 2) for c in completions]


@pytest.mark.parametrize("estimator", ["jspo", "krpo"])
def test_trl_adapter_trains_on_the_estimator(tmp_path, monkeypatch, estimator):
    """By name through the TRL adapter: the advantages TRL trains on are the estimator's on TRL's rewards."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from runs import trl_args

    from ebpo.integrations.trl import EBPOGRPOTrainer
    from ebpo.models.loading import TinyLlamaSpec, build_tiny_llama
    from ebpo.models.tokenizer import CharTokenizer
    from ebpo.tasks.arithmetic import ArithmeticTask

    class Recording(EBPOGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            self.recorded = [*getattr(self, "recorded", []), (self._ebpo_rewards.sum(1).clone(), output["advantages"])]
            return output

    monkeypatch.setenv("WANDB_DISABLED", "true")
    tokenizer = CharTokenizer()
    tokenizer.padding_side = "left"
    problems = ArithmeticTask(num_train=16, num_eval=4, max_digits=1).train_problems()
    dataset = datasets.Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in problems])
    args = trl_args(
        tmp_path / "trl", max_steps=2, ebpo_estimator=estimator, ebpo_estimator_options={}, ebpo_weighting=None
    )
    trainer = Recording(
        model=build_tiny_llama(TinyLlamaSpec(), tokenizer, seed=0),
        reward_funcs=[_binary_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    replay = build_estimator(estimator)
    assert len(trainer.recorded) == 2
    for rewards, used in trainer.recorded:
        expected, _ = replay(rewards.cpu(), torch.arange(rewards.numel()) // 4)
        assert_close_norm(used.cpu(), expected.float(), ulps=4, what=f"{estimator} through TRL")
    assert any(key.startswith(f"{estimator}/") for key in trainer.state.log_history[0])
