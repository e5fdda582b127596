"""Online mean/variance accumulators (Welford, with Chan et al.'s parallel merge).

EBPO keeps two of these (docs/methods.md#welford-statistics): one over every individual reward
(-> sigma^2) and one over the group means (-> mu_glob, tau^2).

A batch enters as a whole through Chan, Golub & LeVeque's pairwise merge
("Updating formulae and a pairwise algorithm for computing sample variances",
1979). Merging batch statistics is exactly equal (in exact arithmetic) to
running Welford's one-sample update over the batch's values one by one, and
it lets statistics computed on shards (data-parallel ranks) merge to the
one-pass result.

Forgetting is one more operation on the same state: :meth:`Welford.decayed`
scales the weight (count and M2) of everything seen so far. EBPO's three
priors are the same accumulator with three decay factors:
``batch`` = 0 (forget everything before this batch: the authors' released
code), ``running`` = 1 (never forget: the paper's Algorithm 1) and ``ema`` =
d in (0, 1) (old steps lose weight geometrically, for a moving policy).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ebpo.grouping import Grouping

__all__ = ["Welford", "KeyedWelford", "find_sorted"]


@dataclass(frozen=True)
class Welford:
    """Weighted count, mean and sum of squared deviations (M2), in float64.

    >>> a = Welford.from_values(torch.tensor([1.0, 2.0]))
    >>> b = Welford.from_values(torch.tensor([3.0, 4.0, 5.0]))
    >>> round(a.merge(b).var, 6), round(Welford.from_values(torch.arange(1.0, 6.0)).var, 6)
    (2.0, 2.0)
    """

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def from_values(cls, values: Tensor) -> Welford:
        """Statistics of a batch of values (two-pass, vectorised)."""
        values = values.detach().to(torch.float64).reshape(-1)
        n = values.numel()
        if n == 0:
            return cls()
        mean = values.mean()
        centred = values - mean  # (n,) a fresh tensor: square it in place (no second (n,) allocation)
        m2 = centred.mul_(centred).sum()
        return cls(count=float(n), mean=float(mean), m2=float(m2))

    def merge(self, other: Welford) -> Welford:
        """Chan et al. pairwise merge; merging with an empty state is the identity."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / count
        m2 = self.m2 + other.m2 + delta * delta * self.count * other.count / count
        return Welford(count=count, mean=mean, m2=m2)

    def add(self, value: float) -> Welford:
        """Welford's one-sample update (the textbook online algorithm)."""
        count = self.count + 1.0
        delta = value - self.mean
        mean = self.mean + delta / count
        m2 = self.m2 + delta * (value - mean)
        return Welford(count=count, mean=mean, m2=m2)

    def decayed(self, factor: float) -> Welford:
        """Down-weight everything seen so far by ``factor`` in [0, 1].

        The mean is unchanged; count and M2 shrink, so the next merge gives the
        new data relatively more weight. ``factor=0`` empties the state.
        """
        if not 0.0 <= factor <= 1.0:
            raise ValueError(f"decay factor must be in [0, 1], got {factor}")
        if factor == 0.0:
            return Welford()
        return Welford(count=self.count * factor, mean=self.mean, m2=self.m2 * factor)

    @property
    def var(self) -> float:
        """Population variance M2 / count (0 for an empty state)."""
        return self.m2 / self.count if self.count > 0 else 0.0

    def state_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, float]) -> Welford:
        missing = {"count", "mean", "m2"} - set(state)
        if missing:
            raise ValueError(f"Welford state is missing keys {sorted(missing)}")
        return cls(count=float(state["count"]), mean=float(state["mean"]), m2=float(state["m2"]))


