"""Hierarchical EBPO (docs/hierarchical-prior.md) against a loop oracle, its single-topic reduction, state, composition."""

from __future__ import annotations

import copy
import math

import oracles
import pytest
import torch

from ebpo import build_estimator

TOPIC_VALUES = [-7, 3, 1000, 2**40]  # any integers


def topic_batch(seed: int, topics: list[int], min_g: int = 1, max_g: int = 6, binary: bool = True):
    """Groups of unequal sizes spread over ``topics`` (unequal counts, shuffled rows), topic means far apart."""
    gen = torch.Generator().manual_seed(seed)
    num_groups = 3 * len(topics) + int(torch.randint(0, 4, (1,), generator=gen))
    group_topic = torch.tensor(topics)[torch.randint(0, len(topics), (num_groups,), generator=gen)]
    group_topic[: len(topics)] = torch.tensor(topics)  # every listed topic has at least one group
    sizes = torch.randint(min_g, max_g + 1, (num_groups,), generator=gen)
    ids = torch.randperm(500, generator=gen)[:num_groups] - 250
    rank = torch.tensor([sorted(topics).index(t) for t in group_topic.tolist()], dtype=torch.float64)
    p = (
        (rank + 0.5) / len(topics) * 0.8 + 0.1 + 0.1 * torch.rand(num_groups, generator=gen, dtype=torch.float64)
    ).clamp(0, 1)
    n = int(sizes.sum())
    if binary:
        rewards = (torch.rand(n, generator=gen, dtype=torch.float64) < torch.repeat_interleave(p, sizes)).double()
    else:
        rewards = torch.repeat_interleave(p, sizes) + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)
    perm = torch.randperm(n, generator=gen)
    return rewards[perm], torch.repeat_interleave(ids, sizes)[perm], torch.repeat_interleave(group_topic, sizes)[perm]


PRIORS = [("batch", 0.0, {}), ("running", 1.0, {}), ("ema", 0.7, {"decay": 0.7})]


@pytest.mark.parametrize("prior,decay,extra", PRIORS)
@pytest.mark.parametrize("pooling", ["partial", "none"])
@pytest.mark.parametrize("std_normalize,center", [(True, True), (False, False)])
def test_matches_loop_oracle_over_steps_with_topics_appearing_later(
    prior, decay, extra, pooling, std_normalize, center
):
    estimator = build_estimator(
        "ebpo", prior=prior, hierarchical=True, pooling=pooling, std_normalize=std_normalize, center=center, **extra
    )
    oracle = oracles.LoopHierEBPO(decay, pooling=pooling, std_normalize=std_normalize, center=center)
    schedule = [
        TOPIC_VALUES[:1],
        TOPIC_VALUES[:2],
        TOPIC_VALUES[1:3],
        TOPIC_VALUES,
        [TOPIC_VALUES[3]],
        TOPIC_VALUES[:3],
    ]
    for step, topics in enumerate(schedule):
        rewards, group_ids, topic_ids = topic_batch(50 + step, topics, binary=step % 2 == 0)
        advantages, metrics = estimator(rewards, group_ids, topic_ids=topic_ids)
        expected, expected_metrics = oracle.step(rewards.tolist(), group_ids.tolist(), topic_ids.tolist())
        assert float((advantages - torch.tensor(expected, dtype=torch.float64)).abs().max()) <= 1e-9, step
        for key in ("omega2", "tau2_within", "sigma2_within", "mu_glob"):
            assert math.isclose(metrics[f"ebpo/{key}"], expected_metrics[key], rel_tol=1e-9, abs_tol=1e-12), (step, key)


@pytest.mark.parametrize("prior,decay,extra", PRIORS)
@pytest.mark.parametrize("pooling", ["partial", "none"])
def test_population_prior_per_topic_matches_loop_oracle(prior, decay, extra, pooling):
    """What ``--allocation eb`` starts a prompt from: its topic's (mu_k*, tau_k*^2) as the estimator shrinks
    toward it, after each step; a topic never seen gets the global (mu_glob, tau^2); evaluation moves nothing."""
    estimator = build_estimator("ebpo", prior=prior, hierarchical=True, pooling=pooling, **extra)
    oracle = oracles.LoopHierEBPO(decay, pooling=pooling)
    assert estimator.population_prior(torch.tensor(TOPIC_VALUES)) is None  # no statistics yet
    unseen = 12345
    for step, topics in enumerate([TOPIC_VALUES[:1], TOPIC_VALUES[1:3], TOPIC_VALUES, [TOPIC_VALUES[3]]]):
        rewards, group_ids, topic_ids = topic_batch(80 + step, topics)
        estimator(rewards, group_ids, topic_ids=topic_ids)
        oracle.step(rewards.tolist(), group_ids.tolist(), topic_ids.tolist())
        estimator(*topic_batch(90 + step, TOPIC_VALUES)[:2], training=False)  # evaluation: the prior stays
        query = [unseen, *reversed(TOPIC_VALUES), TOPIC_VALUES[0]]  # unsorted, repeated, one unknown
        mean, var = estimator.population_prior(torch.tensor(query))
        glob = (oracle.means_acc.mu, oracle.means_acc.var)
        expected = [(oracle.pooled[k][2], oracle.pooled[k][1]) if k in oracle.pooled else glob for k in query]
        scale = max(abs(x) for pair in expected for x in pair)
        got = torch.stack([mean, var], dim=1)
        assert float((got - torch.tensor(expected, dtype=torch.float64)).abs().max()) <= 1e-12 * scale, step
        assert estimator.population_prior() == pytest.approx(glob, rel=1e-12)  # no topics: the global prior


