"""TRL adapter: HA-DW's correctness when TRL's reward is not a success rate.

TRL's reward is the weighted sum of every reward function (``_calculate_rewards`` then ``reward_weights``), so a
format reward plus an accuracy reward exceeds 1 and a -1/1 verifier goes below 0; HA-DW's accuracy and anchor
are success rates in [0, 1]. The config says where each completion's correctness comes from
(``ebpo_correctness_reward``, ``ebpo_correctness_threshold``); without it HA-DW is refused when the config is
built, never hours into a run.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from runs import trl_args  # noqa: E402
from trl_ddp_worker import prompt_dataset, tiny_tokenizer  # noqa: E402

from ebpo import build_estimator  # noqa: E402
from ebpo.integrations.trl import EBPOGRPOTrainer  # noqa: E402
from ebpo.models.loading import TinyLlamaSpec, build_tiny_llama  # noqa: E402


@pytest.fixture(autouse=True)
def _no_trackers(monkeypatch):
    monkeypatch.setenv("WANDB_DISABLED", "true")


def signed(completions, **_):
    """A -1/1 verifier (as verl's DAPO math scorer): +1 when the completion's length is even."""
    return [1.0 if len(c) % 2 == 0 else -1.0 for c in completions]


def verified(completions, **_):
    """A 0/1 verifier whose outcome varies within groups for an untrained model."""
    return [float(len(c) % 3 == 0) for c in completions]


def formatted(completions, **_):
    """A format reward added to the verifier's: TRL's summed reward then reaches 2."""
    return [1.0 if len(c) % 2 == 1 else 0.0 for c in completions]


def partial(completions, **_):
    """Scores only some completions (None: TRL's "does not apply"), as a multi-task verifier does."""
    return [None if i % 2 else 1.0 for i, _ in enumerate(completions)]


def out_of_range(completions, **_):
    return [2.0 if len(c) % 2 else 0.0 for c in completions]


class Recording(EBPOGRPOTrainer):
    """Keeps each step's per-function rewards (N, funcs) and the advantages TRL trains on."""

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.recorded = getattr(self, "recorded", []) + [(self._ebpo_rewards.clone(), output["advantages"].clone())]
        return output


def train(tmp_path, reward_funcs, steps=2, **extra):
    tokenizer = tiny_tokenizer()
    args = trl_args(tmp_path, max_steps=steps, **extra)  # EBPO running prior + HA-DW (trl_args' defaults)
    trainer = Recording(
        model=build_tiny_llama(TinyLlamaSpec(), tokenizer, seed=0),
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


def replay(trainer, correctness_of):
    """ebpo's core on each recorded step, with the correctness the settings define; checks TRL trained on it."""
    reference = build_estimator("ebpo", prior="running", weighting="ha_dw")
    for per_func, used in trainer.recorded:
        rewards = per_func.nansum(dim=1)  # (N,) TRL's weighted sum, weights 1
        expected, _ = reference(rewards, torch.arange(rewards.numel()) // 4, correctness=correctness_of(per_func))
        assert torch.allclose(used.double(), expected.double(), atol=1e-6)
    assert reference.state_dict() == trainer.ebpo_estimator.state_dict()
    anchor = reference.state_dict()["weighting_state"]["anchor"]
    assert 0.0 <= anchor <= 1.0  # a success rate, whatever the rewards' scale
    return reference


# ------------------------------------------------------------------ refused when the config is built


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, r"ebpo_weighting='ha_dw' weights each completion by its correctness.*ebpo_correctness_reward='NAME'"),
        ({"ebpo_weighting": None, "ebpo_correctness_threshold": 0.5}, "does not read it .* it would be ignored"),
        ({"ebpo_weighting": None, "ebpo_correctness_reward": "verified"}, "it would be ignored"),
        ({"ebpo_correctness_threshold": math.nan}, "must be a finite number"),
        ({"ebpo_correctness_threshold": "0.5"}, "must be a finite number"),
        ({"ebpo_correctness_threshold": 0.5, "ebpo_weighting_options": {"lam": -1.0}}, "ha_dw lam must be > 0"),
    ],
)
def test_correctness_settings_are_checked_when_the_config_is_built(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        trl_args(tmp_path, **extra)


def test_a_correctness_reward_that_is_not_a_reward_function_is_refused(tmp_path):
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match=r"must name exactly one of the reward functions \['verified', 'formatted'\]"):
        Recording(
            model=build_tiny_llama(TinyLlamaSpec(), tokenizer, seed=0),
            reward_funcs=[verified, formatted],
            args=trl_args(tmp_path, ebpo_correctness_reward="accuracy"),
            train_dataset=prompt_dataset(),
            processing_class=tokenizer,
        )


# ------------------------------------------------------------------ training


def test_minus_one_one_rewards_train_with_a_threshold(tmp_path):
    """A -1/1 verifier: correct when the reward is >= 0; 2 steps, TRL trains on HA-DW with that correctness."""
    trainer = train(tmp_path, [signed], ebpo_correctness_threshold=0.0)
    assert {v for per_func, _ in trainer.recorded for v in per_func.unique().tolist()} == {-1.0, 1.0}
    replay(trainer, lambda per_func: (per_func[:, 0] >= 0).double())


def test_rewards_summing_past_one_weight_by_the_named_verifier(tmp_path):
    """verified + formatted reaches 2: the correctness is the verifier's own output, not the sum."""
    trainer = train(tmp_path, [verified, formatted], ebpo_correctness_reward="verified")
    assert max(per_func.sum(1).max().item() for per_func, _ in trainer.recorded) == 2.0
    replay(trainer, lambda per_func: per_func[:, 0].double())


def test_rewards_summing_past_one_with_a_threshold_on_the_sum(tmp_path):
    trainer = train(tmp_path, [verified, formatted], steps=1, ebpo_correctness_threshold=1.5)
    replay(trainer, lambda per_func: (per_func.sum(1) >= 1.5).double())


@pytest.mark.parametrize(
    ("funcs", "extra", "message"),
    [
        ([out_of_range], {"ebpo_correctness_reward": "out_of_range"}, r"returned values in \[0.0, 2.0\].*threshold"),
        ([partial, verified], {"ebpo_correctness_reward": "partial"}, "returned None for 4 completions"),
    ],
)
def test_a_named_verifier_that_breaks_its_contract_stops_at_that_step(tmp_path, funcs, extra, message):
    """A verifier outside [0, 1] or skipping a scored completion is a verifier bug: it stops the run, named."""
    with pytest.raises(ValueError, match=message):
        train(tmp_path, funcs, steps=1, **extra)
