"""The task interface and its registry.

A task supplies problems (one record schema shared with the dataset loaders)
and names the verifier that scores completions. Tasks are looked up by name
or by import path ``module:attr`` (``--task mypkg.tasks:make_task``); a name
may carry an argument after a colon-free suffix handled by the factory, e.g.
``reasoning_gym:chain_sum`` is resolved by the ``reasoning_gym`` factory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from ebpo.registry import Registry

__all__ = ["Problem", "Task", "TASKS"]


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer (the loaders' record schema)."""

    id: str
    prompt: str
    answer: str
    topic: str | None = None
    difficulty: float | None = None


class Task(Protocol):
    name: str
    verifier: str  # a name in ebpo.verifiers.VERIFIERS

    def train_problems(self) -> Sequence[Problem]: ...

    def eval_problems(self) -> Sequence[Problem]: ...


TASKS: Registry[Task] = Registry("task")
