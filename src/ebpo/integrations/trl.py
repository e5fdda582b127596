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
With ``ebpo_topic_column="source"`` each completion's topic label (that
dataset column, gathered from every process) reaches the estimator as
``topic_ids`` (a stable hash, :func:`ebpo.grouping.stable_topic_ids`), which
the hierarchical prior (``ebpo_estimator_options={"hierarchical": True}``) uses.
Each completion's prompt key, the dataset column ``ebpo_prompt_column``
(default ``"prompt"``, the prompt itself; a chat prompt, a list of messages, is
keyed by its canonical JSON), gathered the same way, reaches the estimator as
``prompt_ids`` (:func:`ebpo.estimators.stable_prompt_ids`): ``spo`` and
``krpo`` with ``carry=True`` keep state per prompt across steps under that key,
the other estimators only check it (one prompt per group). Name a column of
problem ids (``ebpo_prompt_column="problem_id"``) when two rows can share a
prompt's text but not its problem, or one problem is asked in several wordings.

HA-DW's correctness (``ebpo_weighting="ha_dw"``, or any weighting whose
``reads_correctness`` is set): HA-DW weights by accuracy, and its batch
accuracy, group accuracies and anchor are success rates in [0, 1], which TRL's
reward (the weighted sum of every reward function: a format reward plus an
accuracy reward exceeds 1, a -1/1 verifier goes below 0) is not. The config
says where each completion's correctness comes from:
``ebpo_correctness_reward="NAME"`` (that reward function's own output, which
must lie in [0, 1]) and/or ``ebpo_correctness_threshold=T`` (correct when that
output, or else TRL's summed reward, is >= T). Without either, a weighting that
reads correctness is refused when the config is built, and a name that is not
one of the trainer's reward functions when the trainer is built; a
correctness source without such a weighting is refused too (it would be
ignored). With a threshold the correctness is always 0 or 1; a named function
returning a value outside [0, 1], or None for a completion another function
scored, raises at that step, naming the function.

GBMPO divergences in place of TRL's KL term: ``ebpo_divergence="prob_l2"``
(or ``log_l2``, ``neural_mirror`` with ``{"params_path": ...}``, ``kl`` with
``{"estimator": "k1"|"k2"|"k3"}``), weighted by TRL's own ``beta`` (which
must be > 0, so that TRL keeps its reference model and computes the
reference log-probs). Inside the loss we switch TRL's k3 term off
(``beta = 0`` for the duration of TRL's ``_compute_loss``), keep the
per-token log-probs TRL computed, and add ``beta * agg(D)`` where ``agg`` is
the aggregation of TRL's ``loss_type`` (``grpo``, ``bnpo``, ``dr_grpo``,
``dapo``: the same normaliser the installed TRL applies to its policy loss,
so the term is exactly where TRL's KL would be; ``dapo``'s changed in TRL
1.9.1, see :meth:`EBPOGRPOTrainer._ebpo_aggregate`). ``ebpo_divergence="kl"``
with ``k3`` therefore trains exactly like stock TRL with the same ``beta``
(tested over loss types, ``steps_per_generation``, gradient accumulation and
2 processes). TRL's ``use_bias_correction_kl`` multiplies the divergence by
the importance ratio exactly as it does the KL; TRL's default is off in TRL
1.0 to 1.9 and on from TRL 1.10 (read in each release's ``grpo_config.py``).
Its unbiasedness argument is specific to the reverse KL, so set it to False
for GBMPO's plain per-token penalty, as in the paper.
The term's global token mean is logged as ``ebpo/divergence``.

TRL settings the adapter maps or refuses (at ``EBPOGRPOConfig`` construction,
:func:`check_trl_settings`), because they act on the advantages or the loss it
replaces:

- ``scale_rewards`` (``"group"``, ``"batch"``, ``"none"``, or TRL's booleans)
  is ``ebpo_estimator="grpo"``'s ``scale``, with TRL's std epsilon (1e-4), so
  that ``grpo`` gives TRL's own advantages. Other estimators have their own
  normalisation: there only TRL's default ``"group"`` is accepted.
- ``multi_objective_aggregation="normalize_then_sum"`` is refused: the
  estimators take one reward per completion, the weighted sum of the reward
  functions (TRL's default ``"sum_then_normalize"``).
- ``use_liger_kernel=True`` with ``ebpo_divergence`` is refused on TRL 1.0 to
  1.13, whose ``compute_loss`` then calls ``compute_liger_loss`` (Liger's own
  k3 KL) instead of ``_compute_loss``. From TRL 1.14 the Liger path goes
  through ``_compute_loss`` and the divergence applies. Without a divergence
  every version is fine: Liger's loss reads the advantages this adapter sets.

Resuming: the estimator state is restored in ``_load_optimizer_and_scheduler``,
which transformers' ``Trainer`` calls on every backend when it resumes
(``_load_from_checkpoint`` is skipped under DeepSpeed).

Supported TRL versions: :data:`SUPPORTED_TRL`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from packaging.version import Version

from ebpo.divergences import build_divergence
from ebpo.estimators import build_estimator, stable_prompt_ids
from ebpo.grouping import stable_topic_ids
from ebpo.weighting import WEIGHTINGS

SUPPORTED_TRL = (Version("1.0"), Version("2.0"))  # [min, max)
STATE_FILE = "ebpo_estimator_state.pt"

try:
    import trl
    from accelerate.utils import gather_object
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("ebpo.integrations.trl needs TRL: pip install 'trl>=1.0,<2.0'") from exc

TRL_VERSION = Version(trl.__version__)
if not SUPPORTED_TRL[0] <= TRL_VERSION < SUPPORTED_TRL[1]:
    raise ImportError(
        f"ebpo.integrations.trl supports trl>={SUPPORTED_TRL[0]},<{SUPPORTED_TRL[1]}; installed trl {trl.__version__}"
    )

__all__ = ["EBPOGRPOConfig", "EBPOGRPOTrainer", "SUPPORTED_TRL", "DIVERGENCE_LOSS_TYPES", "check_trl_settings"]

# TRL loss types whose aggregation the divergence term reproduces.
DIVERGENCE_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")

# The releases where TRL's behaviour that the adapter mirrors changed (trl/trainer/grpo_trainer.py, read at
# every 1.x release from 1.0.0 to 1.16.0, patch releases included):
# - from 1.9.1 (a patch release; 1.9.0 has the old one), dapo's normaliser num_items_in_batch / num_processes (tokens of the whole generation batch) is
#   rescaled in training by gradient_accumulation_steps / steps_per_generation to one accumulation window;
# - up to 1.13, use_liger_kernel sends compute_loss to compute_liger_loss, which never calls _compute_loss.
DAPO_WINDOW_RESCALE_FROM = Version("1.9.1")
LIGER_CALLS_COMPUTE_LOSS_FROM = Version("1.14")

# TRL's own advantage settings, as options of the ebpo estimator that computes the same advantages. TRL
# (_generate_and_score_completions, every 1.x): A = (r - group mean) / (std + 1e-4), with the std of the
# group ("group"), of the whole batch ("batch") or no division ("none"). ebpo's grpo uses eps 1e-6 by
# default; here it takes TRL's 1e-4 unless ebpo_estimator_options sets eps.
TRL_ADVANTAGE_OPTIONS = {"grpo": lambda args: {"scale": args.scale_rewards, "eps": 1e-4}}


def check_trl_settings(args: Any, trl_version: Version = TRL_VERSION) -> None:
    """Refuse the TRL settings the adapter cannot honour with ``trl_version``: a ValueError saying what to change.

    ``args`` is an :class:`EBPOGRPOConfig` after TRL's own ``__post_init__`` (which maps ``scale_rewards``
    booleans to ``"group"``/``"none"``). Called by ``EBPOGRPOConfig.__post_init__``.
    """
    if args.multi_objective_aggregation != "sum_then_normalize":
        raise ValueError(
            f"multi_objective_aggregation={args.multi_objective_aggregation!r} normalises each reward function "
            "before summing; ebpo's estimators take one reward per completion (the weighted sum of the reward "
            "functions): use multi_objective_aggregation='sum_then_normalize' (TRL's default)"
        )
    if args.ebpo_estimator in TRL_ADVANTAGE_OPTIONS:
        if "scale" in args.ebpo_estimator_options:
            raise ValueError(
                f"ebpo_estimator={args.ebpo_estimator!r} takes its scale from TRL's scale_rewards: set "
                f"scale_rewards={args.ebpo_estimator_options['scale']!r} instead of ebpo_estimator_options['scale']"
            )
    elif args.scale_rewards != "group":
        raise ValueError(
            f"scale_rewards={args.scale_rewards!r} sets how TRL normalises its advantages, which "
            f"ebpo_estimator={args.ebpo_estimator!r} replaces with its own (it would be ignored): leave scale_rewards "
            f"at its default 'group' and use the estimator's options, or use ebpo_estimator='grpo', whose scale "
            "scale_rewards sets"
        )
    _check_correctness_source(args)
    if args.ebpo_divergence is None:
        return
    if args.beta == 0.0:
        raise ValueError(
            f"ebpo_divergence={args.ebpo_divergence!r} is weighted by beta, which is 0; set beta > 0 "
            "(e.g. 0.04) so that TRL keeps a reference model"
        )
    if args.loss_type not in DIVERGENCE_LOSS_TYPES:
        raise ValueError(f"ebpo_divergence supports loss_type in {list(DIVERGENCE_LOSS_TYPES)}, got {args.loss_type!r}")
    if args.use_liger_kernel and trl_version < LIGER_CALLS_COMPUTE_LOSS_FROM:
        raise ValueError(
            f"use_liger_kernel=True with ebpo_divergence={args.ebpo_divergence!r}: TRL {trl_version} then computes "
            "the loss with Liger's fused GRPO loss and its own k3 KL, never with the divergence; set "
            f"use_liger_kernel=False, drop ebpo_divergence, or use trl>={LIGER_CALLS_COMPUTE_LOSS_FROM}"
        )


def _check_correctness_source(args: Any) -> None:
    """A weighting that reads correctness (HA-DW) needs its source said; a source nothing reads is refused."""
    threshold = args.ebpo_correctness_threshold
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold)
    ):
        raise ValueError(f"ebpo_correctness_threshold must be a finite number, got {threshold!r}")
    weighting = args.ebpo_weighting
    reads = weighting is not None and bool(
        getattr(WEIGHTINGS.build(weighting, **(args.ebpo_weighting_options or {})), "reads_correctness", False)
    )
    given = args.ebpo_correctness_reward is not None or threshold is not None
    if reads and not given:
        raise ValueError(
            f"ebpo_weighting={weighting!r} weights each completion by its correctness, a success in [0, 1] (HA-DW's "
            "batch accuracy, group accuracies and anchor are success rates), which TRL's reward, the weighted sum of "
            "the reward functions, is not in general. Say where it comes from: ebpo_correctness_reward='NAME' (the "
            "reward function whose output, in [0, 1], is the correctness; NAME as TRL logs it, rewards/NAME/mean) "
            "and/or ebpo_correctness_threshold=T (correct when that function's output, or else TRL's summed reward, "
            "is >= T; e.g. 1.0 when an accuracy reward of 1 is added to format rewards, 0 for -1/1 rewards)"
        )
    if given and not reads:
        raise ValueError(
            "ebpo_correctness_reward / ebpo_correctness_threshold say where a weighting's correctness comes from, "
            f"but ebpo_weighting={weighting!r} does not read it (ha_dw does): it would be ignored; drop it"
        )


def _prompt_key(value: Any) -> Any:
    """A prompt column's value as a key whose text is the same in every process: strings and numbers as they are,
    anything else (a chat: a list of {"role", "content"} messages) as JSON with sorted keys."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=repr)


@dataclass
class EBPOGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus ebpo's estimator, weighting (see ``ebpo.build_estimator``) and divergence."""

    ebpo_estimator: str = field(
        default="ebpo",
        metadata={"help": "ebpo advantage estimator: grpo, dr_grpo, rloo, ebpo, jspo, spo, krpo, or module:attr"},
    )
    ebpo_estimator_options: dict = field(
        default_factory=dict, metadata={"help": "options of the estimator, e.g. {'prior': 'running'}"}
    )
    ebpo_weighting: str | None = field(default=None, metadata={"help": "advantage weighting, e.g. ha_dw"})
    ebpo_weighting_options: dict = field(default_factory=dict, metadata={"help": "options of the weighting"})
    ebpo_correctness_reward: str | None = field(
        default=None,
        metadata={
            "help": "the reward function whose output is each completion's correctness, in [0, 1], for a weighting "
            "that weights by it (ha_dw); its name as TRL logs it (rewards/NAME/mean: the function's __name__)"
        },
    )
    ebpo_correctness_threshold: float | None = field(
        default=None,
        metadata={
            "help": "a completion is correct (1, else 0) when its reward is >= this: the output of "
            "ebpo_correctness_reward if set, else TRL's reward (the weighted sum of the reward functions); for ha_dw"
        },
    )
    ebpo_topic_column: str | None = field(
        default=None,
        metadata={
            "help": "dataset column with each prompt's topic (any labels), passed to the estimator as topic ids; "
            "used by ebpo_estimator_options={'hierarchical': True}, ignored by the other estimators"
        },
    )
    ebpo_prompt_column: str = field(
        default="prompt",
        metadata={
            "help": "dataset column naming each prompt the same way at every step (the prompt itself by default; a "
            "problem id column is safer), hashed to the estimator's prompt ids; spo and krpo carry=True keep state "
            "per prompt under it, the other estimators check it"
        },
    )
    ebpo_divergence: str | None = field(
        default=None, metadata={"help": "replace TRL's KL term: kl, prob_l2, log_l2, neural_mirror (coefficient: beta)"}
    )
    ebpo_divergence_options: dict = field(default_factory=dict, metadata={"help": "options of the divergence"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_trl_settings(self)


class EBPOGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with advantages from ebpo; same constructor."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.args
        if not isinstance(cfg, EBPOGRPOConfig):
            raise ValueError("EBPOGRPOTrainer needs an EBPOGRPOConfig (GRPOConfig plus the ebpo_* fields)")
        trl_options = TRL_ADVANTAGE_OPTIONS.get(cfg.ebpo_estimator, lambda _: {})(cfg)
        self.ebpo_estimator = build_estimator(
            cfg.ebpo_estimator,
            weighting=cfg.ebpo_weighting,
            weighting_options=cfg.ebpo_weighting_options or None,
            **{**trl_options, **cfg.ebpo_estimator_options},
        )
        if self.num_generations < self.ebpo_estimator.min_group_size:
            raise ValueError(f"{cfg.ebpo_estimator} needs num_generations >= {self.ebpo_estimator.min_group_size}")
        self._ebpo_correctness_index: int | None = None  # the column of _calculate_rewards' output
        if cfg.ebpo_correctness_reward is not None:
            names = list(self.reward_func_names)
            found = [i for i, name in enumerate(names) if name == cfg.ebpo_correctness_reward]
            if len(found) != 1:
                raise ValueError(
                    f"ebpo_correctness_reward={cfg.ebpo_correctness_reward!r} must name exactly one of the reward "
                    f"functions {names} (as TRL names them: a function's __name__, a reward model's name); "
                    f"it names {len(found)}"
                )
            self._ebpo_correctness_index = found[0]
        self._ebpo_rewards: torch.Tensor | None = None
        self.ebpo_divergence = None
        self._ebpo_logps: torch.Tensor | None = None
        self._ebpo_capture = False
        if cfg.ebpo_divergence is not None:  # beta and loss_type checked by check_trl_settings
            self.ebpo_divergence = build_divergence(cfg.ebpo_divergence, **cfg.ebpo_divergence_options)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):  # type: ignore[no-untyped-def]
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._ebpo_rewards = rewards_per_func  # (N_global, num_funcs), gathered over processes
        return rewards_per_func

    def _generate(self, prompts):  # type: ignore[no-untyped-def]
        # TRL's continuous-batching (paged) generation ends with model.train() (TRL 1.0 to 1.16), which in
        # evaluation leaves the model in train mode for the rest of the eval loop: the next eval batch would
        # be buffered, scored and counted as training. Generation does not change the mode here.
        training = self.model.training
        try:
            return super()._generate(prompts)
        finally:
            self.model.train(training)

    def _generate_and_score_completions(self, inputs):  # type: ignore[no-untyped-def]
        # Read the mode before generating, as TRL does: generation may leave the model in train mode (above).
        mode = "train" if self.model.training else "eval"
        output = super()._generate_and_score_completions(inputs)
        per_func = self._ebpo_rewards
        assert per_func is not None, "TRL did not call _calculate_rewards"
        rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)  # (N_global,)
        scorable = ~torch.isnan(per_func).all(dim=1)
        generations = self.num_generations if mode == "train" else self.num_generations_eval
        group_ids = torch.arange(rewards.numel(), device=rewards.device) // generations  # TRL's consecutive groups
        advantages = torch.zeros_like(rewards)
        topic_ids = self._ebpo_topic_ids(inputs)  # (N_global,) or None
        prompt_ids = self._ebpo_prompt_ids(inputs)  # (N_global,)
        correctness = self._ebpo_correctness(per_func, rewards, scorable)  # (N_global,) or None
        est_adv, metrics = self.ebpo_estimator(
            rewards[scorable].cpu(),
            group_ids[scorable].cpu(),
            topic_ids=None if topic_ids is None else topic_ids[scorable.cpu()],
            correctness=None if correctness is None else correctness[scorable].cpu(),
            prompt_ids=prompt_ids[scorable.cpu()],
            training=mode == "train",
        )
        advantages[scorable] = est_adv.to(advantages)
        local = output["advantages"].shape[0]
        start = self.accelerator.process_index * local
        output["advantages"] = advantages[start : start + local].to(output["advantages"].dtype)
        logged = self._logs["advantages"]  # the completions table (log_completions): ours, not TRL's
        for _ in range(min(advantages.numel(), len(logged))):
            logged.pop()
        logged.extend(advantages.tolist())
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        return output

    def _ebpo_correctness(
        self, per_func: torch.Tensor, rewards: torch.Tensor, scorable: torch.Tensor
    ) -> torch.Tensor | None:
        """Each completion's correctness (N_global,) float64 from ``ebpo_correctness_reward`` / ``_threshold``.

        ``per_func`` (N_global, num_funcs) the reward functions' outputs (NaN: skipped), ``rewards`` (N_global,)
        their weighted sum, ``scorable`` (N_global,) bool: some function scored the completion.
        """
        cfg = self.args
        name, threshold = cfg.ebpo_correctness_reward, cfg.ebpo_correctness_threshold
        if name is None and threshold is None:
            return None
        if name is None:
            source = rewards
        else:
            source = per_func[:, self._ebpo_correctness_index]  # (N_global,) unweighted
            skipped = int((torch.isnan(source) & scorable).sum())
            if skipped:
                raise ValueError(
                    f"ebpo_correctness_reward={name!r} returned None for {skipped} completions that other reward "
                    f"functions scored; the weighting needs every scored completion's correctness: make {name!r} "
                    "score every completion, or drop ebpo_correctness_reward and set ebpo_correctness_threshold "
                    "alone (correct when TRL's summed reward is >= it)"
                )
        source = source.to(torch.float64)
        if threshold is not None:
            return (source >= threshold).to(torch.float64)
        low, high = (v.item() for v in source[scorable].aminmax()) if bool(scorable.any()) else (0.0, 0.0)
        if low < 0 or high > 1:
            raise ValueError(
                f"ebpo_correctness_reward={name!r} is taken as each completion's correctness, a success in [0, 1], "
                f"but it returned values in [{low}, {high}]; set ebpo_correctness_threshold=T to count a completion "
                f"as correct when {name!r} returns >= T"
            )
        return source

    def _ebpo_topic_ids(self, inputs: list[dict]) -> torch.Tensor | None:
        """Topic ids of every process's completions (N_global,), hashed from ``ebpo_topic_column`` (stable across ranks)."""
        column = self.args.ebpo_topic_column
        if column is None:
            return None
        missing = [i for i, row in enumerate(inputs) if column not in row]
        if missing:
            raise ValueError(
                f"ebpo_topic_column={column!r} is not a column of the training data (row {missing[0]} has {sorted(inputs[missing[0]])})"
            )
        labels = gather_object(
            [row[column] for row in inputs]
        )  # every process's rows, in process order like the rewards
        return stable_topic_ids(labels)

    def _ebpo_prompt_ids(self, inputs: list[dict]) -> torch.Tensor:
        """Prompt ids of every process's completions (N_global,), hashed from ``ebpo_prompt_column`` (stable across
        ranks and steps); a chat prompt (a list of messages) by its canonical JSON."""
        column = self.args.ebpo_prompt_column
        missing = [i for i, row in enumerate(inputs) if column not in row]
        if missing:
            raise ValueError(
                f"ebpo_prompt_column={column!r} is not a column of the training data (row {missing[0]} has "
                f"{sorted(inputs[missing[0]])}); name the column that identifies each prompt across steps"
            )
        keys = gather_object([_prompt_key(row[column]) for row in inputs])  # every process's rows, in process order
        return stable_prompt_ids(keys)

    def _save_checkpoint(self, model, trial):  # type: ignore[no-untyped-def]
        super()._save_checkpoint(model, trial)
        if self.args.should_save:  # every process that writes the checkpoint (save_on_each_node: one per node)
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            torch.save(self.ebpo_estimator.state_dict(), os.path.join(folder, STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):  # type: ignore[no-untyped-def]
        # Restored here, not in _load_from_checkpoint: transformers' Trainer._inner_training_loop calls this on
        # every backend when it resumes, while under DeepSpeed it loads the weights with
        # deepspeed_load_checkpoint and never calls _load_from_checkpoint (read in transformers 4.56 to 5.25).
        # TRL restores its own trainer state here too. transformers 4.x and 5.0 also call it, with None, when
        # training starts from scratch.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.exists(path):
            raise ValueError(f"{checkpoint} has no {STATE_FILE}: it was not written by EBPOGRPOTrainer")
        from ebpo.fileio import load_tensors  # weights_only: a checkpoint folder is never unpickled

        self.ebpo_estimator.load_state_dict(load_tensors(path, what="ebpo estimator state"))

    # ------------------------------------------------------------ divergence
    def _get_per_token_logps_and_entropies(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._ebpo_capture:  # the call inside _compute_loss: keep the log-probs that carry the gradient
            self._ebpo_logps = out[0]
        return out

    def _compute_loss(self, model, inputs):  # type: ignore[no-untyped-def]
        if self.ebpo_divergence is None:
            return super()._compute_loss(model, inputs)
        beta = self.beta
        self.beta, self._ebpo_capture, self._ebpo_logps = 0.0, True, None
        try:  # TRL's policy loss without its KL term
            loss = super()._compute_loss(model, inputs)
        finally:
            self.beta, self._ebpo_capture = beta, False
        logps, self._ebpo_logps = self._ebpo_logps, None
        assert logps is not None, "TRL's _compute_loss did not call _get_per_token_logps_and_entropies"
        mask = (
            inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        )
        per_token = self.ebpo_divergence(logps, inputs["ref_per_token_logps"].to(logps))  # (B, T)
        if self.args.use_bias_correction_kl:  # TRL's option, applied to the divergence as to its KL
            per_token = per_token * self._ebpo_importance_weight(logps, inputs, mask)
        loss = loss + beta * self._ebpo_aggregate(per_token, mask, inputs)
        totals = self.accelerator.reduce(
            torch.stack([(per_token.detach() * mask).sum(), mask.sum().float()]), reduction="sum"
        )
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["ebpo/divergence"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        return loss

    def _ebpo_importance_weight(self, logps: torch.Tensor, inputs: dict, mask: torch.Tensor) -> torch.Tensor:
        """pi / pi_old per token, or its masked geometric mean per sequence (TRL's importance_sampling_level)."""
        old = inputs.get("old_per_token_logps")
        log_ratio = logps - (logps.detach() if old is None else old)
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        return torch.exp(log_ratio)

    def _ebpo_aggregate(self, per_token: torch.Tensor, mask: torch.Tensor, inputs: dict) -> torch.Tensor:
        """``per_token`` (B, T) reduced with the normaliser TRL's ``loss_type`` applies to its policy loss."""
        training = self.model.training
        accumulation = self.current_gradient_accumulation_steps if training else 1.0
        masked = per_token * mask
        if self.loss_type == "grpo":  # mean over sequences of each sequence's token mean
            return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if self.loss_type == "bnpo":  # token mean over this process's batch
            return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":  # constant normaliser: sequences x max completion length
            return masked.sum() / (per_token.size(0) * self.max_completion_length) / accumulation
        # dapo: the completion tokens of the whole generation batch (all processes), per process; from TRL 1.9.1
        # rescaled in training to one accumulation window (TRL 1.0 to 1.9.0 do not: with steps_per_generation 4 and
        # no accumulation their dapo loss is a quarter of 1.9.1's, and so is their KL's weight).
        normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if training and TRL_VERSION >= DAPO_WINDOW_RESCALE_FROM:
            normaliser = normaliser * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return masked.sum() / normaliser
