"""The contiguous-groups fast path of Grouping against the general path, for every estimator.

The same contiguous responses (group ids constant over consecutive blocks of
G: the (M, G) view path) go through the fast path and, with block detection
switched off, through the general path; advantages and every metric must
agree to 1e-12 in float64 and to 1e-6 in float32 (the float64 computation
rounded once). The same responses in a random order (the general path as
users hit it) must give the same advantages too. The general path is checked against the loop oracles in
test_estimators.py / test_hierarchical.py; a test here checks the
fast path against them too.
"""

from __future__ import annotations

import math

import oracles
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ebpo.grouping as grouping_module
from ebpo import build_estimator
from ebpo.grouping import GroupedBatch, Grouping

# label -> (estimator name, options); every estimator and option the pipeline offers
CASES = {
    "grpo": ("grpo", {}),
    "grpo-biased": ("grpo", {"unbiased_std": False}),
    "grpo-batch": ("grpo", {"scale": "batch"}),
    "grpo-none": ("grpo", {"scale": "none"}),
    "dr_grpo": ("dr_grpo", {}),
    "rloo": ("rloo", {}),
    "ebpo-batch": ("ebpo", {}),
    "ebpo-running": ("ebpo", {"prior": "running"}),
    "ebpo-ema": ("ebpo", {"prior": "ema", "decay": 0.7}),
    "ebpo-raw": ("ebpo", {"std_normalize": False, "center": False}),
    "ebpo-hier": ("ebpo", {"hierarchical": True}),
    "ebpo-hier-running-none": ("ebpo", {"hierarchical": True, "prior": "running", "pooling": "none"}),
    "ebpo+ha_dw": ("ebpo", {"weighting": "ha_dw"}),
    "ebpo-running+ha_dw-hard": (
        "ebpo",
        {"prior": "running", "weighting": "ha_dw", "weighting_options": {"anchor": "hard"}},
    ),
    "grpo+ha_dw": ("grpo", {"weighting": "ha_dw"}),
    "rloo+ha_dw": ("rloo", {"weighting": "ha_dw"}),
}
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}


def contiguous_batch(seed: int, num_groups: int, g: int, dtype: torch.dtype, kind: str = "binary", first_id: int = 0):
    """Contiguous rewards, ids, topic ids and correctness (N,), and a permutation that shuffles them."""
    gen = torch.Generator().manual_seed(seed)
    n = num_groups * g
    p = torch.rand(num_groups, generator=gen, dtype=torch.float64).repeat_interleave(g)
    binary = (torch.rand(n, generator=gen, dtype=torch.float64) < p).double()
    if kind == "binary":
        rewards = binary
    else:  # shaped rewards: correctness plus a small penalty, so they are not in {0, 1}
        rewards = binary - 0.1 * torch.rand(n, generator=gen, dtype=torch.float64)
    rewards[: 2 * g] = 0.3  # two all-equal groups with a non-representable value (the ulp tolerance)
    group_ids = (first_id + 3 * torch.arange(num_groups)).repeat_interleave(g)  # increasing, not 0..M-1
    topic_ids = torch.randint(0, 4, (num_groups,), generator=gen).repeat_interleave(g) * 1000 - 7
    perm = torch.randperm(n, generator=gen)
    return rewards.to(dtype), group_ids, topic_ids, binary, perm


def run_both(label: str, batch, steps: int = 2, use_correctness: bool = False, general: str = "forced"):
    """(fast path results, general path results), each a list over steps of (advantages, metrics).

    ``general="forced"``: the same contiguous input with block detection
    switched off, so only the grouping differs. ``general="shuffled"``: the
    responses in a random order (real general-path input), results put back
    in the contiguous order.
    """
    name, options = CASES[label]
    rewards, group_ids, topic_ids, binary, perm = batch
    identity = torch.arange(rewards.numel())
    out = {}
    for path, order in (("fast", identity), ("general", perm if general == "shuffled" else identity)):
        estimator = build_estimator(name, **options)
        steps_out = []
        with pytest.MonkeyPatch.context() as patch:
            if path == "general" and general == "forced":
                patch.setattr(grouping_module, "_block_candidate", lambda ids: (None, False))
            for step in range(steps):
                shift = 0.05 * step  # a different batch per step moves running priors and the HA-DW anchor
                r = rewards if step == 0 or use_correctness else (rewards * (1 - shift)).to(rewards.dtype)
                extra = {"correctness": binary[order]} if use_correctness else {}
                batch_used = GroupedBatch.from_inputs(r[order], group_ids[order])
                assert (batch_used.grouping.block is not None) == (path == "fast")
                advantages, metrics = estimator(r[order], group_ids[order], topic_ids=topic_ids[order], **extra)
                steps_out.append((torch.empty_like(advantages).index_copy_(0, order, advantages), metrics))
        out[path] = steps_out
    return out["fast"], out["general"]


