"""Validated, grouped view of one batch of rewards (shared by every estimator).

Groups are identified by arbitrary integer ids, in any order, with any sizes;
``torch.unique(..., return_inverse=True)`` maps them to ``0..M-1`` and every
per-group statistic is a segment reduction (``index_add_``), so there is no
Python loop over samples or groups anywhere on this path.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["GroupedBatch", "as_reward_tensor", "stable_topic_ids", "EQUAL_ULPS"]

# Rewards of one group that differ by at most this many float64 units in the
# last place, measured at the batch's reward scale (max |r|), are equal:
# 0.1 + 0.2 and 0.3 are the same reward (issue 12 §2). Float64, not the
# caller's dtype: distinct half-precision rewards stay distinct (statistics
# are computed in float64, where only float64 rounding needs forgiving).
EQUAL_ULPS = 4.0


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


NO_TOPIC = -1  # the topic id of a prompt without a topic label


def stable_topic_ids(labels: Sequence[object]) -> Tensor:
    """Integer topic ids (N,) int64 for topic labels (strings, ints, ``None``).

    A label's id is a 62-bit BLAKE2b hash of its text, so it is the same in
    every process, on every rank and after a resume, with no mapping to
    checkpoint (Python's ``hash`` of a str is salted per process). ``None``
    (no topic) is :data:`NO_TOPIC`. Two labels colliding has probability
    about k^2 / 2^63 for k labels.

    >>> ids = stable_topic_ids(["algebra", None, "algebra"])
    >>> ids[0] == ids[2], int(ids[1])
    (tensor(True), -1)
    """
    out = []
    for label in labels:  # one hash per response; strings are not tensors
        if label is None:
            out.append(NO_TOPIC)
        else:
            digest = hashlib.blake2b(str(label).encode("utf-8"), digest_size=8).digest()
            out.append(int.from_bytes(digest, "little") >> 2)  # non-negative, distinct from NO_TOPIC
    return torch.tensor(out, dtype=torch.long)


def _as_correctness(correctness: Tensor | Sequence[float], rewards: Tensor) -> Tensor:
    """Validate the per-response correctness (N,) that travels with possibly shaped rewards."""
    correct = correctness if isinstance(correctness, Tensor) else torch.as_tensor(correctness)
    if correct.shape != rewards.shape:
        raise ValueError(f"correctness must have shape {tuple(rewards.shape)} like the rewards, got {tuple(correct.shape)}")
    if correct.is_complex():
        raise ValueError(f"correctness must be real, got dtype {correct.dtype}")
    correct = correct.to(device=rewards.device, dtype=torch.float64)
    finite = torch.isfinite(correct)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        kind = "NaN" if bool(torch.isnan(correct[bad])) else "infinite"
        raise ValueError(f"{kind} correctness at index {bad}")
    return correct


def _as_topic_ids(topic_ids: Tensor | Sequence[int], group_ids: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """Validate per-response topic ids (N,) and return each group's topic id (M,) int64.

    A topic labels a prompt, so every response of a group must carry the same
    topic id; anything else is a wiring bug and raises.
    """
    topics = topic_ids if isinstance(topic_ids, Tensor) else torch.as_tensor(topic_ids)
    if topics.shape != group_ids.shape:
        raise ValueError(f"topic_ids must have shape {tuple(group_ids.shape)} like group_ids, got {tuple(topics.shape)}")
    if topics.is_floating_point() or topics.is_complex() or topics.dtype == torch.bool:
        raise ValueError(f"topic_ids must be an integer tensor, got dtype {topics.dtype}")
    topics = topics.to(device=index.device, dtype=torch.long)
    low = torch.full((num_groups,), torch.iinfo(torch.long).max, dtype=torch.long, device=index.device)
    high = torch.full((num_groups,), torch.iinfo(torch.long).min, dtype=torch.long, device=index.device)
    low = low.scatter_reduce(0, index, topics, "amin")
    high = high.scatter_reduce(0, index, topics, "amax")
    mixed = high != low  # (M,)
    if bool(mixed.any()):
        group = int(group_ids[index == int(mixed.nonzero()[0, 0])][0])
        raise ValueError(
            f"group {group} has responses with different topic ids ({int(low[mixed][0])} and {int(high[mixed][0])}); "
            "a topic labels a prompt, so all responses of a group need the same topic id"
        )
    return low


@dataclass(frozen=True)
class GroupedBatch:
    """One batch of rewards grouped by prompt. All statistics are float64.

    Attributes:
        rewards: (N,) float64 rewards.
        index: (N,) int64 group index in ``[0, M)`` of each response.
        group_sizes: (M,) float64 G_m, responses per group.
        group_means: (M,) float64 mu_m, mean reward per group; exactly the
            common value for a group whose rewards are all equal.
        dtype: dtype of the caller's rewards; advantages are returned in it.
        all_equal: (M,) bool, groups whose rewards are all equal (to
            :data:`EQUAL_ULPS` float64 ulps at the batch's reward scale).
        centred: (N,) float64 r - mu_m; exactly 0 in all-equal groups, so the
            group-relative estimators give them exactly zero advantage.
        correctness: (N,) float64 the verifier's correctness of each
            response; the rewards themselves unless the caller passed it
            (they differ when rewards are shaped, e.g. DAPO's overlong penalty).
        group_correctness: (M,) float64 mean correctness per group.
        group_topics: (M,) int64 the caller's topic id of each group (all 0
            when no topic ids were given).
    """

    rewards: Tensor
    index: Tensor
    group_sizes: Tensor
    group_means: Tensor
    dtype: torch.dtype
    all_equal: Tensor
    centred: Tensor
    correctness: Tensor
    group_correctness: Tensor
    group_topics: Tensor

    @classmethod
    def from_inputs(
        cls,
        rewards: Tensor | Sequence[float],
        group_ids: Tensor | Sequence[int],
        *,
        topic_ids: Tensor | Sequence[int] | None = None,
        correctness: Tensor | Sequence[float] | None = None,
    ) -> "GroupedBatch":
        """Validate and group; every check runs here, before any estimator sees (or stores) the batch."""
        rewards_t, group_ids_t = as_reward_tensor(rewards, group_ids)
        _, index = torch.unique(group_ids_t, sorted=True, return_inverse=True)  # (N,)
        r64 = rewards_t.to(torch.float64)
        num_groups = int(index.max()) + 1
        correct = r64 if correctness is None else _as_correctness(correctness, r64)
        topics = (
            torch.zeros(num_groups, dtype=torch.long, device=r64.device)
            if topic_ids is None
            else _as_topic_ids(topic_ids, group_ids_t, index, num_groups)
        )  # (M,)

        def segment_sum(values: Tensor) -> Tensor:
            return torch.zeros(num_groups, dtype=torch.float64, device=r64.device).index_add_(0, index, values)

        sizes = segment_sum(torch.ones_like(r64))  # (M,)
        low = torch.full((num_groups,), math.inf, dtype=torch.float64, device=r64.device).scatter_reduce(0, index, r64, "amin")
        high = torch.full((num_groups,), -math.inf, dtype=torch.float64, device=r64.device).scatter_reduce(0, index, r64, "amax")
        # sum / G of G equal values can miss the value by an ulp ([0.1] * 3 -> 0.10000000000000002), which
        # GRPO's 1 / (std + eps) turns into a spurious 1e-11 advantage: use the value itself.
        scale = float(r64.abs().max())
        all_equal = (high - low) <= EQUAL_ULPS * torch.finfo(torch.float64).eps * scale  # (M,)
        means = torch.where(all_equal, low, segment_sum(r64) / sizes)  # (M,)
        centred = torch.where(all_equal[index], torch.zeros_like(r64), r64 - means[index])  # (N,)
        group_correctness = means if correctness is None else segment_sum(correct) / sizes
        return cls(
            rewards=r64, index=index, group_sizes=sizes, group_means=means, dtype=rewards_t.dtype,
            all_equal=all_equal, centred=centred, correctness=correct, group_correctness=group_correctness,
            group_topics=topics,
        )  # fmt: skip

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
        sq = self.group_sum(self.centred * self.centred)
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
