"""The task interface and its registry.

A task supplies problems (one record schema shared with the dataset loaders)
and names the verifier that scores completions. Tasks are looked up by name
or by import path ``module:attr`` (``--task mypkg.tasks:make_task``); a name
may carry an argument after a colon-free suffix handled by the factory, e.g.
``reasoning_gym:chain_sum`` is resolved by the ``reasoning_gym`` factory.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ebpo.registry import Registry

__all__ = ["Problem", "Task", "TASKS", "GeneratedSplits"]


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
    """What a task implements: a name, the verifier that scores it, and its two splits of problems.

    Registered with ``@TASKS.register("name")`` on a factory (a class or a function) that takes the task's
    options as keyword arguments (``--task-options`` in ``ebpo train``), or named by import path
    (``--task mypkg.tasks:make_task``); :func:`~ebpo.tasks.build.build_task` checks the attributes below.
    """

    name: str
    verifier: str  # a name in ebpo.verifiers.VERIFIERS
    """The name (or ``package.module:attr`` path) of the verifier that scores its completions."""
    recommended: dict[str, Any]
    """``ebpo train`` settings the task is meant to be trained with (config field -> value, e.g.
    ``{"max_new_tokens": 44}``): applied over the config defaults and under the ``--method`` preset,
    ``--config`` YAML and flags, so any of them still wins. Optional: a task without it recommends nothing."""

    def train_problems(self) -> Sequence[Problem]:
        """The problems the policy is trained on."""
        ...

    def eval_problems(self) -> Sequence[Problem]:
        """The held-out problems the run is evaluated on (disjoint from the training problems)."""
        ...


TASKS: Registry[Task] = Registry("task")


class GeneratedSplits:
    """Train / held-out splits of a task generated in code (``arithmetic``, ``stepwise``).

    A subclass (a dataclass with ``name``, ``num_train``, ``num_eval``,
    ``seed``, ``eval_seed`` and ``exclude_eval_seeds``) supplies
    :meth:`_make`, one problem from an RNG, and calls :meth:`_build_splits`
    after checking its options. Every held-out set is the plain draw of its
    seed. Excluded sets are removed from the evaluation split (not redrawn)
    and, with the evaluation set itself, from training: the training problems
    depend only on the *set* of seeds {eval_seed} | exclude_eval_seeds, so
    ``ebpo meta``'s validation members (eval 424242, exclude the final set)
    and final runs (exclude 424242) train on the same problems and share one
    warm start.
    """

    def _make(self, rng: random.Random, index: int, split: str) -> Problem:
        raise NotImplementedError

    def _build_splits(self) -> None:
        name = self.name  # type: ignore[attr-defined]
        excluded = frozenset(
            p.prompt for s in self.exclude_eval_seeds for p in self._draw(s, self.num_eval, "eval", exclude=frozenset())
        )  # type: ignore[attr-defined]
        held_out = self._draw(self.eval_seed, self.num_eval, "eval", exclude=frozenset())  # type: ignore[attr-defined]
        self._eval = [p for p in held_out if p.prompt not in excluded]
        if not self._eval:
            raise ValueError(f"{name}: the excluded held-out sets cover the whole evaluation set; choose other seeds")
        self._train = self._draw(
            self.seed, self.num_train, "train", exclude=excluded | frozenset(p.prompt for p in held_out)
        )  # type: ignore[attr-defined]

    def _draw(self, seed: int, count: int, split: str, exclude: frozenset[str]) -> list[Problem]:
        rng = random.Random(seed)
        problems: list[Problem] = []
        attempts = 0
        while len(problems) < count:  # building strings is inherently per problem
            attempts += 1
            if attempts > 50 * count + 1000:
                raise ValueError(
                    f"{self.name}: cannot draw {count} {split} problems outside the held-out set; lower num_train"
                )  # type: ignore[attr-defined]
            problem = self._make(rng, len(problems), split)
            if problem.prompt not in exclude:
                problems.append(problem)
        return problems

    def train_problems(self) -> list[Problem]:
        return self._train

    def eval_problems(self) -> list[Problem]:
        return self._eval
