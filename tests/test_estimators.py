"""Advantage estimators and HA-DW against loop oracles, closed forms and invariants."""

from __future__ import annotations

import copy
import math

import oracles
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ebpo import build_estimator, list_estimators
from ebpo.stats import Welford

TOL = 1e-6


def random_batch(seed: int, num_groups: int = 12, min_g: int = 2, max_g: int = 9, binary: bool = True):
    """Variable group sizes, arbitrary (negative, sparse) ids, shuffled order."""
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


def max_abs_diff(a: torch.Tensor, b: list[float]) -> float:
    return float((a - torch.tensor(b, dtype=torch.float64)).abs().max())


def test_registry_lists_every_estimator():
    assert list_estimators() == ["dr_grpo", "ebpo", "grpo", "jspo", "krpo", "rloo", "spo"]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("binary", [True, False])
def test_group_estimators_match_loop_reference(seed, binary):
    rewards, group_ids = random_batch(seed, binary=binary)
    r, g = rewards.tolist(), group_ids.tolist()
    cases = [
        (build_estimator("grpo"), oracles.grpo(r, g)),
        (build_estimator("grpo", scale="batch"), oracles.grpo(r, g, scale="batch")),
        (build_estimator("grpo", scale="none"), oracles.grpo(r, g, scale="none")),
        (build_estimator("grpo", unbiased_std=False), oracles.grpo(r, g, unbiased=False)),
        (build_estimator("dr_grpo"), oracles.grpo(r, g, scale="none")),
        (build_estimator("rloo"), oracles.rloo(r, g)),
    ]
    for estimator, expected in cases:
        advantages, _ = estimator(rewards, group_ids)
        assert advantages.dtype == torch.float64
        assert max_abs_diff(advantages, expected) <= TOL, estimator.name


@pytest.mark.parametrize("prior,decay", [("batch", 0.0), ("running", 1.0), ("ema", 0.7)])
@pytest.mark.parametrize("std_normalize,center", [(True, True), (False, True), (False, False)])
def test_ebpo_matches_loop_reference_over_steps(prior, decay, std_normalize, center):
    options = {"decay": decay} if prior == "ema" else {}
    estimator = build_estimator("ebpo", prior=prior, std_normalize=std_normalize, center=center, **options)
    oracle = oracles.LoopEBPO(decay=decay, std_normalize=std_normalize, center=center)
    for step in range(5):  # the state carries across steps for running / ema
        rewards, group_ids = random_batch(100 + step, min_g=1, binary=step % 2 == 0)
        advantages, metrics = estimator(rewards, group_ids)
        expected, expected_metrics = oracle.step(rewards.tolist(), group_ids.tolist())
        assert max_abs_diff(advantages, expected) <= TOL
        for key in ("shrinkage", "mu_glob", "sigma2", "tau2"):
            assert math.isclose(metrics[f"ebpo/{key}"], expected_metrics[key], rel_tol=1e-9, abs_tol=1e-12), key


@pytest.mark.parametrize("anchor", ["soft", "hard"])
@pytest.mark.parametrize("base", ["grpo", "dr_grpo", "rloo", "ebpo"])
def test_ha_dw_composes_with_every_estimator_and_matches_loop(anchor, base):
    weighted = build_estimator(
        base, weighting="ha_dw", weighting_options={"anchor": anchor, "lam": 1.5, "k": 3, "m": 4}
    )
    plain = build_estimator(base)
    oracle = oracles.LoopHADW(anchor, lam=1.5, k=3, m=4)
    for step in range(6):
        rewards, group_ids = random_batch(200 + step)
        advantages, metrics = weighted(rewards, group_ids)
        base_advantages, _ = plain(rewards, group_ids)
        weights = oracle.step(base_advantages.tolist(), rewards.tolist(), group_ids.tolist())
        expected = [a * w for a, w in zip(base_advantages.tolist(), weights)]
        assert max_abs_diff(advantages, expected) <= TOL
        assert metrics["hadw/weight_max"] == pytest.approx(max(weights), abs=1e-12)
        assert metrics["hadw/weight_mean"] == pytest.approx(sum(weights) / len(weights), abs=1e-12)


