"""Estimators composed with reward shaping, a weighting, and failures (a rejected batch leaves no trace).

* HA-DW reads correctness, not the shaped reward (DAPO overlong shaping makes wrong answers negative).
* All-equal groups of non-binary rewards are all-equal (metrics and exact zero advantages).
* A rejected batch leaves every estimator's and weighting's state exactly as it was.
* Advantages that do not fit the caller's dtype are rejected, never returned as inf.
"""

from __future__ import annotations

import copy

import oracles
import pytest
import torch

from ebpo import build_estimator

IDS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
CORRECT = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
OVERLONG = torch.tensor([0.0, -1.0, -0.5, 0.0, 0.0, 0.0, -0.25, -1.0, 0.0, 0.0, 0.0, -0.75], dtype=torch.float64)


# ---------------------------------------------------------------- A1: HA-DW on correctness


@pytest.mark.parametrize("anchor", ["soft", "hard"])
@pytest.mark.parametrize("base", ["grpo", "ebpo"])
def test_ha_dw_weights_by_correctness_when_rewards_are_shaped(anchor, base):
    shaped = CORRECT + OVERLONG  # wrong answers go negative, as DAPO's overlong shaping does
    weighted = build_estimator(base, weighting="ha_dw", weighting_options={"anchor": anchor, "k": 3, "m": 4})
    plain = build_estimator(base)
    oracle = oracles.LoopHADW(anchor, lam=1.3, k=3, m=4)
    for _ in range(3):
        advantages, metrics = weighted(shaped, IDS, correctness=CORRECT)
        base_advantages, _ = plain(shaped, IDS)  # the estimator itself sees the shaped reward
        weights = oracle.step(
            base_advantages.tolist(), CORRECT.tolist(), IDS.tolist()
        )  # accuracy and mu_q: correctness
        expected = torch.tensor([a * w for a, w in zip(base_advantages.tolist(), weights)], dtype=torch.float64)
        assert torch.allclose(advantages, expected, atol=1e-12, rtol=0)
        assert metrics["hadw/batch_accuracy"] == pytest.approx(float(CORRECT.mean()), abs=1e-15)


def test_correctness_defaults_to_the_reward_and_is_validated():
    est = build_estimator("grpo", weighting="ha_dw")
    a, ma = build_estimator("grpo", weighting="ha_dw")(CORRECT, IDS)
    b, mb = est(CORRECT, IDS, correctness=CORRECT)
    assert torch.equal(a, b) and ma == mb
    with pytest.raises(ValueError, match=r"needs rewards in \[0, 1\]"):  # shaped reward, no correctness: still refused
        build_estimator("grpo", weighting="ha_dw")(CORRECT + OVERLONG, IDS)
    with pytest.raises(ValueError, match=r"correctness in \[0, 1\]"):
        est(CORRECT, IDS, correctness=CORRECT + OVERLONG)
    with pytest.raises(ValueError, match="correctness must have shape"):
        est(CORRECT, IDS, correctness=CORRECT[:-1])
    with pytest.raises(ValueError, match="NaN correctness"):
        est(CORRECT, IDS, correctness=torch.where(IDS == 2, float("nan"), CORRECT))


# ---------------------------------------------------------------- A3: all-equal groups of any reward value


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("value", [0.1, 0.7, 1e-3, 123.456])
def test_all_equal_non_binary_group_has_exactly_zero_advantage(name, value):
    rewards = torch.tensor([value] * 3 + [0.0, 1.0, 0.5], dtype=torch.float64)
    ids = torch.tensor([4, 4, 4, 8, 8, 8])
    advantages, metrics = build_estimator(name)(rewards, ids)
    assert advantages[:3].tolist() == [0.0, 0.0, 0.0]
    assert metrics["adv/all_equal_group_frac"] == 0.5
    assert metrics["adv/zero_signal_frac"] == pytest.approx(
        4 / 6 if name != "rloo" else 4 / 6
    )  # 0.5 is the mean of group 8


