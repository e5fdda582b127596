"""Validated, grouped view of one batch of rewards (shared by every estimator).

Groups are identified by arbitrary integer ids, in any order, with any sizes;
``torch.unique(..., return_inverse=True)`` maps them to ``0..M-1`` and every
per-group statistic is a segment reduction (``index_add_``), so there is no
Python loop over samples or groups anywhere on this path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["GroupedBatch", "as_reward_tensor"]


def as_reward_tensor(rewards: Tensor | Sequence[float], group_ids: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
    """Validate and convert ``rewards`` (N,) and ``group_ids`` (N,).

    Raises ``ValueError`` naming the problem: empty input, wrong rank,
    mismatched shapes, non-integer group ids, NaN or infinite rewards.
    """
    rewards_t = rewards if isinstance(rewards, Tensor) else torch.as_tensor(rewards)
    group_ids_t = group_ids if isinstance(group_ids, Tensor) else torch.as_tensor(group_ids)
    if rewards_t.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor (N,), got shape {tuple(rewards_t.shape)}")
    if group_ids_t.dim() != 1:
        raise ValueError(f"group_ids must be a 1-D tensor (N,), got shape {tuple(group_ids_t.shape)}")
    if rewards_t.numel() == 0:
        raise ValueError("empty batch: rewards has no elements")
    if rewards_t.shape != group_ids_t.shape:
        raise ValueError(
            f"mismatched group ids: rewards has shape {tuple(rewards_t.shape)} "
            f"but group_ids has shape {tuple(group_ids_t.shape)}"
        )
    if group_ids_t.is_floating_point() or group_ids_t.is_complex() or group_ids_t.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids_t.dtype}")
    if rewards_t.is_complex():
        raise ValueError(f"rewards must be real, got dtype {rewards_t.dtype}")
    if not rewards_t.is_floating_point():
        rewards_t = rewards_t.to(torch.get_default_dtype())
    finite = torch.isfinite(rewards_t)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        kind = "NaN" if bool(torch.isnan(rewards_t[bad])) else "infinite"
        count = int((~finite).sum())
        raise ValueError(f"{kind} reward at index {bad} ({count} non-finite reward(s) in the batch)")
    return rewards_t, group_ids_t.to(torch.long)


@dataclass(frozen=True)
class GroupedBatch:
    """One batch of rewards grouped by prompt. All statistics are float64.

    Attributes:
        rewards: (N,) float64 rewards.
        index: (N,) int64 group index in ``[0, M)`` of each response.
        group_sizes: (M,) float64 G_m, responses per group.
        group_means: (M,) float64 mu_m, mean reward per group.
        dtype: dtype of the caller's rewards; advantages are returned in it.
    """

    rewards: Tensor
    index: Tensor
    group_sizes: Tensor
    group_means: Tensor
    dtype: torch.dtype

    @classmethod
    def from_inputs(cls, rewards: Tensor | Sequence[float], group_ids: Tensor | Sequence[int]) -> "GroupedBatch":
        rewards_t, group_ids_t = as_reward_tensor(rewards, group_ids)
        _, index = torch.unique(group_ids_t, sorted=True, return_inverse=True)  # (N,)
        r64 = rewards_t.to(torch.float64)
        num_groups = int(index.max()) + 1
        sizes = torch.zeros(num_groups, dtype=torch.float64, device=r64.device).index_add_(
            0, index, torch.ones_like(r64)
        )  # (M,)
        sums = torch.zeros(num_groups, dtype=torch.float64, device=r64.device).index_add_(0, index, r64)
        return cls(rewards=r64, index=index, group_sizes=sizes, group_means=sums / sizes, dtype=rewards_t.dtype)

    @property
    def num_responses(self) -> int:
        return int(self.rewards.numel())

    @property
    def num_groups(self) -> int:
        return int(self.group_sizes.numel())

    def group_sum(self, values: Tensor) -> Tensor:
        """Segment sum of per-response ``values`` (N,) -> (M,)."""
        out = torch.zeros(self.num_groups, dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.index, values)

    def broadcast(self, group_values: Tensor) -> Tensor:
        """Per-group ``group_values`` (M,) -> per-response (N,)."""
        return group_values[self.index]

    def group_var(self, *, unbiased: bool) -> Tensor:
        """Per-group variance of the rewards (M,); two-pass for accuracy.

        With ``unbiased=True`` the divisor is G_m - 1 (callers ensure G_m >= 2).
        """
        centred = self.rewards - self.broadcast(self.group_means)
        sq = self.group_sum(centred * centred)
        divisor = self.group_sizes - 1.0 if unbiased else self.group_sizes
        return sq / divisor

    def require_min_group_size(self, min_size: int, estimator: str) -> None:
        if min_size <= 1:
            return
        smallest = int(self.group_sizes.min())
        if smallest < min_size:
            raise ValueError(
                f"{estimator} is group-relative and needs at least {min_size} responses per prompt, "
                f"but a group has G = {smallest}; sample more responses per prompt (group size >= {min_size}) "
                "or use the 'ebpo' estimator, whose prior gives single responses a baseline"
            )
