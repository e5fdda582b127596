"""Validated, grouped view of one batch of rewards (shared by every estimator).

Groups are identified by arbitrary integer ids, in any order, with any sizes.
:class:`Grouping` maps them to ``0..M-1`` and owns every segment reduction
(sum, min, max per group) and the broadcast of per-group values back to the
responses; estimators only ever call those, so there is no Python loop over
samples or groups and one code path for every layout.

Two layouts behind that one interface:

* contiguous equal-size blocks (ids constant over consecutive blocks of G,
  distinct between blocks: what the trainer, TRL and verl produce). Detected
  by an O(N) vectorised check (no sort); reductions are ``(M, G)`` views,
  broadcasts a strided expand. Group m is block m.
* anything else (shuffled ids, unequal sizes): ids are mapped to their rank
  among the distinct ids (a dense lookup table when the id range is at most
  a few times N, ``torch.unique`` otherwise), reductions are ``index_add_``
  / ``index_reduce_``. Group m is the m-th smallest id.

Both give the same statistics up to float64 summation order (1e-12 relative;
tests/test_fastpath.py).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Grouping", "GroupedBatch", "as_reward_tensor", "stable_topic_ids", "EQUAL_ULPS"]

# Rewards of one group that differ by at most this many float64 units in the
# last place, measured at the batch's reward scale (max |r|), are equal:
# 0.1 + 0.2 and 0.3 are the same reward (a group of 0.3s computed two ways
# would otherwise have a spurious spread and a non-zero advantage). Float64, not the
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
    if not _all_finite(rewards_t):
        finite = torch.isfinite(rewards_t)
        bad = int((~finite).nonzero()[0, 0])
        kind = "NaN" if bool(torch.isnan(rewards_t[bad])) else "infinite"
        count = int((~finite).sum())
        raise ValueError(f"{kind} reward at index {bad} ({count} non-finite reward(s) in the batch)")
    return rewards_t, group_ids_t.to(torch.long)


def _all_finite(values: Tensor) -> bool:
    """Whether every element of ``values`` is finite, in one fused pass and one host sync.

    A sum is NaN or infinite when an element is; only then (or when the sum
    of large finite values overflows) is the elementwise check run.
    """
    # Summed in the values' own dtype (a float64 accumulator costs a conversion pass); half precision in float32.
    total = values.sum() if values.dtype in (torch.float32, torch.float64) else values.sum(dtype=torch.float32)
    if math.isfinite(float(total)):
        return True
    return bool(torch.isfinite(values).all())


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
        raise ValueError(
            f"correctness must have shape {tuple(rewards.shape)} like the rewards, got {tuple(correct.shape)}"
        )
    if correct.is_complex():
        raise ValueError(f"correctness must be real, got dtype {correct.dtype}")
    correct = correct.to(device=rewards.device, dtype=torch.float64)
    if not _all_finite(correct):
        finite = torch.isfinite(correct)
        bad = int((~finite).nonzero()[0, 0])
        kind = "NaN" if bool(torch.isnan(correct[bad])) else "infinite"
        raise ValueError(f"{kind} correctness at index {bad}")
    return correct


def _as_topic_ids(topic_ids: Tensor | Sequence[int], group_ids: Tensor, grouping: Grouping) -> Tensor:
    """Validate per-response topic ids (N,) and return each group's topic id (M,) int64.

    A topic labels a prompt, so every response of a group must carry the same
    topic id; anything else is a wiring bug and raises.
    """
    topics = topic_ids if isinstance(topic_ids, Tensor) else torch.as_tensor(topic_ids)
    if topics.shape != group_ids.shape:
        raise ValueError(
            f"topic_ids must have shape {tuple(group_ids.shape)} like group_ids, got {tuple(topics.shape)}"
        )
    if topics.is_floating_point() or topics.is_complex() or topics.dtype == torch.bool:
        raise ValueError(f"topic_ids must be an integer tensor, got dtype {topics.dtype}")
    topics = topics.to(device=group_ids.device, dtype=torch.long)
    low, high = grouping.amin(topics), grouping.amax(topics)  # (M,)
    mixed = high != low  # (M,)
    if bool(mixed.any()):
        group = int(group_ids[grouping.index == int(mixed.nonzero()[0, 0])][0])
        raise ValueError(
            f"group {group} has responses with different topic ids ({int(low[mixed][0])} and {int(high[mixed][0])}); "
            "a topic labels a prompt, so all responses of a group need the same topic id"
        )
    return low


# Blocks of at most this many responses are summed column by column (see Grouping.sum).
_COLUMN_SUM_MAX = 8
# A dense id -> group table is used when the id range is at most this many times N (memory O(N)).
_DENSE_SPAN = 4


class Grouping:
    """Which of M groups each of N responses belongs to, and the segment reductions over it.

    Build it with :meth:`from_ids`. ``block`` is G when the ids are constant
    over consecutive blocks of G (group m = responses ``[m*G, (m+1)*G)``):
    every reduction is then an ``(M, G)`` view and nothing is sorted or
    scattered. Otherwise ``block`` is None and ``index`` (N,) holds each
    response's group; group m is then the m-th smallest id.

    >>> Grouping.from_ids(torch.tensor([5, 5, 9, 9])).block
    2
    >>> g = Grouping.from_ids(torch.tensor([9, 5, 9, 5]))
    >>> g.block, g.index.tolist(), g.sum(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist()
    (None, [1, 0, 1, 0], [6.0, 4.0])
    """

    def __init__(
        self, num_responses: int, num_groups: int, *, block: int | None, index: Tensor | None, device: torch.device
    ) -> None:
        if (block is None) == (index is None):
            raise ValueError("a Grouping has either a block size or an index")
        self.num_responses, self.num_groups, self.block, self.device = num_responses, num_groups, block, device
        self._index = index

    @classmethod
    def from_ids(cls, group_ids: Tensor) -> Grouping:
        """Group validated ids (N,) int64, N >= 1."""
        n, device = group_ids.numel(), group_ids.device
        block, increasing = _block_candidate(group_ids)
        if block is not None and increasing:  # the common layout: decided in O(N), nothing sorted or ranked
            return cls(n, n // block, block=block, index=None, device=device)
        index, num_groups = _rank(group_ids)
        if block is not None and num_groups == n // block:  # blocks in any order, each a distinct id
            return cls(n, num_groups, block=block, index=None, device=device)
        return cls(n, num_groups, block=None, index=index, device=device)

    @property
    def index(self) -> Tensor:
        """(N,) int64 group of each response (built on first use for the block layout)."""
        if self._index is None:
            self._index = torch.arange(self.num_groups, device=self.device).repeat_interleave(self.block)  # type: ignore[arg-type]
        return self._index

    def sizes(self) -> Tensor:
        """(M,) float64 G_m, responses per group."""
        if self.block is not None:
            return torch.full((self.num_groups,), float(self.block), dtype=torch.float64, device=self.device)
        counts = torch.bincount(self.index, minlength=self.num_groups)  # exact integers
        return counts.to(torch.float64)

    def sum(self, values: Tensor) -> Tensor:
        """Segment sum of per-response ``values`` (N,) -> (M,)."""
        if self.block is not None:
            blocks = values.reshape(self.num_groups, self.block)  # (M, G), a view unless values is strided
            if self.block > _COLUMN_SUM_MAX:
                return blocks.sum(dim=1)
            # Small G: add the G columns left to right. A reduction over an inner dimension of 4 barely
            # vectorises, and this order is index_add_'s, so the sums equal the general path's to the bit.
            out = blocks[:, 0].clone()
            for column in range(1, self.block):
                out += blocks[:, column]
            return out
        out = torch.zeros(self.num_groups, dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.index, values)

    def amin(self, values: Tensor) -> Tensor:
        """Segment minimum (N,) -> (M,)."""
        return self._extreme(values, "amin")

    def amax(self, values: Tensor) -> Tensor:
        """Segment maximum (N,) -> (M,)."""
        return self._extreme(values, "amax")

    def _extreme(self, values: Tensor, reduce: str) -> Tensor:
        if self.block is not None:
            blocks = values.reshape(self.num_groups, self.block)
            return blocks.amin(dim=1) if reduce == "amin" else blocks.amax(dim=1)
        out = torch.empty(self.num_groups, dtype=values.dtype, device=values.device)
        with warnings.catch_warnings():  # index_reduce_ is "beta" but 2x faster than scatter_reduce here
            warnings.simplefilter("ignore", UserWarning)
            return out.index_reduce_(0, self.index, values, reduce, include_self=False)

    def broadcast(self, group_values: Tensor) -> Tensor:
        """Per-group ``group_values`` (M,) -> per-response (N,) (a copy; prefer :meth:`map`)."""
        if self.block is not None:
            return group_values.unsqueeze(1).expand(self.num_groups, self.block).reshape(-1)
        return group_values.index_select(0, self.index)

    def map(self, fn: Callable[..., Tensor], values: Tensor, *group_values: Tensor) -> Tensor:
        """``fn(values, *group_values)`` elementwise per response, (N,), with each group's values broadcast.

        ``values`` (N,) per response, each of ``group_values`` (M,) per group;
        ``fn`` must be elementwise (broadcasting). For blocks it runs on the
        (M, G) view with (M, 1) group columns, so no (N,) copy of a group
        statistic is made; otherwise on (N,) gathers. Same operations on the
        same numbers either way, so the same result to the bit.

        >>> g = Grouping.from_ids(torch.tensor([0, 0, 1, 1]))
        >>> g.map(torch.sub, torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.5, 3.5])).tolist()
        [-0.5, 0.5, -0.5, 0.5]
        """
        if self.block is not None:
            out = fn(values.reshape(self.num_groups, self.block), *(v.unsqueeze(1) for v in group_values))
        else:
            out = fn(values, *(v.index_select(0, self.index) for v in group_values))
        return out.reshape(-1)


def _block_candidate(group_ids: Tensor) -> tuple[int | None, bool]:
    """(G, whether the block ids increase) if ``group_ids`` (N,) is constant over consecutive blocks of G, else (None, False).

    O(N), vectorised, no sort: G is the length of the first run (found on a
    growing prefix), then one comparison of the (M, G) view with its first
    column. Blocks are distinct groups for sure when their ids increase;
    otherwise the caller compares M with the number of distinct ids.
    """
    n = group_ids.numel()
    first = group_ids[0]
    width = 64
    while True:
        differs = group_ids[:width] != first
        if bool(differs.any()):
            block = int(differs.to(torch.uint8).argmax())  # first index whose id differs
            break
        if width >= n:
            return n, True  # one group
        width *= 16
    if n % block:
        return None, False
    blocks = group_ids.reshape(n // block, block)  # (M, G), a view of contiguous ids
    if block > 1 and not torch.equal(blocks, blocks[:, :1].expand_as(blocks)):
        return None, False
    heads = blocks[:, 0]  # (M,)
    return block, bool((heads[1:] > heads[:-1]).all())


def _rank(group_ids: Tensor) -> tuple[Tensor, int]:
    """Each id's rank among the distinct ids (N,) int64 (the inverse of a sorted unique), and their count."""
    n = group_ids.numel()
    low, high = (int(x) for x in group_ids.aminmax())
    if high - low < _DENSE_SPAN * n:  # ids in a compact range: a lookup table, O(N + span), no sort
        offset = group_ids - low  # (N,)
        present = torch.zeros(high - low + 1, dtype=torch.long, device=group_ids.device).index_fill_(0, offset, 1)
        rank = present.cumsum(0) - 1  # rank of each present id among the present ids
        return rank.index_select(0, offset), int(rank[-1]) + 1
    unique, index = torch.unique(group_ids, sorted=True, return_inverse=True)  # sparse ids (hashes): sort
    return index, unique.numel()


