"""TRL adapter: the advantages TRL trains on are ebpo's, and the estimator state survives checkpoint/resume."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from ebpo import build_estimator  # noqa: E402
from ebpo.integrations.trl import STATE_FILE, EBPOGRPOConfig, EBPOGRPOTrainer  # noqa: E402
from ebpo.models.loading import TinyLlamaSpec, build_tiny_llama  # noqa: E402
from ebpo.models.tokenizer import CharTokenizer  # noqa: E402
from ebpo.tasks.arithmetic import ArithmeticTask  # noqa: E402


def exact(completions, answer, **_):
    return [float(c.strip().split("\n")[0].strip() == a) for c, a in zip(completions, answer)]


class Recording(EBPOGRPOTrainer):
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.recorded = getattr(self, "recorded", []) + [(self._ebpo_rewards.sum(1).clone(), output["advantages"].clone())]
        return output


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DISABLED", "true")
    tokenizer = CharTokenizer()
    tokenizer.padding_side = "left"
    model = build_tiny_llama(TinyLlamaSpec(), tokenizer, seed=0)
    problems = ArithmeticTask(num_train=64, num_eval=4, max_digits=1).train_problems()
    dataset = datasets.Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in problems])
    return model, tokenizer, dataset, tmp_path


def make_args(out, **extra):
    return EBPOGRPOConfig(
        output_dir=str(out), max_steps=3, learning_rate=1e-3, beta=0.0, per_device_train_batch_size=8,
        num_generations=4, max_completion_length=4, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
        seed=0, save_strategy="steps", save_steps=1, disable_tqdm=True,
        ebpo_estimator="ebpo", ebpo_estimator_options={"prior": "running"}, ebpo_weighting="ha_dw", **extra,
    )  # fmt: skip


def test_trl_trains_on_ebpo_advantages_and_resumes_the_estimator(setup):
    model, tokenizer, dataset, tmp = setup
    trainer = Recording(model=model, reward_funcs=[exact], args=make_args(tmp / "a"), train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    replay = build_estimator("ebpo", prior="running", weighting="ha_dw")
    for rewards, used in trainer.recorded:
        expected, _ = replay(rewards.cpu(), torch.arange(rewards.numel()) // 4)
        assert torch.allclose(used.cpu().double(), expected.double(), atol=1e-6)
    assert replay.state_dict() == trainer.ebpo_estimator.state_dict()
    assert any(k.startswith("ebpo/") for k in trainer.state.log_history[0])  # ebpo's metrics reach TRL's logs

    saved = torch.load(tmp / "a" / "checkpoint-1" / STATE_FILE, weights_only=False)
    assert saved["estimator_state"]["group_stats"]["count"] == 2.0  # one step of 2 prompts
    resumed = EBPOGRPOTrainer(model=build_tiny_llama(TinyLlamaSpec(), tokenizer, seed=0), reward_funcs=[exact], args=make_args(tmp / "a"), train_dataset=dataset, processing_class=tokenizer)
    resumed._load_from_checkpoint(str(tmp / "a" / "checkpoint-1"))
    assert resumed.ebpo_estimator.state_dict() == saved