def test_population_prior_ignores_topics_without_a_hierarchical_prior():
    estimator = build_estimator("ebpo", prior="running")
    rewards, group_ids, topic_ids = topic_batch(3, TOPIC_VALUES)
    estimator(rewards, group_ids, topic_ids=topic_ids)
    assert estimator.population_prior(topic_ids) == estimator.population_prior()
    assert build_estimator("grpo").population_prior(topic_ids) is None  # no prior kept at all
    with pytest.raises(ValueError, match="topic_ids must be integers"):
        build_estimator("ebpo", hierarchical=True).estimator.population_prior(torch.tensor([0.5]))


def test_partial_pooling_differs_from_no_pooling_and_from_flat():
    rewards, group_ids, topic_ids = topic_batch(3, TOPIC_VALUES)
    runs = {
        name: build_estimator("ebpo", std_normalize=False, center=False, **opts)(
            rewards, group_ids, topic_ids=topic_ids
        )[0]
        for name, opts in {
            "flat": {},
            "none": {"hierarchical": True, "pooling": "none"},
            "partial": {"hierarchical": True},
        }.items()
    }
    assert not torch.allclose(runs["flat"], runs["partial"]) and not torch.allclose(runs["none"], runs["partial"])


@pytest.mark.parametrize("prior,decay,extra", PRIORS)
@pytest.mark.parametrize("pooling", ["partial", "none"])
def test_single_topic_or_no_topic_ids_is_flat_ebpo(prior, decay, extra, pooling):
    flat = build_estimator("ebpo", prior=prior, **extra)
    no_ids = build_estimator("ebpo", prior=prior, hierarchical=True, pooling=pooling, **extra)
    one_topic = build_estimator("ebpo", prior=prior, hierarchical=True, pooling=pooling, **extra)
    for step in range(5):
        rewards, group_ids, _ = topic_batch(80 + step, [0], binary=step != 2)
        expected, m_flat = flat(rewards, group_ids)
        got, m_none = no_ids(rewards, group_ids)
        got_one, m_one = one_topic(rewards, group_ids, topic_ids=torch.full_like(group_ids, 12345))
        for advantages, metrics in ((got, m_none), (got_one, m_one)):
            assert float((advantages - expected).abs().max()) <= 1e-12, step
            for key, value in m_flat.items():
                assert math.isclose(metrics[key], value, rel_tol=1e-12, abs_tol=1e-12), (step, key)
            assert metrics["ebpo/omega2"] <= 1e-24
            assert metrics["ebpo/topic_pooling"] == (1.0 if pooling == "partial" else 0.0)  # B_1 = 1: mu_1* = mu_glob


@pytest.mark.parametrize("prior,extra", [("running", {}), ("ema", {"decay": 0.8})])
def test_state_round_trip_with_topics_appearing_over_time(prior, extra, tmp_path):
    estimator = build_estimator("ebpo", prior=prior, hierarchical=True, **extra)
    for step, topics in enumerate([TOPIC_VALUES[:1], TOPIC_VALUES[:3]]):
        estimator(*topic_batch(step, topics)[:2], topic_ids=topic_batch(step, topics)[2])
    state = copy.deepcopy(estimator.state_dict())
    assert state["estimator_state"]["topic_group_stats"]["keys"].tolist() == sorted(TOPIC_VALUES[:3])
    torch.save(state, tmp_path / "state.pt")
    restored = build_estimator("ebpo", prior=prior, hierarchical=True, **extra)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for step, topics in enumerate([TOPIC_VALUES, TOPIC_VALUES[2:]], start=10):  # a new topic after the resume
        rewards, group_ids, topic_ids = topic_batch(step, topics)
        a, ma = estimator(rewards, group_ids, topic_ids=topic_ids)
        b, mb = restored(rewards, group_ids, topic_ids=topic_ids)
        assert torch.equal(a, b) and ma == mb
    assert estimator.state_dict()["estimator_state"]["topic_group_stats"]["keys"].tolist() == sorted(TOPIC_VALUES)


def test_batch_prior_keeps_no_topic_between_steps():
    estimator = build_estimator("ebpo", hierarchical=True)
    rewards, group_ids, topic_ids = topic_batch(0, TOPIC_VALUES)
    estimator(rewards, group_ids, topic_ids=topic_ids)
    first, _ = estimator(rewards, group_ids, topic_ids=topic_ids)
    fresh, _ = build_estimator("ebpo", hierarchical=True)(rewards, group_ids, topic_ids=topic_ids)
    assert torch.equal(first, fresh)