@dataclass(frozen=True)
class GroupedBatch:
    """One batch of rewards grouped by prompt. All statistics are float64.

    Attributes:
        rewards: (N,) float64 rewards.
        grouping: the :class:`Grouping` (group of each response and the
            segment reductions; ``grouping.index`` is the (N,) group index).
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
    grouping: Grouping
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
    ) -> GroupedBatch:
        """Validate and group; every check runs here, before any estimator sees (or stores) the batch."""
        rewards_t, group_ids_t = as_reward_tensor(rewards, group_ids)
        grouping = Grouping.from_ids(group_ids_t)
        r64 = rewards_t.to(torch.float64).contiguous()  # (N,)
        num_groups = grouping.num_groups
        correct = r64 if correctness is None else _as_correctness(correctness, r64)
        topics = (
            torch.zeros(num_groups, dtype=torch.long, device=r64.device)
            if topic_ids is None
            else _as_topic_ids(topic_ids, group_ids_t, grouping)
        )  # (M,)
        sizes = grouping.sizes()  # (M,)
        low, high = grouping.amin(r64), grouping.amax(r64)  # (M,)
        # sum / G of G equal values can miss the value by an ulp ([0.1] * 3 -> 0.10000000000000002), which
        # GRPO's 1 / (std + eps) turns into a spurious 1e-11 advantage: use the value itself.
        scale = torch.maximum(high.abs().max(), low.abs().max())  # max |r|, from the (M,) extremes
        all_equal = (high - low) <= EQUAL_ULPS * torch.finfo(torch.float64).eps * scale  # (M,)
        means = torch.where(all_equal, low, grouping.sum(r64) / sizes)  # (M,)
        # r - mu_m, zeroed in all-equal groups by a 0/1 factor (cheaper than where): there mu_m is the
        # group's minimum, so r - mu_m >= 0 and the product is +0.0, the same bits as a where.
        keep = (~all_equal).to(torch.float64)  # (M,)
        centred = grouping.map(lambda r, mu, factor: (r - mu).mul_(factor), r64, means, keep)  # (N,)
        group_correctness = means if correctness is None else grouping.sum(correct) / sizes
        return cls(
            rewards=r64,
            grouping=grouping,
            group_sizes=sizes,
            group_means=means,
            dtype=rewards_t.dtype,
            all_equal=all_equal,
            centred=centred,
            correctness=correct,
            group_correctness=group_correctness,
            group_topics=topics,
        )

    @property
    def index(self) -> Tensor:
        """(N,) int64 group index in ``[0, M)`` of each response."""
        return self.grouping.index

    @property
    def num_responses(self) -> int:
        return int(self.rewards.numel())

    @property
    def num_groups(self) -> int:
        return self.grouping.num_groups

    def group_sum(self, values: Tensor) -> Tensor:
        """Segment sum of per-response ``values`` (N,) -> (M,)."""
        return self.grouping.sum(values)

    def broadcast(self, group_values: Tensor) -> Tensor:
        """Per-group ``group_values`` (M,) -> per-response (N,)."""
        return self.grouping.broadcast(group_values)

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
        smallest = self.grouping.block if self.grouping.block is not None else int(self.group_sizes.min())
        if smallest < min_size:
            raise ValueError(
                f"{estimator} is group-relative and needs at least {min_size} responses per prompt, "
                f"but a group has G = {smallest}; sample more responses per prompt (group size >= {min_size}) "
                "or use the 'ebpo' estimator, whose prior gives single responses a baseline"
            )
