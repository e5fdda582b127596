"""TRL adapter under the settings TRL users run: resume under DeepSpeed, scale_rewards, Liger, eval during training.

Each test names the TRL behaviour it depends on; the behaviour was read in every TRL 1.x release
(trl/trainer/grpo_trainer.py and grpo_config.py, 1.0.0 to 1.16.0) and transformers 4.56 to 5.25.
"""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from packaging.version import Version  # noqa: E402
from runs import trl_args  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl_ddp_worker import prompt_dataset, tiny_tokenizer, varied  # noqa: E402

import ebpo.integrations.trl as adapter  # noqa: E402
from ebpo.integrations.trl import TRL_VERSION, EBPOGRPOTrainer, check_trl_settings  # noqa: E402
from ebpo.models.loading import TinyLlamaSpec, build_tiny_llama  # noqa: E402


@pytest.fixture(autouse=True)
def _no_trackers(monkeypatch):
    monkeypatch.setenv("WANDB_DISABLED", "true")


def make_args(out, **extra):
    """trl_args; with HA-DW (its default) the correctness is the reward (varied: 0, 1 or 2) >= 1."""
    hadw = extra.get("ebpo_weighting", "ha_dw") == "ha_dw"
    return trl_args(out, **{**({"ebpo_correctness_threshold": 1.0} if hadw else {}), **extra})


def make_trainer(trainer_cls, args, seed=0, **kwargs):
    tokenizer = tiny_tokenizer()
    return trainer_cls(
        model=build_tiny_llama(TinyLlamaSpec(), tokenizer, seed=seed),
        reward_funcs=[varied],
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
        **kwargs,
    )


# ------------------------------------------------------------------ resume under every backend


class _StopAtGeneration(Exception):
    pass


