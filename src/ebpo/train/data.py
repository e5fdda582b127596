"""Tasks, verifiers and the training stream of prompts.

The stream serves problems in the order of a curriculum
(:mod:`ebpo.curriculum`: ``shuffle``, ``topic``, ``difficulty``), epoch after
epoch. Its position (epoch, index) is part of every checkpoint, so a resumed
run sees exactly the prompts the uninterrupted run would have seen.
"""

from __future__ import annotations

import importlib
from typing import Any, Sequence

from ebpo.curriculum import build_curriculum
from ebpo.registry import import_from_path
from ebpo.tasks.base import TASKS, Problem, Task
from ebpo.verifiers.base import VERIFIERS, Verifier

__all__ = ["PromptStream", "build_task", "build_verifier_for", "register_builtin_components"]

# Modules whose import registers built-in tasks and verifiers. The optional
# ones belong to other parts of ebpo and may be absent in a given install.
_BUILTIN_MODULES = ("ebpo.tasks.arithmetic", "ebpo.verifiers.exact")
_OPTIONAL_MODULES = ("ebpo.verifiers", "ebpo.tasks")


def register_builtin_components() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    for module in _OPTIONAL_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a missing dependency inside the module is a real error
                raise


def build_task(name: str, options: dict[str, Any]) -> Task:
    """Resolve ``name``: a registered task, ``registered:arg`` (the factory gets ``arg``), or ``module:attr``."""
    register_builtin_components()
    head, sep, arg = name.partition(":")
    if sep and head in TASKS:
        # e.g. reasoning_gym:chain_sum -> the reasoning_gym factory with its first argument.
        task = TASKS.get(head)(arg, **options)
    elif sep:
        task = import_from_path(name)(**options)
    else:
        task = TASKS.build(name, **options)
    for attr in ("train_problems", "eval_problems", "verifier"):
        if not hasattr(task, attr):
            raise ValueError(f"task {name!r} does not implement {attr!r} (see ebpo.tasks.base.Task)")
    return task


def build_verifier_for(task: Task, override: str | None) -> Verifier:
    register_builtin_components()
    return VERIFIERS.build(override or task.verifier)


class PromptStream:
    """Problems in curriculum order, epoch after epoch; ``state_dict`` records the position."""

    def __init__(self, problems: Sequence[Problem], curriculum: str, seed: int, pass_rates: Any = None) -> None:
        if len(problems) == 0:
            raise ValueError("the task has no training problems")
        self.problems, self.seed, self.pass_rates = problems, seed, pass_rates
        self.curriculum = build_curriculum(curriculum)
        self.epoch, self.index = 0, 0
        self._order = self._ordering(0)

    def _ordering(self, epoch: int) -> list[int]:
        return self.curriculum.order(self.problems, seed=self.seed, epoch=epoch, pass_rates=self.pass_rates)

    def take(self, count: int) -> list[Problem]:
        """The next ``count`` problems, crossing into the next epoch's order when needed."""
        batch: list[Problem] = []
        while len(batch) < count:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._ordering(self.epoch)
            take = min(count - len(batch), len(self._order) - self.index)
            batch += [self.problems[i] for i in self._order[self.index : self.index + take]]
            self.index += take
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._ordering(self.epoch)
