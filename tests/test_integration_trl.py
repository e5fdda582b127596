"""TRL adapter: the advantages TRL trains on are ebpo's, the estimator state is saved with TRL's checkpoints and is
the same on every process, GBMPO divergences replace TRL's KL.

Resuming (on every backend), TRL's settings and the equivalence with stock TRL: test_trl_settings.py and
test_trl_equivalence.py.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from runs import trl_args  # noqa: E402
from trl_ddp_worker import (  # noqa: E402
    check_equivalence,
    equivalence_table,
    run_two_processes,
    saved_tiny_model,
    varied,
)

from ebpo import build_estimator  # noqa: E402
from ebpo.integrations.trl import STATE_FILE, EBPOGRPOTrainer  # noqa: E402
from ebpo.models.loading import TinyLlamaSpec, build_tiny_llama  # noqa: E402
from ebpo.models.tokenizer import CharTokenizer  # noqa: E402
from ebpo.tasks.arithmetic import ArithmeticTask  # noqa: E402


def exact(completions, answer, **_):
    return [float(c.strip().split("\n")[0].strip() == a) for c, a in zip(completions, answer)]


class Recording(EBPOGRPOTrainer):
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.recorded = getattr(self, "recorded", []) + [
            (self._ebpo_rewards.sum(1).clone(), output["advantages"].clone())
        ]
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
    """With HA-DW (trl_args' default) the correctness is the reward >= 1 unless a test says otherwise."""
    hadw = extra.get("ebpo_weighting", "ha_dw") == "ha_dw"
    correctness = {"ebpo_correctness_threshold": 1.0} if hadw else {}
    return trl_args(out, **{**dict(max_steps=3, save_strategy="steps", save_steps=1), **correctness, **extra})


def test_trl_trains_on_ebpo_advantages_and_saves_the_estimator(setup):
    model, tokenizer, dataset, tmp = setup
    args = make_args(tmp / "a", ebpo_correctness_reward="exact", ebpo_correctness_threshold=None)  # exact is 0/1
    trainer = Recording(model=model, reward_funcs=[exact], args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    replay = build_estimator("ebpo", prior="running", weighting="ha_dw")
    for rewards, used in trainer.recorded:
        expected, _ = replay(rewards.cpu(), torch.arange(rewards.numel()) // 4)
        assert torch.allclose(used.cpu().double(), expected.double(), atol=1e-6)
    assert replay.state_dict() == trainer.ebpo_estimator.state_dict()
    assert any(k.startswith("ebpo/") for k in trainer.state.log_history[0])  # ebpo's metrics reach TRL's logs

    saved = torch.load(tmp / "a" / "checkpoint-1" / STATE_FILE, weights_only=True)
    assert saved["estimator_state"]["group_stats"]["count"] == 2.0  # one step of 2 prompts
    final = torch.load(tmp / "a" / "checkpoint-3" / STATE_FILE, weights_only=True)
    assert final == trainer.ebpo_estimator.state_dict()


def _train(trainer_cls, tmp, tokenizer, dataset, **extra):
    """Two steps (2 accumulation micro-steps each) from the same saved tiny model; TRL loads its reference from the path."""
    args = make_args(
        tmp,
        **{
            "save_strategy": "no",
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2,
            **extra,
        },
    )
    model = saved_tiny_model(tmp.parent, tokenizer)
    trainer = trainer_cls(
        model=model, reward_funcs=[varied], args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    return trainer


def test_divergence_prob_l2_replaces_the_kl_term(setup):
    _, tokenizer, dataset, tmp = setup
    kl = _train(EBPOGRPOTrainer, tmp / "kl", tokenizer, dataset, beta=50.0)
    l2 = _train(EBPOGRPOTrainer, tmp / "l2", tokenizer, dataset, beta=50.0, ebpo_divergence="prob_l2")
    a, b = dict(kl.model.named_parameters()), dict(l2.model.named_parameters())
    assert not all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)  # a different penalty, different weights
    values = [row["ebpo/divergence"] for row in l2.state.log_history if "ebpo/divergence" in row]
    assert values and all(0.0 <= v < 1.0 for v in values)  # (p - p_ref)^2 of probabilities
    assert not any("kl" in row for row in l2.state.log_history)  # TRL's own KL is off


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"beta": 0.0, "ebpo_divergence": "prob_l2"}, "weighted by beta, which is 0"),
        ({"beta": 0.1, "ebpo_divergence": "prob_l2", "loss_type": "cispo"}, "supports loss_type in"),
        ({"beta": 0.1, "ebpo_divergence": "kl_typo"}, "unknown divergence 'kl_typo'"),
    ],
)
def test_divergence_misconfiguration_is_named(setup, extra, message):
    _, tokenizer, dataset, tmp = setup
    with pytest.raises(ValueError, match=message):
        EBPOGRPOTrainer(
            model=saved_tiny_model(tmp, tokenizer),
            reward_funcs=[exact],
            args=make_args(tmp / "x", **extra),
            train_dataset=dataset,
            processing_class=tokenizer,
        )