class StateAtFirstGeneration(EBPOGRPOTrainer):
    """Records the estimator state when the resumed run first generates, then stops (no step is needed)."""

    def _generate_and_score_completions(self, inputs):
        self.state_at_generation = copy.deepcopy(self.ebpo_estimator.state_dict())
        raise _StopAtGeneration


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One step of the ebpo estimator (running prior, HA-DW), saved: the checkpoint and the state it holds."""
    out = tmp_path_factory.mktemp("resume")
    trainer = make_trainer(EBPOGRPOTrainer, make_args(out, save_strategy="steps", save_steps=1))
    trainer.train()
    return out / "checkpoint-1", copy.deepcopy(trainer.ebpo_estimator.state_dict())


@pytest.mark.parametrize("backend", ["default", "deepspeed"])
def test_resume_restores_the_estimator_state_on_every_backend(checkpoint, backend, tmp_path, monkeypatch):
    """transformers' Trainer never calls _load_from_checkpoint under DeepSpeed (it calls deepspeed_load_checkpoint).

    The DeepSpeed branch of Trainer.train / _inner_training_loop is taken on the CPU: is_deepspeed_enabled is set
    and the two DeepSpeed calls are stand-ins (an optimizer and scheduler as without DeepSpeed, a weight load that
    only records it ran). What DeepSpeed itself does (ZeRO partitioning, its engine checkpoint) needs a GPU.
    """
    import transformers.trainer

    folder, saved = checkpoint
    assert saved["estimator_state"]["group_stats"]["count"] == 2.0  # one step of 2 prompts
    calls = []
    original_load = EBPOGRPOTrainer._load_from_checkpoint
    monkeypatch.setattr(
        EBPOGRPOTrainer,
        "_load_from_checkpoint",
        lambda self, *a, **k: (calls.append("_load_from_checkpoint"), original_load(self, *a, **k))[1],
    )
    trainer = make_trainer(StateAtFirstGeneration, make_args(tmp_path, max_steps=2), seed=1)
    if backend == "deepspeed":

        def deepspeed_init(trainer, num_training_steps, **_):
            calls.append("deepspeed_init")
            trainer.create_optimizer_and_scheduler(num_training_steps=num_training_steps)
            return trainer.optimizer, trainer.lr_scheduler

        monkeypatch.setattr(trainer, "is_deepspeed_enabled", True)
        monkeypatch.setattr(transformers.trainer, "deepspeed_init", deepspeed_init)
        monkeypatch.setattr(
            transformers.trainer, "deepspeed_load_checkpoint", lambda *a, **k: calls.append("deepspeed_load_checkpoint")
        )
        # imported by transformers only when deepspeed is installed; its scheduler is never one here
        monkeypatch.setattr(
            transformers.trainer, "DeepSpeedSchedulerWrapper", type("NotDeepSpeed", (), {}), raising=False
        )
    with pytest.raises(_StopAtGeneration):
        trainer.train(resume_from_checkpoint=str(folder))
    if backend == "deepspeed":  # the branch was taken: DeepSpeed's load, never _load_from_checkpoint
        assert calls == ["deepspeed_init", "deepspeed_load_checkpoint"]
    else:
        assert calls == ["_load_from_checkpoint"]
    assert trainer.state_at_generation == saved


def test_resume_from_a_checkpoint_without_the_estimator_state_is_refused(checkpoint, tmp_path):
    folder, _ = checkpoint
    foreign = tmp_path / "checkpoint-1"
    shutil.copytree(folder, foreign)
    (foreign / adapter.STATE_FILE).unlink()
    trainer = make_trainer(StateAtFirstGeneration, make_args(tmp_path, max_steps=2))
    with pytest.raises(ValueError, match="was not written by EBPOGRPOTrainer"):
        trainer.train(resume_from_checkpoint=str(foreign))


class Payload:
    """Unpickling this creates directory ``marker``: the stand-in for arbitrary code."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_resume_never_unpickles_a_crafted_estimator_state(checkpoint, tmp_path):
    folder, _ = checkpoint
    crafted = tmp_path / "checkpoint-1"
    shutil.copytree(folder, crafted)
    torch.save({"evil": Payload(tmp_path / "live")}, tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)
    assert (tmp_path / "live").is_dir()  # the payload does run its code when fully unpickled
    torch.save({"evil": Payload(tmp_path / "pwned")}, crafted / adapter.STATE_FILE)
    trainer = make_trainer(StateAtFirstGeneration, make_args(tmp_path, max_steps=2))
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        trainer.train(resume_from_checkpoint=str(crafted))
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------ scale_rewards and what cannot be honoured


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none", True, False])
def test_scale_rewards_gives_the_grpo_estimator_trls_own_advantages(scale_rewards, tmp_path, monkeypatch):
    """Oracle: TRL's own advantages, computed by GRPOTrainer in the same call before the adapter replaces them."""
    trl_advantages, ours = [], []
    original = GRPOTrainer._generate_and_score_completions

    def recording(self, inputs):
        output = original(self, inputs)
        trl_advantages.append(output["advantages"].clone())
        return output

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", recording)

    class Recording(EBPOGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            ours.append(output["advantages"].clone())
            return output

    args = make_args(
        tmp_path, ebpo_estimator="grpo", ebpo_estimator_options={}, ebpo_weighting=None, scale_rewards=scale_rewards
    )
    trainer = make_trainer(Recording, args)
    trainer.train()
    assert len(ours) == len(trl_advantages) == 1
    assert trl_advantages[0].abs().max() > 0.1  # the batch has groups with a signal
    torch.testing.assert_close(ours[0], trl_advantages[0], rtol=0, atol=1e-5)  # float32 TRL vs float64 ebpo
    # the completions table (log_completions) shows the advantages trained on
    assert list(trainer._logs["advantages"])[-ours[0].numel() :] == pytest.approx(ours[0].tolist())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"multi_objective_aggregation": "normalize_then_sum"}, "multi_objective_aggregation='normalize_then_sum'"),
        ({"scale_rewards": "batch"}, "scale_rewards='batch' sets how TRL normalises"),
        ({"scale_rewards": False}, "scale_rewards='none' sets how TRL normalises"),
        (
            {"ebpo_estimator": "grpo", "ebpo_estimator_options": {"scale": "none"}, "ebpo_weighting": None},
            "set scale_rewards='none' instead",
        ),
    ],
)
def test_trl_settings_the_adapter_would_ignore_are_refused_at_construction(extra, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **extra)