@pytest.mark.parametrize("anchor", ["soft", "hard"])
def test_composes_with_ha_dw(anchor):
    weighted = build_estimator(
        "ebpo",
        prior="running",
        hierarchical=True,
        weighting="ha_dw",
        weighting_options={"anchor": anchor, "k": 3, "m": 3},
    )
    plain = build_estimator("ebpo", prior="running", hierarchical=True)
    hadw = oracles.LoopHADW(anchor, lam=1.3, k=3, m=3)
    for step in range(4):
        rewards, group_ids, topic_ids = topic_batch(20 + step, TOPIC_VALUES[: 2 + step % 3])
        advantages, metrics = weighted(rewards, group_ids, topic_ids=topic_ids)
        base, _ = plain(rewards, group_ids, topic_ids=topic_ids)
        weights = hadw.step(base.tolist(), rewards.tolist(), group_ids.tolist())
        expected = torch.tensor([a * w for a, w in zip(base.tolist(), weights)], dtype=torch.float64)
        assert torch.allclose(advantages, expected, atol=1e-12, rtol=0)
        assert "ebpo/omega2" in metrics and "hadw/anchor" in metrics


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "ebpo", "ebpo-hier"])
def test_topic_ids_are_validated_for_every_estimator(name):
    base, _, hier = name.partition("-")
    estimator = build_estimator(base, **({"hierarchical": True} if hier else {}))
    rewards, ids = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([5, 5, 6, 6])
    with pytest.raises(ValueError, match="group 5 has responses with different topic ids"):
        estimator(rewards, ids, topic_ids=torch.tensor([0, 1, 2, 2]))
    with pytest.raises(ValueError, match="topic_ids must have shape"):
        estimator(rewards, ids, topic_ids=torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="topic_ids must be an integer tensor"):
        estimator(rewards, ids, topic_ids=torch.tensor([0.0, 0.0, 1.0, 1.0]))
    if not hier:  # estimators without a use for topic ids ignore them
        a, ma = estimator(rewards, ids, topic_ids=torch.tensor([3, 3, 4, 4]))
        b, mb = build_estimator(base)(rewards, ids)
        assert torch.equal(a, b) and ma == mb


def test_options_and_state_mismatch_are_refused():
    with pytest.raises(ValueError, match="only with hierarchical=True"):
        build_estimator("ebpo", pooling="none")
    with pytest.raises(ValueError, match="pooling must be one of"):
        build_estimator("ebpo", hierarchical=True, pooling="full")
    with pytest.raises(ValueError, match="topic_prior_groups"):
        build_estimator("ebpo", hierarchical=True, topic_prior_groups=-1)
    flat, hier = build_estimator("ebpo", prior="running"), build_estimator("ebpo", prior="running", hierarchical=True)
    flat(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="hierarchical"):
        hier.load_state_dict(flat.state_dict())
    with pytest.raises(ValueError, match="hierarchical"):
        build_estimator("ebpo", prior="running").load_state_dict(hier.state_dict())


def test_vectorised_path_has_no_python_loop_over_groups():
    """50k groups over a handful of topics: a Python loop over groups would take seconds, the scatter ops milliseconds."""
    import time

    gen = torch.Generator().manual_seed(0)
    groups, g = 50000, 4
    rewards = (torch.rand(groups * g, generator=gen) < 0.4).double()
    group_ids = torch.arange(groups).repeat_interleave(g)
    topic_ids = (torch.arange(groups) % 7).repeat_interleave(g)
    flat, hier = build_estimator("ebpo"), build_estimator("ebpo", hierarchical=True)
    flat(rewards, group_ids)
    hier(rewards, group_ids, topic_ids=topic_ids)  # warm up
    start = time.perf_counter()
    flat(rewards, group_ids)
    t_flat = time.perf_counter() - start
    start = time.perf_counter()
    hier(rewards, group_ids, topic_ids=topic_ids)
    t_hier = time.perf_counter() - start
    assert t_hier < 20 * t_flat + 0.5, (t_hier, t_flat)  # lenient: a shared, busy CI machine


def test_evaluation_does_not_move_the_per_topic_prior():
    estimator = build_estimator("ebpo", prior="running", hierarchical=True)
    estimator(*topic_batch(0, TOPIC_VALUES[:2])[:2], topic_ids=topic_batch(0, TOPIC_VALUES[:2])[2])
    before = copy.deepcopy(estimator.state_dict()["estimator_state"])
    rewards, group_ids, topic_ids = topic_batch(1, TOPIC_VALUES)  # two new topics
    eval_adv, eval_metrics = estimator(rewards, group_ids, topic_ids=topic_ids, training=False)
    after = estimator.state_dict()["estimator_state"]
    for name in ("topic_reward_stats", "topic_group_stats"):
        for key, value in before[name].items():
            assert torch.equal(after[name][key], value), (name, key)
    train_adv, train_metrics = estimator(rewards, group_ids, topic_ids=topic_ids)
    assert torch.equal(eval_adv, train_adv) and eval_metrics == train_metrics
    assert estimator.state_dict()["estimator_state"]["topic_group_stats"]["keys"].numel() == 4
