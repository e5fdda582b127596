"""avg@k, unbiased pass@k and maj@k against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from ebpo.eval_metrics import avg_at_k, maj_at_k, pass_at_k


def comb_pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - (math.comb(n - c, k) / math.comb(n, k) if n - c >= k else 0.0)


def test_pass_at_k_constructed_example():
    # problem 0: 2 of 5 correct; problem 1: none; problem 2: all five
    correct = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert pass_at_k(correct, 1) == pytest.approx((0.4 + 0 + 1) / 3)
    assert pass_at_k(correct, 2) == pytest.approx((1 - 3 / 10 + 0 + 1) / 3)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(correct, 4) == pytest.approx((1.0 + 0 + 1) / 3)  # n - c = 3 < 4: always a hit
    assert avg_at_k(correct) == pytest.approx(7 / 15)


@pytest.mark.parametrize("seed", range(5))
def test_pass_at_k_matches_binomial_closed_form(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 32
    correct = (torch.rand(20, n, generator=gen) < torch.rand(20, 1, generator=gen)).int()
    for k in (1, 2, 5, 16, 32):
        expected = sum(comb_pass_at_k(n, int(c), k) for c in correct.sum(1)) / 20
        assert pass_at_k(correct, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(correct, 1) == pytest.approx(avg_at_k(correct), abs=1e-12)  # pass@1 is avg@n


def test_maj_at_k():
    answers = [["4", "5", "4", None], [None, None], ["7", "8"]]
    correct = [{"4": True, "5": False}, {}, {"7": False, "8": True}]
    assert maj_at_k(answers, correct) == pytest.approx(0.0 + 1 / 3)  # tie 7/8 goes to the first seen (7): wrong


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(torch.ones(2, 3), 4)
    with pytest.raises(ValueError, match="matrix"):
        avg_at_k(torch.ones(3))
