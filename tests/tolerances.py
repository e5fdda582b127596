"""Tolerances that follow the quantity, for comparing two float32 computations of the same maths.

Two float32 computations of one sum that add their terms in different orders
(another kernel, another library version, a prompt run once instead of G times)
agree to within a few units of float32 rounding *of the sum's scale*, not of
each result: an element that is the small difference of large terms can differ
by a large fraction of itself. So an element-wise ``rtol`` fails for a reason
that is not a bug, and a bare ``atol`` means nothing without the scale. These
helpers bound the difference by the tensor's own size instead:

* :func:`assert_close_norm`: ``||actual - expected||_2 <= rel * ||expected||_2``
  (gradients, parameter updates: the size that matters is the whole tensor's);
* :func:`assert_close_scale`: ``max|actual - expected| <= rel * max|expected|``
  (log-probs, entropies: every element matters, on the tensor's scale).

``rel`` is given in units of float32's machine epsilon (``ulps``) so the budget
reads as rounding steps; a real defect (a detached input, a dropped term, a
wrong slice) is orders of magnitude larger.
"""

from __future__ import annotations

import torch

F32_EPS = torch.finfo(torch.float32).eps  # 1.19e-7

# Budgets, measured with 10x or more to spare on the tiny model (the largest seen is in brackets): a detached
# prompt cache, a dropped term or a wrong slice is off by orders of magnitude more.
LOGPROB_ULPS = 64  # log-probs and entropies, of the tensor's largest magnitude [3.5]
GRADIENT_ULPS = 64  # gradients, of the tensor's norm [4]
UPDATE_ULPS = 1e4  # an optimiser step's change of a tensor, of its norm [781]: AdamW's first step is about
# lr * sign(gradient), so a gradient element at rounding level may flip its step


def _difference(actual: torch.Tensor, expected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    assert actual.shape == expected.shape, f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    return (actual.double() - expected.double()), expected.double()


def assert_close_norm(actual: torch.Tensor, expected: torch.Tensor, *, ulps: float, what: str = "") -> None:
    """``||actual - expected|| <= ulps * eps32 * ||expected||`` (and exact equality when expected is zero)."""
    diff, ref = _difference(actual, expected)
    bound = ulps * F32_EPS * float(ref.norm())
    error = float(diff.norm())
    assert error <= bound, (
        f"{what}: ||difference|| {error:.3e} > {bound:.3e} ({ulps} ulps of ||expected|| {float(ref.norm()):.3e};"
        f" relative {error / max(float(ref.norm()), 1e-300):.2e})"
    )


def assert_close_scale(actual: torch.Tensor, expected: torch.Tensor, *, ulps: float, what: str = "") -> None:
    """``max|actual - expected| <= ulps * eps32 * max|expected|`` (and exact equality when expected is zero)."""
    diff, ref = _difference(actual, expected)
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    bound = ulps * F32_EPS * scale
    error = float(diff.abs().max()) if diff.numel() else 0.0
    assert error <= bound, (
        f"{what}: max|difference| {error:.3e} > {bound:.3e} ({ulps} ulps of max|expected| {scale:.3e})"
    )