def test_two_process_gloo_run_has_identical_estimator_state_and_trains_like_stock_trl(tmp_path):
    """torchrun, 2 CPU processes: the estimator sees the global batch, so both ranks end in the same state; and
    dapo with steps_per_generation 4, accumulation 2 ends at stock TRL's weights (the rest of the 2-process grid
    is in test_trl_equivalence.py, marked slow)."""
    result = run_two_processes(tmp_path, [["dapo", 4, 2]])
    assert result.returncode == 0, result.stderr[-3000:]
    states = [json.loads((tmp_path / f"state-{rank}.json").read_text()) for rank in (0, 1)]
    assert states[0] == states[1]
    # 3 steps x 2 ranks x 2 prompts: each rank's estimator saw the global batch
    assert states[0]["estimator_state"]["group_stats"]["count"] == 12.0
    (equivalence,) = json.loads((tmp_path / "equivalence.json").read_text())
    assert equivalence["num_processes"] == 2
    print(equivalence_table([equivalence]))
    check_equivalence(equivalence)


class RecordingTopics(EBPOGRPOTrainer):
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        record = (self._ebpo_rewards.sum(1).clone(), [row["topic"] for row in inputs], output["advantages"].clone())
        self.recorded = getattr(self, "recorded", []) + [record]
        return output


def test_topic_column_reaches_the_hierarchical_prior(setup):
    from ebpo.grouping import stable_topic_ids

    model, tokenizer, dataset, tmp = setup
    dataset = dataset.add_column("topic", [["easy", "hard", None][i % 3] for i in range(len(dataset))])
    options = {"prior": "running", "hierarchical": True}
    args = make_args(
        tmp / "t", max_steps=2, save_strategy="no", ebpo_estimator_options=options, ebpo_topic_column="topic"
    )
    trainer = RecordingTopics(
        model=model, reward_funcs=[varied], args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    replay = build_estimator("ebpo", weighting="ha_dw", **options)
    for rewards, topics, used in trainer.recorded:
        group_ids = torch.arange(rewards.numel()) // 4
        correct = (rewards >= 1.0).double().cpu()  # make_args' correctness threshold
        expected, metrics = replay(rewards.cpu(), group_ids, topic_ids=stable_topic_ids(topics), correctness=correct)
        assert torch.allclose(used.cpu().double(), expected.double(), atol=1e-6)
    assert metrics["ebpo/num_topics"] >= 1 and "ebpo/omega2" in trainer.state.log_history[0]
    with pytest.raises(ValueError, match="ebpo_topic_column='nope' is not a column"):
        bad = make_args(
            tmp / "u", max_steps=1, save_strategy="no", ebpo_estimator_options=options, ebpo_topic_column="nope"
        )
        RecordingTopics(
            model=model, reward_funcs=[varied], args=bad, train_dataset=dataset, processing_class=tokenizer
        ).train()
