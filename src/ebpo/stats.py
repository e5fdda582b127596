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

import torch
from torch import Tensor

__all__ = ["Welford"]


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
    def from_values(cls, values: Tensor) -> "Welford":
        """Statistics of a batch of values (two-pass, vectorised)."""
        values = values.detach().to(torch.float64).reshape(-1)
        n = values.numel()
        if n == 0:
            return cls()
        mean = values.mean()
        m2 = ((values - mean) ** 2).sum()
        return cls(count=float(n), mean=float(mean), m2=float(m2))

    def merge(self, other: "Welford") -> "Welford":
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

    def add(self, value: float) -> "Welford":
        """Welford's one-sample update (the textbook online algorithm)."""
        count = self.count + 1.0
        delta = value - self.mean
        mean = self.mean + delta / count
        m2 = self.m2 + delta * (value - mean)
        return Welford(count=count, mean=mean, m2=m2)

    def decayed(self, factor: float) -> "Welford":
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
    def from_state_dict(cls, state: dict[str, float]) -> "Welford":
        missing = {"count", "mean", "m2"} - set(state)
        if missing:
            raise ValueError(f"Welford state is missing keys {sorted(missing)}")
        return cls(count=float(state["count"]), mean=float(state["mean"]), m2=float(state["m2"]))
