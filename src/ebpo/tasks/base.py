"""The task interface and its registry.

A task supplies problems (one record schema shared with the dataset loaders)
and names the verifier that scores completions. Tasks are looked up by name
or by import path ``module:attr`` (``--task mypkg.tasks:make_task``); a name
may carry an argument after a colon-free suffix handled by the factory, e.g.
``reasoning_gym:chain_sum`` is resolved by the ``reasoning_gym`` factory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

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
    target: str | None = None
    """Text a correct completion would contain: the warm start's supervised target.

    Separate from ``answer`` (the verifier's reference) because the two differ
    for tasks whose reference is not a completion (reasoning-gym's JSON entry)
    or whose completion is more than the answer (a worked derivation).
    ``None`` means the answer itself is such a text.
    """

    @property
    def completion_target(self) -> str:
        """The supervised target: ``target``, or ``answer`` where the task gives none."""
        return self.answer if self.target is None else self.target


class Task(Protocol):
    name: str
    verifier: str  # a name in ebpo.verifiers.VERIFIERS
    recommended: dict[str, Any]
    """``ebpo train`` settings the task is meant to be trained with (config field -> value, e.g.
    ``{"max_new_tokens": 44}``): applied over the config defaults and under the ``--method`` preset,
    ``--config`` YAML and flags, so any of them still wins. Optional: a task without it recommends nothing."""

    def train_problems(self) -> Sequence[Problem]: ...

    def eval_problems(self) -> Sequence[Problem]: ...


TASKS: Registry[Task] = Registry("task")