def assert_same(fast, general, dtype: torch.dtype, metric_keys_to_skip: tuple[str, ...] = ()) -> None:
    tol = TOLERANCE[dtype]
    for (adv_f, met_f), (adv_g, met_g) in zip(fast, general):
        assert adv_f.dtype == adv_g.dtype == dtype
        assert float((adv_f.double() - adv_g.double()).abs().max()) <= tol
        assert met_f.keys() == met_g.keys()
        for key in met_f:
            if not key.startswith(metric_keys_to_skip):
                assert math.isclose(met_f[key], met_g[key], rel_tol=1e-12, abs_tol=1e-12), (key, met_f[key], met_g[key])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("label", list(CASES))
def test_fast_path_equals_general_path(label, dtype):
    batch = contiguous_batch(seed=len(label), num_groups=40, g=4, dtype=dtype)
    fast, general = run_both(label, batch)
    assert_same(fast, general, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("label", list(CASES))
def test_fast_path_equals_general_path_on_shuffled_input(label, dtype):
    """Real shuffled ids (the general path as users hit it). Shuffling reorders the float64 sums over
    responses, and HA-DW's weight of an advantage that is rounding noise (+-1e-17) depends on its sign,
    so the HA-DW weight statistics are compared only in the same-order test above."""
    batch = contiguous_batch(seed=len(label), num_groups=40, g=4, dtype=dtype)
    fast, general = run_both(label, batch, general="shuffled")
    assert_same(fast, general, dtype, metric_keys_to_skip=("hadw/weight",))


@pytest.mark.parametrize("label", ["ebpo+ha_dw", "grpo+ha_dw", "ebpo-hier"])
def test_fast_path_equals_general_path_with_shaped_rewards_and_correctness(label):
    batch = contiguous_batch(seed=5, num_groups=30, g=6, dtype=torch.float64, kind="shaped", first_id=-50)
    fast, general = run_both(label, batch, use_correctness=True)
    assert_same(fast, general, torch.float64)


def test_layout_detection():
    """Blocks of G with distinct ids take the (M, G) path; anything else the general one, with the same groups."""
    block = lambda ids: Grouping.from_ids(torch.tensor(ids)).block  # noqa: E731
    assert block([0, 0, 0, 0, 1, 1, 1, 1]) == 4
    assert block([9, 9, 2, 2, 5, 5]) == 2  # blocks in any order
    assert block([3, 4, 5]) == 1  # singletons
    assert block([7] * 5000) == 5000  # one group longer than the first prefix checked
    assert block([7] * 100 + [8] * 100) == 100
    assert block([0, 0, 1, 1, 0, 0]) is None  # group 0 appears in two blocks: one group of 4
    assert block([0, 0, 1, 1, 1, 2]) is None  # unequal sizes
    assert block([0, 0, 0, 1, 1, 2]) is None  # N divisible by the first run, the rest not blocks
    assert block([0, 1, 0, 1]) is None  # interleaved
    for ids in ([0, 0, 1, 1, 0, 0], [5, 2, 5, 2], [2**60, 3, 2**60, 3, -(2**62)]):  # dense table and sort fallbacks
        grouping = Grouping.from_ids(torch.tensor(ids))
        expected = torch.unique(torch.tensor(ids), sorted=True, return_inverse=True)[1]
        assert torch.equal(grouping.index, expected)


def test_fast_path_is_taken_and_its_index_matches_the_ids():
    rewards, group_ids, _, _, perm = contiguous_batch(seed=1, num_groups=10, g=3, dtype=torch.float64)
    fast = GroupedBatch.from_inputs(rewards, group_ids)
    general = GroupedBatch.from_inputs(rewards[perm], group_ids[perm])
    assert fast.grouping.block == 3 and general.grouping.block is None
    assert torch.equal(fast.index, torch.unique(group_ids, return_inverse=True)[1])


@pytest.mark.parametrize("label", ["grpo", "rloo", "ebpo-running", "ebpo+ha_dw", "ebpo-hier"])
def test_fast_path_matches_loop_oracles(label):
    """The contiguous path against the independent loop references (not only against the general path)."""
    rewards, group_ids, topic_ids, _, _ = contiguous_batch(seed=11, num_groups=25, g=4, dtype=torch.float64)
    name, options = CASES[label]
    estimator = build_estimator(name, **options)
    oracle = {
        "grpo": lambda r, g, t: oracles.grpo(r, g),
        "rloo": lambda r, g, t: oracles.rloo(r, g),
        "ebpo-running": oracles.LoopEBPO(decay=1.0).step,
        "ebpo+ha_dw": None,
        "ebpo-hier": oracles.LoopHierEBPO(decay=0.0).step,
    }[label]
    loop_ebpo, loop_hadw = oracles.LoopEBPO(decay=0.0), oracles.LoopHADW("soft", lam=1.3)
    for step in range(2):
        r = rewards * (1 - 0.1 * step)
        advantages, _ = estimator(r, group_ids, topic_ids=topic_ids)
        assert estimator.min_group_size >= 1 and GroupedBatch.from_inputs(r, group_ids).grouping.block == 4
        r_list, g_list, t_list = r.tolist(), group_ids.tolist(), topic_ids.tolist()
        if label == "ebpo+ha_dw":
            base = loop_ebpo.step(r_list, g_list)[0]
            weights = loop_hadw.step(base, r_list, g_list)
            expected = [a * w for a, w in zip(base, weights)]
        elif label == "ebpo-running":
            expected = oracle(r_list, g_list)[0]
        elif label == "ebpo-hier":
            expected = oracle(r_list, g_list, t_list)[0]
        else:
            expected = oracle(r_list, g_list, t_list)
        assert float((advantages - torch.tensor(expected, dtype=torch.float64)).abs().max()) < 1e-9


@pytest.mark.parametrize(
    "rewards, message",
    [
        ([1.0, float("nan"), 0.0, 1.0], "NaN reward at index 1"),
        ([1.0, 0.0, float("-inf"), 1.0], "infinite reward at index 2"),
    ],
)
def test_fused_finite_check_still_names_the_bad_reward(rewards, message):
    with pytest.raises(ValueError, match=message):
        build_estimator("grpo")(torch.tensor(rewards), torch.tensor([0, 0, 1, 1]))


def test_finite_rewards_whose_sum_overflows_are_accepted():
    """The fused check (a float64 sum) overflows for finite rewards near the float64 limit: it must look closer."""
    rewards = torch.tensor([1e308, 1e308, 0.0, 1e308], dtype=torch.float64)
    advantages, _ = build_estimator("dr_grpo")(rewards, torch.tensor([0, 0, 1, 1]))
    assert advantages.tolist() == [0.0, 0.0, -5e307, 5e307]


@settings(max_examples=60, deadline=None)
@given(
    num_groups=st.integers(1, 12),
    g=st.integers(1, 6),
    first_id=st.integers(-(2**40), 2**40),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    label=st.sampled_from(list(CASES)),
)
def test_fast_path_equals_general_path_random_shapes(num_groups, g, first_id, seed, dtype, label):
    name, options = CASES[label]
    min_size = build_estimator(name, **options).min_group_size
    if g < min_size or (num_groups * g < 2 and name == "ebpo"):
        return  # rejected on both paths (tested in test_estimators.py)
    shaped = seed % 2 and "ha_dw" not in label  # HA-DW needs rewards in [0, 1]
    batch = contiguous_batch(seed, num_groups, g, dtype, kind="shaped" if shaped else "binary", first_id=first_id)
    fast, general = run_both(label, batch)
    assert_same(fast, general, dtype)


def test_strided_inputs_take_the_fast_path_too():
    """Rewards, correctness and topic ids may be strided views (every other element of a buffer)."""
    rewards, group_ids, topic_ids, binary, _ = contiguous_batch(seed=3, num_groups=8, g=4, dtype=torch.float64)
    strided = lambda t: torch.stack([t, t]).t().reshape(-1)[::2]  # noqa: E731  same values, stride 2
    assert not strided(rewards).is_contiguous() and torch.equal(strided(rewards), rewards)
    estimator = build_estimator("ebpo", hierarchical=True, weighting="ha_dw")
    expected, _ = build_estimator("ebpo", hierarchical=True, weighting="ha_dw")(
        rewards, group_ids, topic_ids=topic_ids, correctness=binary
    )
    advantages, _ = estimator(
        strided(rewards), strided(group_ids), topic_ids=strided(topic_ids), correctness=strided(binary)
    )
    assert torch.equal(advantages, expected)


@pytest.mark.parametrize("g", [2, 4, 8])
@pytest.mark.parametrize("label", list(CASES))
def test_fast_path_is_bit_identical_for_small_groups(label, g):
    """G <= 8: block sums add the columns in index_add_'s order, so every advantage and metric is the same float."""
    for dtype in (torch.float64, torch.float32):
        fast, general = run_both(label, contiguous_batch(seed=g, num_groups=30, g=g, dtype=dtype))
        for (adv_f, met_f), (adv_g, met_g) in zip(fast, general):
            assert torch.equal(adv_f, adv_g)
            assert met_f == met_g