def test_all_equal_metric_uses_a_tolerance_relative_to_the_reward_scale():
    # 0.1 + 0.2 and 0.3 differ by one ulp: the same reward for every purpose; 1000 * that is not rounding.
    rewards = torch.tensor([0.1 + 0.2, 0.3, 0.3, 0.0, 1.0, 0.0], dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    _, metrics = build_estimator("grpo")(rewards, ids)
    assert metrics["adv/all_equal_group_frac"] == 0.5
    scaled = torch.tensor([1e6 * (0.1 + 0.2), 1e6 * 0.3, 1e6 * 0.3, 0.0, 1e6, 0.0], dtype=torch.float64)
    _, metrics = build_estimator("grpo")(scaled, ids)
    assert metrics["adv/all_equal_group_frac"] == 0.5
    distinct = torch.tensor([0.3, 0.3 + 1e-9, 0.3, 0.0, 1.0, 0.0], dtype=torch.float64)
    _, metrics = build_estimator("grpo")(distinct, ids)
    assert metrics["adv/all_equal_group_frac"] == 0.0


# ---------------------------------------------------------------- B: transactional state

STATEFUL = [
    ("ebpo", {"prior": "running"}),
    ("ebpo", {"prior": "ema", "decay": 0.8}),
    ("ebpo", {"prior": "batch"}),
    ("ebpo", {"prior": "running", "std_normalize": False, "center": False}),
    ("grpo", {"weighting": "ha_dw"}),
    ("grpo", {"weighting": "ha_dw", "weighting_options": {"anchor": "hard", "k": 3}}),
    ("ebpo", {"prior": "running", "weighting": "ha_dw"}),
    ("ebpo", {"prior": "ema", "weighting": "ha_dw", "weighting_options": {"anchor": "hard"}}),
    ("ebpo", {"prior": "running", "hierarchical": True}),
    ("ebpo", {"prior": "ema", "hierarchical": True, "weighting": "ha_dw"}),
]


def same_state(a, b) -> bool:
    """Bit-identical nested state (tensors by torch.equal and dtype, floats by ==)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


def _good(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return (torch.rand(16, generator=gen, dtype=torch.float64) < 0.5).double(), torch.arange(16) // 4


# r - mu_q = 65504 + 32752 for the first response: beyond float16's largest finite value (65504)
FP16_EXTREME = torch.tensor([65504.0, -65504.0, -65504.0, -65504.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float16)
FP16_IDS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def _bad_batches(name: str, options: dict) -> list[tuple[str, tuple, dict]]:
    bad = [
        ("nan", (torch.tensor([1.0, float("nan"), 0.0, 1.0]), torch.tensor([0, 0, 1, 1])), {}),
        (
            "topic",
            (torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 1, 1])),
            {"topic_ids": torch.tensor([0, 1, 2, 2])},
        ),
    ]
    if options.get("std_normalize") is False:  # standardised advantages always fit; raw ones may not
        bad.append(("fp16 overflow", (FP16_EXTREME, FP16_IDS), {}))
    if options.get("weighting") == "ha_dw":
        # new topics in a rejected batch must not enter a hierarchical prior's state either
        bad.append(
            (
                "ha_dw range",
                (torch.tensor([2.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 1, 1])),
                {"topic_ids": torch.tensor([5, 5, 6, 6])},
            )
        )
    if name == "ebpo":
        bad.append(
            ("overflow", (torch.tensor([1e200, -1e200, 0.0, 1.0], dtype=torch.float64), torch.tensor([0, 0, 1, 1])), {})
        )
    return bad


@pytest.mark.parametrize("name,options", STATEFUL)
def test_rejected_batch_leaves_state_untouched(name, options):
    for label, args, kwargs in _bad_batches(name, options):
        estimator, twin = build_estimator(name, **options), build_estimator(name, **options)
        for step in range(3):
            estimator(*_good(step))
            twin(*_good(step))
        before = copy.deepcopy(estimator.state_dict())
        with pytest.raises(ValueError):
            estimator(*args, **kwargs)
        assert same_state(estimator.state_dict(), before), label  # bit-identical
        a, ma = estimator(*_good(10))
        b, mb = twin(*_good(10))  # never saw the bad call
        assert torch.equal(a, b) and ma == mb, label
        assert same_state(estimator.state_dict(), twin.state_dict()), label


@pytest.mark.parametrize("name", ["rloo", "dr_grpo", "ebpo"])
def test_advantages_that_overflow_the_reward_dtype_are_rejected(name):
    options = {"std_normalize": False, "center": False} if name == "ebpo" else {}
    with pytest.raises(ValueError, match="float16"):
        build_estimator(name, **options)(FP16_EXTREME, FP16_IDS)
    # the same rewards in float32 are fine, and fp16 rewards whose advantages fit are returned in fp16
    advantages, _ = build_estimator(name, **options)(FP16_EXTREME.float(), FP16_IDS)
    assert bool(torch.isfinite(advantages).all()) and advantages.dtype == torch.float32
    small, _ = build_estimator(name, **options)(
        torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float16), torch.tensor([0, 0, 1, 1])
    )
    assert small.dtype == torch.float16


def test_distinct_half_precision_rewards_are_not_merged():
    """Adjacent bfloat16 rewards (0.5 and 0.50390625) are different rewards, not rounding noise."""
    rewards = torch.tensor([0.5, 0.50390625, 0.0, 1.0], dtype=torch.bfloat16)
    advantages, metrics = build_estimator("dr_grpo")(rewards, torch.tensor([0, 0, 1, 1]))
    assert metrics["adv/all_equal_group_frac"] == 0.0
    assert float(advantages[1]) > 0.0
