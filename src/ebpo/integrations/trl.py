"""TRL: a drop-in ``GRPOTrainer`` whose advantages come from ebpo's estimators.

    from ebpo.integrations.trl import EBPOGRPOConfig, EBPOGRPOTrainer   # instead of trl's GRPOConfig/GRPOTrainer
    args = EBPOGRPOConfig(..., ebpo_estimator="ebpo", ebpo_estimator_options={"prior": "running"},
                          ebpo_weighting="ha_dw")
    trainer = EBPOGRPOTrainer(model=..., reward_funcs=..., args=args, train_dataset=...)

How it hooks in, with the smallest override we could find in TRL's
``GRPOTrainer`` (1.x): TRL gathers every process's rewards in
``_calculate_rewards`` before it normalises them per group. We keep that
gathered tensor, let TRL build its batch as usual, then recompute the
advantages with ebpo's estimator on the *global* rewards (group ids: the
prompt index, TRL's consecutive groups of ``num_generations``), and slice this
process's part exactly as TRL does. The estimator therefore sees the same
batch on every rank and its state stays identical everywhere. Completions
every reward function skipped (NaN) get advantage 0, as in TRL, and are left
out of the estimator's statistics. ebpo's metrics are added to TRL's logs
(``ebpo/...``), and the estimator state is saved in every TRL checkpoint
(``ebpo_estimator_state.pt``) and restored by ``resume_from_checkpoint``.

Supported TRL versions: :data:`SUPPORTED_TRL`. Not yet: GBMPO divergences in
place of TRL's KL term (TRL's ``beta`` KL is left as it is).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from packaging.version import Version

from ebpo.estimators import build_estimator

SUPPORTED_TRL = (Version("1.0"), Version("2.0"))  # [min, max)
STATE_FILE = "ebpo_estimator_state.pt"

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("ebpo.integrations.trl needs TRL: pip install 'trl>=1.0,<2.0'") from exc

if not SUPPORTED_TRL[0] <= Version(trl.__version__) < SUPPORTED_TRL[1]:
    raise ImportError(
        f"ebpo.integrations.trl supports trl>={SUPPORTED_TRL[0]},<{SUPPORTED_TRL[1]}; installed trl {trl.__version__}"
    )

__all__ = ["EBPOGRPOConfig", "EBPOGRPOTrainer", "SUPPORTED_TRL"]


@dataclass
class EBPOGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus ebpo's estimator and weighting (see ``ebpo.build_estimator``)."""

    ebpo_estimator: str = field(default="ebpo", metadata={"help": "ebpo advantage estimator: grpo, dr_grpo, rloo, ebpo, or module:attr"})
    ebpo_estimator_options: dict = field(default_factory=dict, metadata={"help": "options of the estimator, e.g. {'prior': 'running'}"})
    ebpo_weighting: str | None = field(default=None, metadata={"help": "advantage weighting, e.g. ha_dw"})
    ebpo_weighting_options: dict = field(default_factory=dict, metadata={"help": "options of the weighting"})


class EBPOGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with advantages from ebpo; same constructor."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.args
        if not isinstance(cfg, EBPOGRPOConfig):
            raise ValueError("EBPOGRPOTrainer needs an EBPOGRPOConfig (GRPOConfig plus the ebpo_* fields)")
        self.ebpo_estimator = build_estimator(
            cfg.ebpo_estimator, weighting=cfg.ebpo_weighting, weighting_options=cfg.ebpo_weighting_options or None,
            **cfg.ebpo_estimator_options,
        )  # fmt: skip
        if self.num_generations < self.ebpo_estimator.min_group_size:
            raise ValueError(f"{cfg.ebpo_estimator} needs num_generations >= {self.ebpo_estimator.min_group_size}")
        self._ebpo_rewards: torch.Tensor | None = None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):  # type: ignore[no-untyped-def]
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._ebpo_rewards = rewards_per_func  # (N_global, num_funcs), gathered over processes
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):  # type: ignore[no-untyped-def]
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        per_func = self._ebpo_rewards
        assert per_func is not None, "TRL did not call _calculate_rewards"
        rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)  # (N_global,)
        scorable = ~torch.isnan(per_func).all(dim=1)
        generations = self.num_generations if mode == "train" else self.num_generations_eval
        group_ids = torch.arange(rewards.numel(), device=rewards.device) // generations  # TRL's consecutive groups
        advantages = torch.zeros_like(rewards)
        est_adv, metrics = self.ebpo_estimator(rewards[scorable].cpu(), group_ids[scorable].cpu(), training=mode == "train")
        advantages[scorable] = est_adv.to(advantages)
        local = output["advantages"].shape[0]
        start = self.accelerator.process_index * local
        output["advantages"] = advantages[start : start + local].to(output["advantages"].dtype)
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        return output

    def _save_checkpoint(self, model, trial):  # type: ignore[no-untyped-def]
        super()._save_checkpoint(model, trial)
        if self.accelerator.is_main_process:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            torch.save(self.ebpo_estimator.state_dict(), os.path.join(folder, STATE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):  # type: ignore[no-untyped-def]
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, STATE_FILE)
        if not os.path.exists(path):
            raise ValueError(f"{resume_from_checkpoint} has no {STATE_FILE}: it was not written by EBPOGRPOTrainer")
        self.ebpo_estimator.load_state_dict(torch.load(path, weights_only=False))
