"""The training stream of prompts (tasks and verifiers are built by :mod:`ebpo.tasks.build`).

The stream serves problems in the order of a curriculum
(:mod:`ebpo.curriculum`: ``shuffle``, ``topic``, ``difficulty``), epoch after
epoch. Its position (epoch, index) is part of every checkpoint, so a resumed
run sees exactly the prompts the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ebpo.curriculum import build_curriculum
from ebpo.tasks.base import Problem

__all__ = ["PromptStream"]


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