def test_soft_anchor_moves_and_tracks_accuracy():
    estimator = build_estimator("grpo", weighting="ha_dw")
    anchors = []
    for step in range(40):
        rewards = torch.tensor([1.0, 0.0, 1.0, 1.0] * 8) if step >= 1 else torch.tensor([1.0, 0.0, 0.0, 0.0] * 8)
        _, metrics = estimator(rewards, torch.arange(32) // 4)
        anchors.append(metrics["hadw/anchor"])
    assert anchors[0] == 0.25 and anchors[1] == 0.25  # C_0 = first accuracy; diff uses C before the update
    assert anchors[2] > anchors[1]  # the anchor moves towards the new accuracy ...
    assert all(b >= a for a, b in zip(anchors[1:], anchors[2:]))  # ... monotonically here ...
    assert 0.25 < anchors[-1] <= 0.75  # ... and never beyond it


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize("prior", ["batch", "running", "ema"])
def test_all_failure_group_gets_minus_s_mu_glob(prior):
    rewards = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    raw = build_estimator("ebpo", prior=prior, std_normalize=False, center=False)
    advantages, m = raw(rewards, group_ids)
    s, mu_glob = m["ebpo/shrinkage"], m["ebpo/mu_glob"]
    # closed form from the batch itself: sigma^2 = total variance, tau^2 = var of group means
    sigma2 = float(rewards.var(unbiased=False))
    means = torch.tensor([0.0, 0.5, 0.75])
    tau2 = float(means.var(unbiased=False))
    assert mu_glob == pytest.approx(float(means.mean()))
    assert s == pytest.approx((sigma2 / 4) / (sigma2 / 4 + tau2))
    assert torch.allclose(advantages[:4], torch.full((4,), -s * mu_glob, dtype=advantages.dtype))
    assert float(advantages[0]) < 0
    grpo_advantages, _ = build_estimator("grpo")(rewards, group_ids)
    assert torch.equal(grpo_advantages[:4], torch.zeros(4))
    # With per-batch statistics and equal G the batch mean of A_raw is 0, so standardisation keeps the sign.
    standardised, _ = build_estimator("ebpo", prior=prior)(rewards, group_ids)
    assert bool((standardised[:4] < 0).all())


def test_shrinkage_is_one_when_denominator_vanishes():
    rewards = torch.ones(8)
    advantages, metrics = build_estimator("ebpo")(rewards, torch.arange(8) // 4)
    assert metrics["ebpo/shrinkage"] == 1.0
    assert torch.equal(advantages, torch.zeros(8))
    assert metrics["adv/zero_signal_frac"] == 1.0


def test_ha_dw_weight_table():
    """Hard prompt (mu = 1/4) and easy prompt (mu = 3/4); anchor = batch accuracy 1/2 (hard anchor, k=1)."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    lam = 1.3
    weighted, _ = build_estimator(
        "dr_grpo", weighting="ha_dw", weighting_options={"anchor": "hard", "k": 1, "lam": lam}
    )(rewards, group_ids)
    plain, _ = build_estimator("dr_grpo")(rewards, group_ids)
    weights = weighted / plain
    up, down = lam * math.exp(0.25), lam * math.exp(-0.25)
    table = {
        "hard & correct": (weights[0], up),
        "hard & wrong": (weights[1], down),
        "easy & correct": (weights[4], down),
        "easy & wrong": (weights[7], up),
    }
    for case, (got, expected) in table.items():
        assert float(got) == pytest.approx(expected, rel=1e-12), case


def test_rloo_is_scaled_dr_grpo():
    rewards, group_ids = random_batch(7, min_g=4, max_g=4)
    rloo, _ = build_estimator("rloo")(rewards, group_ids)
    dr, _ = build_estimator("dr_grpo")(rewards, group_ids)
    assert torch.allclose(rloo, dr * 4 / 3, atol=1e-12)


# ---------------------------------------------------------------- Welford


def test_welford_batch_merge_equals_one_value_at_a_time_and_shards():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(1000, generator=gen, dtype=torch.float64) * 5 + 2
    one_pass = Welford.from_values(values)
    loop = Welford()
    for v in values.tolist():
        loop = loop.add(v)
    cuts = [0, 13, 14, 400, 401, 777, 1000]  # uneven shards, one of size 1
    merged = Welford()
    for a, b in zip(cuts, cuts[1:]):
        merged = merged.merge(Welford.from_values(values[a:b]))
    for stats in (loop, merged):
        assert stats.count == one_pass.count
        assert stats.mean == pytest.approx(one_pass.mean, rel=1e-12)
        assert stats.m2 == pytest.approx(one_pass.m2, rel=1e-10)
    assert one_pass.var == pytest.approx(float(values.var(unbiased=False)), rel=1e-12)


def test_welford_decay_is_exponentially_weighted_statistics():
    decay = 0.6
    steps = [torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) + s for s in range(5)]
    state = Welford()
    for values in steps:
        state = state.decayed(decay).merge(Welford.from_values(values))
    weights = torch.cat([torch.full((20,), decay ** (4 - s), dtype=torch.float64) for s in range(5)])
    x = torch.cat(steps)
    mean = float((weights * x).sum() / weights.sum())
    var = float((weights * (x - mean) ** 2).sum() / weights.sum())
    assert state.mean == pytest.approx(mean, rel=1e-12)
    assert state.var == pytest.approx(var, rel=1e-10)


# ---------------------------------------------------------------- state


@pytest.mark.parametrize(
    "name,options",
    [
        ("ebpo", {"prior": "running"}),
        ("ebpo", {"prior": "ema", "decay": 0.8}),
        ("grpo", {"weighting": "ha_dw"}),
        ("ebpo", {"prior": "running", "weighting": "ha_dw", "weighting_options": {"anchor": "hard"}}),
    ],
)
def test_state_dict_round_trip_and_eval_does_not_move_state(name, options, tmp_path):
    estimator = build_estimator(name, **options)
    for step in range(3):
        estimator(*random_batch(300 + step))
    state = copy.deepcopy(estimator.state_dict())
    torch.save(state, tmp_path / "state.pt")

    next_batch = random_batch(999)
    eval_advantages, eval_metrics = estimator(*next_batch, training=False)
    assert estimator.state_dict() == state  # evaluation must not move the prior

    restored = build_estimator(name, **options)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert restored.state_dict() == state
    a, ma = estimator(*next_batch)
    b, mb = restored(*next_batch)
    assert torch.equal(a, b) and ma == mb
    assert torch.equal(a, eval_advantages) and ma == eval_metrics  # training=False computes the same thing
    assert estimator.state_dict() != state  # ... while training=True does move it


def test_running_prior_accumulates_and_batch_prior_does_not():
    running, per_batch = build_estimator("ebpo", prior="running"), build_estimator("ebpo")
    for step in range(3):
        batch = random_batch(step)
        _, m_run = running(*batch)
        _, m_batch = per_batch(*batch)
    assert m_run["ebpo/prior_count"] == 36  # 3 steps x 12 groups
    assert m_batch["ebpo/prior_count"] == 12


def test_load_state_rejects_mismatched_configuration():
    running = build_estimator("ebpo", prior="running")
    running(*random_batch(0))
    with pytest.raises(ValueError, match="prior"):
        build_estimator("ebpo", prior="ema").load_state_dict(running.state_dict())
    with pytest.raises(ValueError, match="estimator"):
        build_estimator("grpo").load_state_dict(running.state_dict())


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
@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "ebpo"])
def test_bad_input_raises_clear_error(name, rewards, group_ids, message):
    with pytest.raises(ValueError, match=message):
        build_estimator(name)(torch.tensor(rewards), torch.tensor(group_ids))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_group_relative_estimators_reject_singleton_groups(name):
    with pytest.raises(ValueError, match=r"at least 2 responses per prompt.*G = 1"):
        build_estimator(name)(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]))


def test_ha_dw_rejects_rewards_outside_unit_interval():
    with pytest.raises(ValueError, match=r"needs rewards in \[0, 1\]"):
        build_estimator("grpo", weighting="ha_dw")(torch.tensor([2.0, 0.0]), torch.tensor([0, 0]))


def test_unknown_names_and_options_raise():
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'grop'.*grpo"):
        build_estimator("grop")
    with pytest.raises(ValueError, match="unknown advantage weighting 'hadw'"):
        build_estimator("grpo", weighting="hadw")
    with pytest.raises(ValueError, match="bad options for advantage estimator 'rloo'"):
        build_estimator("rloo", scale="group")
    with pytest.raises(ValueError, match="prior must be one of"):
        build_estimator("ebpo", prior="global")
    with pytest.raises(ValueError, match="decay applies only"):
        build_estimator("ebpo", prior="running", decay=0.5)
    with pytest.raises(ValueError, match="anchor must be one of"):
        build_estimator("ebpo", weighting="ha_dw", weighting_options={"anchor": "medium"})
    with pytest.raises(ValueError, match="cannot import module"):
        build_estimator("no_such_pkg.mod:factory")


def test_user_estimator_by_import_path():
    estimator = build_estimator("tests_support_estimator:ConstantBaseline", baseline=0.5)
    advantages, _ = estimator(torch.tensor([1.0, 0.0]), torch.tensor([3, 3]))
    assert advantages.tolist() == [0.5, -0.5]


# ---------------------------------------------------------------- fuzzing

finite = {
    torch.float32: st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32),
    torch.float64: st.floats(-1e100, 1e100, allow_nan=False),
}


@st.composite
def batches(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    kind = draw(st.sampled_from(["random", "all_equal", "singletons", "single_group", "tiny"]))
    n = draw(st.integers(2, 40))
    if kind == "all_equal":
        rewards = [draw(finite[dtype])] * n
    elif kind == "tiny":
        rewards = draw(st.lists(st.floats(-(2.0**-100), 2.0**-100, allow_nan=False, width=32), min_size=n, max_size=n))
    else:
        rewards = draw(st.lists(finite[dtype], min_size=n, max_size=n))
    if kind == "singletons":
        group_ids = list(range(n))
    elif kind == "single_group":
        group_ids = [7] * n
    else:
        group_ids = draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))
    return torch.tensor(rewards, dtype=dtype), torch.tensor(group_ids)


@settings(max_examples=50, deadline=None)
@given(batches(), st.sampled_from(["grpo", "dr_grpo", "rloo", "ebpo-batch", "ebpo-running", "ebpo-ema"]), st.booleans())
def test_fuzz_finite_input_gives_finite_advantages_or_a_clear_error(batch, name, weighted):
    rewards, group_ids = batch
    base, _, prior = name.partition("-")
    options = {"prior": prior} if prior else {}
    if weighted:
        options["weighting"] = "ha_dw"
        rewards = rewards.abs() / (1 + rewards.abs())  # HA-DW weights accuracies in [0, 1]
    estimator = build_estimator(base, **options)
    sizes = torch.bincount(group_ids - group_ids.min())
    if estimator.min_group_size > int(sizes[sizes > 0].min()):
        with pytest.raises(ValueError, match="needs at least 2 responses per prompt"):
            estimator(rewards, group_ids)
        return
    for _ in range(2):  # twice, so running state is exercised too
        advantages, metrics = estimator(rewards, group_ids)
        assert advantages.dtype == rewards.dtype
        assert bool(torch.isfinite(advantages).all())
        assert all(math.isfinite(v) for v in metrics.values())