@dataclass(frozen=True)
class KeyedWelford:
    """One :class:`Welford` accumulator per key (a topic id), held as tensors (K,) and updated with scatter ops.

    ``keys`` (K,) int64 are sorted and unique; ``count``, ``mean`` and ``m2``
    (K,) float64. Every operation is the scalar accumulator's, elementwise:
    the same Chan merge, the same forgetting, so one key behaves exactly like
    a :class:`Welford`. Keys appear when first seen; a key whose weight has
    fallen to 0 (the ``batch`` prior forgets everything) is dropped.

    >>> acc = KeyedWelford.from_values(torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([7, 7, 9, 9]))
    >>> acc.keys.tolist(), acc.mean.tolist(), (acc.m2 / acc.count).tolist()
    ([7, 9], [1.5, 4.0], [0.25, 1.0])
    """

    keys: Tensor
    count: Tensor
    mean: Tensor
    m2: Tensor

    @classmethod
    def empty(cls) -> KeyedWelford:
        zeros = torch.zeros(0, dtype=torch.float64)
        return cls(torch.zeros(0, dtype=torch.long), zeros, zeros.clone(), zeros.clone())

    @classmethod
    def from_values(cls, values: Tensor, keys: Tensor) -> KeyedWelford:
        """Per-key statistics of ``values`` (N,) labelled by ``keys`` (N,) (two-pass, vectorised)."""
        values = values.detach().to(torch.float64).reshape(-1)
        unique, index = torch.unique(keys.reshape(-1).to(torch.long), sorted=True, return_inverse=True)
        k = unique.numel()
        count = torch.zeros(k, dtype=torch.float64, device=values.device).index_add_(0, index, torch.ones_like(values))
        mean = torch.zeros(k, dtype=torch.float64, device=values.device).index_add_(0, index, values) / count
        centred = values - mean[index]
        m2 = torch.zeros(k, dtype=torch.float64, device=values.device).index_add_(0, index, centred * centred)
        return cls(unique, count, mean, m2)

    @classmethod
    def from_grouped_values(
        cls, values: Tensor, grouping: Grouping, group_sizes: Tensor, keys: Tensor, key_of_group: Tensor
    ) -> KeyedWelford:
        """Per-key statistics of per-response ``values`` (N,) whose group's key is ``keys[key_of_group]``.

        The same two-pass statistics as :meth:`from_values` with each
        response keyed by its group's key, but every N-sized reduction is the
        grouping's segment sum (an (M, G) view for contiguous groups) followed
        by an (M,) -> (K,) sum, and only the M group keys are sorted (by the
        caller), not N response keys. ``keys`` (K,) sorted unique,
        ``key_of_group`` (M,) index into it, ``group_sizes`` (M,) float64.
        """
        values = values.detach().to(torch.float64)
        zeros = torch.zeros(keys.numel(), dtype=torch.float64, device=values.device)
        count = zeros.index_add(0, key_of_group, group_sizes)
        mean = zeros.index_add(0, key_of_group, grouping.sum(values)) / count  # (K,)
        centred = grouping.map(torch.sub, values, mean.index_select(0, key_of_group))  # (N,)
        m2 = zeros.index_add(0, key_of_group, grouping.sum(centred * centred))
        return cls(keys, count, mean, m2)

    def decayed(self, factor: float) -> KeyedWelford:
        """Down-weight every key by ``factor`` (as :meth:`Welford.decayed`); 0 forgets every key."""
        if not 0.0 <= factor <= 1.0:
            raise ValueError(f"decay factor must be in [0, 1], got {factor}")
        if factor == 0.0:
            return KeyedWelford.empty()
        return KeyedWelford(self.keys, self.count * factor, self.mean, self.m2 * factor)

    def merge(self, other: KeyedWelford) -> KeyedWelford:
        """Chan et al.'s merge per key over the union of keys; a key on one side only is copied as is."""
        keys = torch.unique(torch.cat([self.keys, other.keys.to(self.keys.device)]), sorted=True)

        def aligned(acc: KeyedWelford) -> tuple[Tensor, Tensor, Tensor]:
            slot = torch.searchsorted(keys, acc.keys)
            zeros = torch.zeros(keys.numel(), dtype=torch.float64, device=keys.device)
            return (
                zeros.index_copy(0, slot, acc.count),
                zeros.index_copy(0, slot, acc.mean),
                zeros.index_copy(0, slot, acc.m2),
            )

        (ca, ma, m2a), (cb, mb, m2b) = aligned(self), aligned(other)
        count = ca + cb
        safe = torch.where(count > 0, count, torch.ones_like(count))
        delta = mb - ma
        mean = torch.where(ca == 0, mb, torch.where(cb == 0, ma, ma + delta * cb / safe))
        m2 = torch.where(ca == 0, m2b, torch.where(cb == 0, m2a, m2a + m2b + delta * delta * ca * cb / safe))
        keep = count > 0
        return KeyedWelford(keys[keep], count[keep], mean[keep], m2[keep])

    def lookup(self, keys: Tensor) -> Tensor:
        """Index (len(keys),) of each of ``keys`` in this accumulator (all must be present)."""
        return torch.searchsorted(self.keys, keys.to(self.keys.device))

    @property
    def var(self) -> Tensor:
        """Population variance per key (K,); every kept key has count > 0."""
        return self.m2 / self.count

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "keys": self.keys.clone(),
            "count": self.count.clone(),
            "mean": self.mean.clone(),
            "m2": self.m2.clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> KeyedWelford:
        missing = {"keys", "count", "mean", "m2"} - set(state)
        if missing:
            raise ValueError(f"KeyedWelford state is missing keys {sorted(missing)}")
        keys = torch.as_tensor(state["keys"], dtype=torch.long)
        fields = [torch.as_tensor(state[name], dtype=torch.float64) for name in ("count", "mean", "m2")]
        if any(f.shape != keys.shape for f in fields) or keys.dim() != 1:
            raise ValueError("KeyedWelford state tensors must all have shape (K,)")
        if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):
            raise ValueError("KeyedWelford state keys must be sorted and unique")
        return cls(keys, *fields)


def find_sorted(keys: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
    """Where each of ``queries`` (Q,) sits in the sorted, unique ``keys`` (K,): ``(slot, found)``, both (Q,).

    ``found[i]`` is whether ``keys[slot[i]] == queries[i]``; ``slot`` is always a valid index (0 when K = 0), so
    ``values[slot]`` can be read and then masked by ``found``. The per-key state that ebpo keeps (per-prompt
    trackers, allocation history, topic statistics) is looked up this way, keys that it has not seen included.

    >>> find_sorted(torch.tensor([2, 5, 9]), torch.tensor([5, 1, 9, 10]))
    (tensor([1, 0, 2, 2]), tensor([ True, False,  True, False]))
    """
    queries = queries.to(keys.device)
    if keys.numel() == 0:
        return torch.zeros_like(queries, dtype=torch.long), torch.zeros_like(queries, dtype=torch.bool)
    slot = torch.searchsorted(keys, queries).clamp_max(keys.numel() - 1)
    return slot, keys[slot] == queries
