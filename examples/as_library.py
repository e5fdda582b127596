"""ebpo as a library: advantage estimators as plain functions on tensors, in your own training loop.

    pip install -c requirements/lock.txt -e .
    python examples/as_library.py

Four things, each a few lines:

1. look an estimator up by name in the registry;
2. compute advantages for a toy batch (3 prompts x 4 responses) with GRPO and EBPO;
3. save the estimator's state with your checkpoint and restore it (the running prior carries statistics
   across steps, so a resumed run must restore them);
4. add your own estimator: a class that implements ``ebpo.estimators.Estimator``, registered under a name, then
   used exactly like the built-in ones (``ebpo train --estimator`` takes it too, as ``module:attr``).

Every estimator has one call, ``estimator(rewards, group_ids, *, topic_ids=None, correctness=None,
training=True) -> (advantages, metrics)``; the maths of each one is in docs/methods.md.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import ebpo
from ebpo.estimators import ESTIMATORS
from ebpo.grouping import GroupedBatch


# ---------------------------------------------------------------- 4. a custom estimator (defined first, used last)
class RunningMeanBaseline:
    """REINFORCE with a running-mean baseline: A = r - (mean of every reward seen in training so far).

    What :class:`ebpo.estimators.Estimator` asks for: ``min_group_size``, ``compute(batch, training=...)``
    returning float64 advantages (N,) and a flat dict of metrics, and ``state_dict`` / ``load_state_dict``.
    ``compute`` must not move any state when ``training`` is False (evaluation batches).
    """

    min_group_size = 1  # the baseline is global, so a prompt may have a single response

    def __init__(self, initial: float = 0.0) -> None:
        self.count, self.mean = 0, float(initial)

    def compute(self, batch: GroupedBatch, *, training: bool) -> tuple[Tensor, dict[str, float]]:
        rewards = batch.rewards  # (N,) float64, validated by ebpo (finite, 1-D, one group id per reward)
        advantages = rewards - self.mean  # (N,) the baseline from the steps before this one
        if training:  # fold this batch into the running mean
            n = rewards.numel()
            self.mean += (float(rewards.sum()) - n * self.mean) / (self.count + n)
            self.count += n
        return advantages, {"running_mean/baseline": self.mean}

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count, self.mean = int(state["count"]), float(state["mean"])


def main() -> None:
    # ------------------------------------------------------------ 1. the registry
    print("estimators:", ebpo.list_estimators())  # the registered names: grpo, dr_grpo, rloo, ebpo, ...
    print("weightings:", ebpo.list_weightings())  # ha_dw composes with any estimator
    grpo = ebpo.build_estimator("grpo")
    estimator = ebpo.build_estimator("ebpo", prior="running")  # the paper's Algorithm 1; "batch" is the default

    # ------------------------------------------------------------ 2. one call on a toy batch
    # Three prompts, four responses each: all fail, half pass, all pass.
    rewards = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # (N,)
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])  # (N,) the prompt of each response
    grpo_advantages, _ = grpo(rewards, group_ids)
    advantages, metrics = estimator(rewards, group_ids)  # (N,), flat dict of floats
    print("rewards:        ", rewards.tolist())
    print("GRPO advantages:", [round(a, 3) for a in grpo_advantages.tolist()])
    print("EBPO advantages:", [round(a, 3) for a in advantages.tolist()])
    print(f"adv/all_equal_group_frac = {metrics['adv/all_equal_group_frac']:.3f}")  # 2 of 3 groups: all-equal
    print(f"ebpo/shrinkage = {metrics['ebpo/shrinkage']:.3f}")
    # GRPO gives the all-fail and all-pass groups exactly zero; EBPO's shrunk baseline gives them a signal.
    assert grpo_advantages[:4].eq(0).all() and grpo_advantages[8:].eq(0).all()
    assert advantages[:4].lt(0).all() and advantages[8:].gt(0).all()

    # ------------------------------------------------------------ 3. state_dict round trip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "estimator.pt"
        torch.save(estimator.state_dict(), path)  # beside your model checkpoint
        restored = ebpo.build_estimator("ebpo", prior="running")
        restored.load_state_dict(torch.load(path, weights_only=True))  # plain tensors and numbers only
    next_rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    next_groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    continued, _ = estimator(next_rewards, next_groups)
    resumed, _ = restored(next_rewards, next_groups)
    fresh, _ = ebpo.build_estimator("ebpo", prior="running")(next_rewards, next_groups)
    print(
        "resumed == continued:", torch.equal(resumed, continued), "| fresh == continued:", torch.equal(fresh, continued)
    )
    assert torch.equal(resumed, continued)  # the restored prior continues exactly
    assert not torch.equal(fresh, continued)  # without the restore the running prior starts from nothing

    # ------------------------------------------------------------ 4. your own estimator, as a plugin
    # Register it under a name (once per process) ...
    if "running_mean" not in ESTIMATORS:
        ESTIMATORS.register("running_mean")(RunningMeanBaseline)
    mine = ebpo.build_estimator("running_mean", initial=0.5, weighting="ha_dw")  # ... and it composes like the rest
    # ... or skip registration and name it by import path, which is what `ebpo train --estimator` and TRL's
    # ebpo_estimator take: build_estimator("mypackage.advantages:RunningMeanBaseline").
    mine_advantages, mine_metrics = mine(rewards, group_ids)
    print("running_mean advantages:", [round(a, 3) for a in mine_advantages.tolist()])
    print(f"running_mean/baseline = {mine_metrics['running_mean/baseline']:.3f}")
    assert mine_advantages[:4].lt(0).all() and mine_advantages[8:].gt(0).all()  # below / above the 0.5 start
    assert mine.state_dict()["estimator_state"] == {"count": 12, "mean": 0.5}  # the batch's mean is also 0.5
    print("ok")


if __name__ == "__main__":
    main()
