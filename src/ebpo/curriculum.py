"""Orderings of the training stream: ``shuffle``, ``topic`` and ``difficulty``.

EBPO's prior fits a step better when the step's prompts are alike
(docs/methods.md#curricula): EBPO-topic serves the stream cluster by
cluster, EBPO-diff serves one epoch from easy to hard.

A curriculum maps problems to an order (a permutation of their indices) for
one epoch. ``order(problems, seed=..., epoch=..., pass_rates=None)``.

* ``shuffle``: a fresh seeded permutation every epoch.
* ``topic``: clusters are the problems' ``topic`` field when every problem
  has one (the paper: 9 domains labelled by an LLM); otherwise clusters are
  computed offline from the prompt text (the released code: 10 k-means
  clusters of sentence embeddings; here: k-means on hashed character n-gram
  TF-IDF vectors, so it needs no embedding model — a documented departure).
  Clusters are served one after another in a seeded random order, prompts
  shuffled within each cluster.
* ``difficulty``: the first epoch goes from easy to hard, by the starting
  model's pass rate (``pass_rates``, higher = easier; the paper: 16 samples at
  temperature 1.0) or, if none are given, by each problem's ``difficulty``
  field (higher = harder). Ties are broken at random. Later epochs are
  shuffled (the paper describes a single ordered epoch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from ebpo.registry import Registry
from ebpo.tasks.base import Problem

__all__ = [
    "Curriculum",
    "CURRICULA",
    "build_curriculum",
    "list_curricula",
    "cluster_texts",
    "within_step_variance",
]


class Curriculum(Protocol):
    def order(
        self, problems: Sequence[Problem], *, seed: int, epoch: int, pass_rates: Tensor | None = None
    ) -> list[int]: ...


CURRICULA: Registry[Curriculum] = Registry("curriculum")


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@CURRICULA.register("shuffle")
class Shuffle:
    """A fresh seeded permutation each epoch."""

    def order(
        self, problems: Sequence[Problem], *, seed: int, epoch: int, pass_rates: Tensor | None = None
    ) -> list[int]:
        _require_problems(problems)
        return torch.randperm(len(problems), generator=_generator(seed, epoch)).tolist()


@CURRICULA.register("topic")
class TopicClusters:
    """Serve the stream cluster by cluster.

    Args:
        num_clusters: k for text clustering when problems carry no topic (10, as the released code).
        ngram: character n-gram size for the text features.
        dim: hashed feature dimension.
    """

    def __init__(self, num_clusters: int = 10, ngram: int = 3, dim: int = 2048) -> None:
        if num_clusters < 1:
            raise ValueError(f"topic curriculum needs num_clusters >= 1, got {num_clusters}")
        self.num_clusters, self.ngram, self.dim = num_clusters, ngram, dim

    def labels(self, problems: Sequence[Problem], *, seed: int) -> Tensor:
        """Cluster label per problem (N,): the topic field, else text k-means."""
        _require_problems(problems)
        if all(p.topic is not None for p in problems):
            names = sorted({str(p.topic) for p in problems})
            lookup = {name: i for i, name in enumerate(names)}
            return torch.tensor([lookup[str(p.topic)] for p in problems])
        return cluster_texts([p.prompt for p in problems], self.num_clusters, seed=seed, ngram=self.ngram, dim=self.dim)

    def order(
        self, problems: Sequence[Problem], *, seed: int, epoch: int, pass_rates: Tensor | None = None
    ) -> list[int]:
        labels = self.labels(problems, seed=seed)  # (N,)
        gen = _generator(seed, epoch)
        num_labels = int(labels.max()) + 1
        cluster_rank = torch.randperm(num_labels, generator=gen)  # (K,) serving position of each cluster
        within = torch.rand(len(problems), generator=gen)  # random order inside a cluster
        key = cluster_rank[labels].double() + within.double()  # cluster position dominates, within-shuffle breaks ties
        return torch.argsort(key).tolist()


@CURRICULA.register("difficulty")
class EasyToHard:
    """First epoch from easy to hard, then shuffled."""

    def order(
        self, problems: Sequence[Problem], *, seed: int, epoch: int, pass_rates: Tensor | None = None
    ) -> list[int]:
        _require_problems(problems)
        gen = _generator(seed, epoch)
        if epoch > 0:
            return torch.randperm(len(problems), generator=gen).tolist()
        if pass_rates is not None:
            if pass_rates.shape != (len(problems),):
                raise ValueError(f"pass_rates must have shape ({len(problems)},), got {tuple(pass_rates.shape)}")
            easiness = pass_rates.double()
        else:
            missing = [p.id for p in problems if p.difficulty is None]
            if missing:
                raise ValueError(
                    f"difficulty curriculum needs pass rates or a difficulty for every problem; "
                    f"{len(missing)} have none (first: {missing[0]!r})"
                )
            easiness = -torch.tensor([float(p.difficulty) for p in problems], dtype=torch.float64)  # type: ignore[arg-type]
        ties = torch.rand(len(problems), generator=gen, dtype=torch.float64)
        # Sort by easiness descending; the random key only orders exact ties.
        order = torch.argsort(ties)
        order = order[torch.argsort(-easiness[order], stable=True)]
        return order.tolist()


def build_curriculum(name: str, **options: object) -> Curriculum:
    return CURRICULA.build(name, **options)


def list_curricula() -> list[str]:
    return CURRICULA.names()


def _require_problems(problems: Sequence[Problem]) -> None:
    if len(problems) == 0:
        raise ValueError("curriculum got no problems")


def _text_features(texts: Sequence[str], ngram: int, dim: int) -> Tensor:
    """Hashed character n-gram TF-IDF, L2-normalised (N, dim)."""
    rows, cols = [], []
    for row, text in enumerate(texts):  # tokenising strings is inherently per text
        padded = f" {text.lower()} "
        for i in range(max(1, len(padded) - ngram + 1)):
            digest = hashlib.blake2b(padded[i : i + ngram].encode(), digest_size=8).digest()
            rows.append(row)
            cols.append(int.from_bytes(digest, "little") % dim)
    counts = torch.zeros(len(texts), dim, dtype=torch.float64)
    counts.index_put_(
        (torch.tensor(rows), torch.tensor(cols)), torch.ones(len(rows), dtype=torch.float64), accumulate=True
    )
    df = (counts > 0).double().sum(0)  # (dim,)
    idf = torch.log((1 + len(texts)) / (1 + df)) + 1.0
    features = counts * idf
    return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)


def cluster_texts(
    texts: Sequence[str],
    num_clusters: int,
    *,
    seed: int = 0,
    ngram: int = 3,
    dim: int = 2048,
    iters: int = 50,
    restarts: int = 8,
) -> Tensor:
    """k-means (k-means++ init, best of ``restarts`` by inertia) on text features; labels (N,)."""
    x = _text_features(texts, ngram, dim)  # (N, dim)
    gen = torch.Generator().manual_seed(seed)
    best_labels, best_inertia = None, float("inf")
    for _ in range(restarts):
        labels, inertia = _kmeans(x, min(num_clusters, x.shape[0]), gen, iters)
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    assert best_labels is not None
    _, labels = torch.unique(best_labels, return_inverse=True)  # drop empty clusters
    return labels


def _kmeans(x: Tensor, k: int, gen: torch.Generator, iters: int) -> tuple[Tensor, float]:
    n = x.shape[0]
    centres = x[torch.randint(n, (1,), generator=gen)]
    for _ in range(1, k):  # k-means++: next centre with probability proportional to squared distance
        dist = torch.cdist(x, centres).min(dim=1).values ** 2
        if float(dist.sum()) <= 0:
            break
        centres = torch.cat([centres, x[torch.multinomial(dist, 1, generator=gen)]])
    labels = torch.cdist(x, centres).argmin(dim=1)
    for _ in range(iters):
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=centres.shape[0]).double().unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        new_labels = torch.cdist(x, centres).argmin(dim=1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    inertia = float(((x - centres[labels]) ** 2).sum())
    return labels, inertia


def within_step_variance(order: Sequence[int], values: Tensor, batch_size: int) -> float:
    """Mean over steps of the population variance of ``values`` within each step's prompts.

    ``order`` is the serving order, consecutive chunks of ``batch_size`` form
    the steps (a trailing partial step is dropped).
    """
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 to measure a within-step variance, got {batch_size}")
    served = values.double()[torch.as_tensor(list(order))]
    steps = served.numel() // batch_size
    if steps == 0:
        raise ValueError(f"fewer problems ({served.numel()}) than one step ({batch_size})")
    chunks = served[: steps * batch_size].reshape(steps, batch_size)  # (steps, batch)
    return float(chunks.var(dim=1, unbiased=False).mean())
