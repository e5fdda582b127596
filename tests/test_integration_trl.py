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
    options = dict(
        output_dir=str(out),
        max_steps=3,
        learning_rate=1e-3,
        beta=0.0,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        save_strategy="steps",
        save_steps=1,
        disable_tqdm=True,
        ebpo_estimator="ebpo",
        ebpo_estimator_options={"prior": "running"},
        ebpo_weighting="ha_dw",
    )
    return EBPOGRPOConfig(**{**options, **extra})


def test_trl_trains_on_ebpo_advantages_and_resumes_the_estimator(setup):
    model, tokenizer, dataset, tmp = setup
    trainer = Recording(
        model=model, reward_funcs=[exact], args=make_args(tmp / "a"), train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    replay = build_estimator("ebpo", prior="running", weighting="ha_dw")
    for rewards, used in trainer.recorded:
        expected, _ = replay(rewards.cpu(), torch.arange(rewards.numel()) // 4)
        assert torch.allclose(used.cpu().double(), expected.double(), atol=1e-6)
    assert replay.state_dict() == trainer.ebpo_estimator.state_dict()
    assert any(k.startswith("ebpo/") for k in trainer.state.log_history[0])  # ebpo's metrics reach TRL's logs

    saved = torch.load(tmp / "a" / "checkpoint-1" / STATE_FILE, weights_only=True)
    assert saved["estimator_state"]["group_stats"]["count"] == 2.0  # one step of 2 prompts
    resumed = EBPOGRPOTrainer(
        model=build_tiny_llama(TinyLlamaSpec(), tokenizer, seed=0),
        reward_funcs=[exact],
        args=make_args(tmp / "a"),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    resumed._load_from_checkpoint(str(tmp / "a" / "checkpoint-1"))
    assert resumed.ebpo_estimator.state_dict() == saved


def varied(completions, **_):
    """A reward that differs within groups even for an untrained model (so that the weights move)."""
    return [float(len(c) % 3) for c in completions]


def _saved_model(folder, tokenizer):
    """The tiny model loaded from a path (TRL builds its reference model from the policy's path)."""
    from transformers import AutoModelForCausalLM

    path = folder / "tiny-model"
    if not path.exists():
        build_tiny_llama(TinyLlamaSpec(), tokenizer, seed=0).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path)


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
    model = _saved_model(tmp.parent, tokenizer)
    trainer = trainer_cls(
        model=model, reward_funcs=[varied], args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_divergence_kl_k3_trains_exactly_like_trls_own_kl_term(setup, loss_type):
    """Oracle: TRL's own k3 term. Same beta, same seed: ebpo's kl/k3 in TRL's place gives the same weights."""
    _, tokenizer, dataset, tmp = setup
    stock = _train(EBPOGRPOTrainer, tmp / "stock", tokenizer, dataset, beta=0.5, loss_type=loss_type)
    ours = _train(
        EBPOGRPOTrainer,
        tmp / "ours",
        tokenizer,
        dataset,
        beta=0.5,
        loss_type=loss_type,
        ebpo_divergence="kl",
        ebpo_divergence_options={"estimator": "k3"},
    )
    a, b = dict(stock.model.named_parameters()), dict(ours.model.named_parameters())
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    start = build_tiny_llama(TinyLlamaSpec(), tokenizer, seed=0)
    assert stock.ref_model is not None and ours.ref_model is not None
    assert not all(torch.equal(a[k], p) for k, p in start.named_parameters())  # the step did move the weights
    logs = [row for row in ours.state.log_history if "ebpo/divergence" in row]
    stock_kl = [row["kl"] for row in stock.state.log_history if "kl" in row]
    assert [row["ebpo/divergence"] for row in logs] == pytest.approx(stock_kl, abs=1e-6)
    assert stock_kl[-1] > 0  # by step 2 the policy has left the reference: the term is active


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
            model=_saved_model(tmp, tokenizer),
            reward_funcs=[exact],
            args=make_args(tmp / "x", **extra),
            train_dataset=dataset,
            processing_class=tokenizer,
        )


def test_two_process_gloo_run_has_identical_estimator_state_on_both_ranks(tmp_path):
    """torchrun, 2 CPU processes: the estimator sees the global batch, so both ranks end in the same state."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("trl_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_DISABLED": "true"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        str(worker),
        str(tmp_path),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    states = [json.loads((tmp_path / f"state-{rank}.json").read_text()) for rank in (0, 1)]
    assert states[0] == states[1]
    # 3 steps x 2 ranks x 2 prompts: each rank's estimator saw the global batch
    assert states[0]["estimator_state"]["group_stats"]["count"] == 12.0


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
        expected, metrics = replay(rewards.cpu(), group_ids, topic_ids=stable_topic_ids(topics))
        assert torch.allclose(used.cpu().double(), expected.double(), atol=1e-6)
    assert metrics["ebpo/num_topics"] >= 1 and "ebpo/omega2" in trainer.state.log_history[0]
    with pytest.raises(ValueError, match="ebpo_topic_column='nope' is not a column"):
        bad = make_args(
            tmp / "u", max_steps=1, save_strategy="no", ebpo_estimator_options=options, ebpo_topic_column="nope"
        )
        RecordingTopics(
            model=model, reward_funcs=[varied], args=bad, train_dataset=dataset, processing_class=tokenizer
        ).train()
