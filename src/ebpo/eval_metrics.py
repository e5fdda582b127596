"""Evaluation statistics from k samples per problem (docs/methods.md#evaluation-metrics).

* ``avg@k``: Pass@1 estimated as the mean correctness over k samples per
  problem, as the papers report it (avg@32 for EBPO).
* ``pass@k``: the unbiased estimator of Chen et al. (2021, HumanEval),
  1 - C(n - c, k) / C(n, k) for n samples of which c are correct, computed as
  a numerically stable product.
* ``maj@k``: majority vote over the k extracted answers is correct.

All functions take a correctness matrix (problems, n) and are vectorised.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["avg_at_k", "pass_at_k", "maj_at_k"]


def _check(correct: Tensor) -> Tensor:
    if correct.dim() != 2 or correct.numel() == 0:
        raise ValueError(
            f"correctness must be a non-empty (problems, samples) matrix, got shape {tuple(correct.shape)}"
        )
    return correct.double()


def avg_at_k(correct: Tensor) -> float:
    """Mean correctness over every sample of every problem (Pass@1 as avg@k)."""
    return float(_check(correct).mean())


def pass_at_k(correct: Tensor, k: int) -> float:
    """Unbiased pass@k averaged over problems: mean_p [1 - C(n - c_p, k) / C(n, k)].

    C(n-c, k)/C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i), which avoids huge binomials.
    """
    c = _check(correct).sum(dim=1)  # (P,) correct samples per problem
    n = correct.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n = {n} samples per problem, got k = {k}")
    i = torch.arange(1, n + 1, dtype=torch.float64)  # (n,)
    factors = 1.0 - k / i  # (n,)
    use = i.unsqueeze(0) > (n - c).unsqueeze(1)  # (P, n): i in (n - c, n]
    fail_prob = torch.where(use, factors.unsqueeze(0), torch.ones_like(factors)).prod(dim=1)  # (P,)
    return float((1.0 - fail_prob).mean())


def maj_at_k(answers: Sequence[Sequence[str | None]], references_correct: Sequence[dict[str, bool]]) -> float:
    """Majority-vote accuracy.

    ``answers[p]`` are the extracted answers of problem p's samples (None when
    nothing was extracted: it never wins a vote); ``references_correct[p]``
    maps each distinct answer to whether it is correct. Ties go to the answer
    seen first.
    """
    if len(answers) != len(references_correct) or not answers:
        raise ValueError("maj@k needs one answer list and one correctness map per problem")
    hits = 0
    for votes, is_correct in zip(answers, references_correct):  # strings: a loop over problems, not over tensors
        counted = Counter(a for a in votes if a is not None)
        if counted:
            winner = max(counted, key=lambda a: (counted[a], -list(votes).index(a)))
            hits += bool(is_correct.get(winner, False))
    return hits / len(answers)
