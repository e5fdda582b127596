"""TRL adapter: each completion's prompt key (``ebpo_prompt_column``) reaches the estimator as ``prompt_ids``.

SPO keeps a Beta tracker per prompt across steps, so it needs a key that names the same prompt at every step;
the adapter hashes the dataset column with :func:`ebpo.estimators.stable_prompt_ids`, gathered like the rewards.
"""

from __future__ import annotations

import pytest
import torch

from ebpo.estimators import stable_prompt_ids

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _binary_reward(completions, **kwargs):
    """0/1 rewards that differ within groups even for an untrained model."""
    return [float(len(c) % 2) for c in completions]


def _parts(tmp_path, monkeypatch, **extra):
    from runs import trl_args

    from ebpo.integrations.trl import EBPOGRPOTrainer
    from ebpo.models.loading import TinyLlamaSpec, build_tiny_llama
    from ebpo.models.tokenizer import CharTokenizer
    from ebpo.tasks.arithmetic import ArithmeticTask

    class Recording(EBPOGRPOTrainer):
        """Keeps the prompts of every batch the estimator saw (this process's rows; one process here)."""

        def _generate_and_score_completions(self, inputs):
            self.seen_prompts = [*getattr(self, "seen_prompts", []), *(row["prompt"] for row in inputs)]
            return super()._generate_and_score_completions(inputs)

    monkeypatch.setenv("WANDB_DISABLED", "true")
    tokenizer = CharTokenizer()
    tokenizer.padding_side = "left"
    problems = ArithmeticTask(num_train=16, num_eval=4, max_digits=1).train_problems()
    dataset = datasets.Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in problems])
    options = dict(max_steps=2, ebpo_estimator="spo", ebpo_estimator_options={}, ebpo_weighting=None)
    args = trl_args(tmp_path / "trl", **{**options, **extra})
    trainer = Recording(
        model=build_tiny_llama(TinyLlamaSpec(), tokenizer, seed=0),
        reward_funcs=[_binary_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    return trainer, dataset


@pytest.mark.parametrize(("estimator", "options"), [("spo", {}), ("krpo", {"carry": True})])
def test_per_prompt_state_is_keyed_by_the_prompt_column(tmp_path, monkeypatch, estimator, options):
    """2 steps through TRL: SPO's tracker (KRPO's carried filters) holds exactly the hashed prompts the batches
    carried."""
    trainer, dataset = _parts(tmp_path, monkeypatch, ebpo_estimator=estimator, ebpo_estimator_options=options)
    trainer.train()
    tracked = trainer.ebpo_estimator.estimator.table.keys
    assert len(trainer.seen_prompts) == 2 * 8  # 2 steps x 8 completions (2 prompts x 4 generations)
    expected = torch.unique(stable_prompt_ids(trainer.seen_prompts))
    assert torch.equal(tracked, expected)  # the table's keys are sorted and unique
    assert set(tracked.tolist()) <= set(stable_prompt_ids(list(dataset["prompt"])).tolist())
    assert any(key.startswith(f"{estimator}/") for key in trainer.state.log_history[0])


def test_a_missing_prompt_column_is_refused_with_its_name(tmp_path, monkeypatch):
    trainer, _ = _parts(tmp_path, monkeypatch, max_steps=1, ebpo_prompt_column="problem_id")
    with pytest.raises(ValueError, match=r"ebpo_prompt_column='problem_id' is not a column.*'answer', 'prompt'"):
        trainer.train()


def test_a_chat_prompt_is_keyed_by_its_canonical_json():
    """Messages (dicts) key by sorted JSON: the same chat gives the same key whatever its dicts' key order."""
    from ebpo.integrations.trl import _prompt_key

    chat = [{"role": "user", "content": "1+1?"}]
    reordered = [{"content": "1+1?", "role": "user"}]
    assert _prompt_key(chat) == _prompt_key(reordered) == '[{"content": "1+1?", "role": "user"}]'
    assert _prompt_key("1+1?") == "1+1?"
    assert _prompt_key(chat) != _prompt_key([{"role": "user", "content": "2+2?"}])