LIGER = {"use_liger_kernel": True, "beta": 0.1, "ebpo_divergence": "kl"}


@pytest.mark.parametrize(
    ("trl_version", "refused"),
    [("1.0.0", True), ("1.9.2", True), ("1.13.0", True), ("1.14.0", False), ("1.16.0", False)],
)
def test_liger_with_a_divergence_is_refused_where_trl_bypasses_compute_loss(trl_version, refused, tmp_path):
    """TRL 1.0 to 1.13: use_liger_kernel sends compute_loss to compute_liger_loss (Liger's k3 KL), not _compute_loss."""
    args = make_args(tmp_path)  # valid for every version; then the Liger settings, checked as that version would
    args.use_liger_kernel, args.beta, args.ebpo_divergence = True, 0.1, "kl"
    if refused:
        with pytest.raises(ValueError, match=f"TRL {trl_version} then computes the loss with Liger"):
            check_trl_settings(args, Version(trl_version))
    else:
        check_trl_settings(args, Version(trl_version))
    args.ebpo_divergence = None  # without a divergence Liger's loss reads the adapter's advantages: allowed
    check_trl_settings(args, Version(trl_version))


def test_liger_with_a_divergence_on_the_installed_trl(tmp_path):
    if TRL_VERSION < adapter.LIGER_CALLS_COMPUTE_LOSS_FROM:
        with pytest.raises(ValueError, match="computes the loss with Liger"):
            make_args(tmp_path, **LIGER)
    else:
        assert make_args(tmp_path, **LIGER).use_liger_kernel


# ------------------------------------------------------------------ eval batches


class ContinuousBatchingLike(EBPOGRPOTrainer):
    """Generation that leaves the model in train mode, as TRL's continuous-batching (paged) path does in
    ``_generate_single_turn`` (1.0 to 1.16: ``unwrapped_model.train()`` after ``generate_batch``). That path
    itself runs on a CPU but takes minutes per batch for the tiny model."""

    def _generate_single_turn(self, *args, **kwargs):
        output = super()._generate_single_turn(*args, **kwargs)
        self.model.train()
        return output


def test_eval_batches_never_update_the_estimator_even_if_generation_sets_train_mode(tmp_path):
    args = make_args(
        tmp_path, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=8, num_generations_eval=4
    )
    trainer = make_trainer(ContinuousBatchingLike, args, eval_dataset=prompt_dataset(4))
    trainer.train()
    evaluated = [row for row in trainer.state.log_history if "eval_loss" in row]
    assert evaluated  # the evaluation ran: 4 prompts x 4 completions, 2 batches of 2 prompts
    # one training step of 2 prompts; the 4 evaluated prompts are not in the running prior (TRL's own
    # mode read would send the second eval batch down the training path if generation left train mode on)
    assert trainer.ebpo_estimator.state_dict()["estimator_state"]["group_stats"]["count"] == 2.0
    assert "eval_ebpo/shrinkage" in evaluated[0]  # eval's estimator metrics are logged as eval's


# ------------------------------------------------------------------ the docstring's statement of TRL's defaults


def test_docstring_gives_trls_use_bias_correction_kl_default_by_version():
    doc = " ".join(adapter.__doc__.split())
    assert "TRL's default is off in TRL 1.0 to 1.9 and on from TRL 1.10" in doc
    installed_default = GRPOConfig.__dataclass_fields__["use_bias_correction_kl"].default
    assert installed_default == (TRL_VERSION >= Version("1.10"))  # the statement holds for the installed TRL
