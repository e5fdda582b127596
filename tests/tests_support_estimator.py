"""A user-defined estimator, loaded by import path in test_estimators.py."""

from __future__ import annotations

from ebpo.grouping import GroupedBatch


class ConstantBaseline:
    min_group_size = 1

    def __init__(self, baseline: float) -> None:
        self.baseline = baseline

    def compute(self, batch: GroupedBatch, *, training: bool):
        return batch.rewards - self.baseline, {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class NonNegativeOnly:
    """A user weighting that, like an early HA-DW, reads the (possibly shaped) reward and rejects < 0."""

    def __call__(self, advantages, batch: GroupedBatch, *, training: bool):
        if bool((batch.rewards < 0).any()):
            raise ValueError("NonNegativeOnly needs rewards >= 0")
        return advantages.new_ones(advantages.shape), {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
