"""The trainer's maths on real-model settings: temperature, sampling config, mixed precision, logged metrics,
entropy, help text and warnings. Each test names the defect it guards."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tolerances import LOGPROB_ULPS, assert_close_scale

from ebpo.models import load_policy
from ebpo.sampling import generate
from ebpo.tasks.arithmetic import ArithmeticTask
from ebpo.train.rollout import sequence_logprobs


def _problems(n: int = 4):
    return ArithmeticTask(num_train=10, num_eval=n).eval_problems()


# ---------------------------------------------------------------- 1. temperature
@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_update_logprobs_are_the_samplers_own_scores_at_temperature(tiny, temperature):
    """Oracle: generate's processed scores (logits / T, nothing else) at the sampled tokens."""
    from ebpo.sampling import completion_mask, sampling_config

    model, tok = tiny
    problems = _problems()
    batch = tok([p.prompt for p in problems], return_tensors="pt", padding=True)
    config = sampling_config(
        do_sample=True,
        temperature=temperature,
        top_p=1.0,
        max_new_tokens=6,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config.output_scores, config.return_dict_in_generate = True, True
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], generation_config=config
        )
    prompt_length = batch["input_ids"].shape[1]
    completion = out.sequences[:, prompt_length:]  # (B, T)
    mask = completion_mask(completion, tok.eos_token_id)
    scores = torch.stack(out.scores, dim=1).float()  # (B, T, V) processed: logits / T
    expected = torch.log_softmax(scores, -1).gather(2, completion.unsqueeze(-1)).squeeze(-1)  # (B, T)
    attention = torch.cat([batch["attention_mask"], mask], dim=1)
    with torch.no_grad():
        got = sequence_logprobs(model, out.sequences, attention, prompt_length, temperature)
    assert mask.sum() > 8
    assert_close_scale(got[mask.bool()], expected[mask.bool()], ulps=LOGPROB_ULPS, what="log-probs")
    # and not the raw (T = 1) distribution, which is what the update used before
    with torch.no_grad():
        raw = sequence_logprobs(model, out.sequences, attention, prompt_length)
    assert not torch.allclose(raw[mask.bool()], expected[mask.bool()], atol=1e-3)


# ---------------------------------------------------------------- 2. the model's own generation_config
def _opinionated(model):
    """A copy whose generation_config would change sampling if generate honoured it."""
    other = copy.deepcopy(model)
    cfg = other.generation_config
    cfg.repetition_penalty, cfg.top_k, cfg.no_repeat_ngram_size, cfg.top_p = 1.8, 3, 2, 0.5
    cfg.min_length, cfg.min_new_tokens, cfg.temperature = 9, 4, 0.3
    cfg.suppress_tokens = [5, 6, 7]
    cfg.bad_words_ids = [[8]]
    return other


@pytest.mark.parametrize("do_sample", [True, False])
def test_rollouts_ignore_the_models_own_generation_config(tiny, do_sample):
    model, tok = tiny
    opinionated = _opinionated(model)
    outs = []
    for m in (model, opinionated):
        torch.manual_seed(3)
        outs.append(
            generate(
                m,
                tok,
                _problems(5),
                torch.arange(5),
                group_size=3,
                max_new_tokens=8,
                temperature=1.0,
                top_p=1.0,
                do_sample=do_sample,
                chat_template="auto",
                batch_size=0,
            )
        )
    assert torch.equal(outs[0].input_ids, outs[1].input_ids)
    assert opinionated.generation_config.repetition_penalty == 1.8  # restored after sampling


def test_evaluation_sampling_ignores_the_models_own_generation_config(tiny):
    from ebpo.sampling import sample_correctness
    from ebpo.verifiers import build_verifier

    model, tok = tiny
    verifier = build_verifier("exact")
    results = [
        sample_correctness(
            m,
            tok,
            _problems(5),
            verifier,
            samples=3,
            max_new_tokens=8,
            temperature=1.0,
            top_p=1.0,
            chat_template="auto",
            generation_batch_size=0,
            seed=4,
        )[1]
        for m in (model, _opinionated(model))
    ]
    assert results[0] == results[1]


# ---------------------------------------------------------------- 9. deprecated cache API
def test_rollout_emits_no_future_or_deprecation_warning(tiny):
    model, tok = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        rollout = generate(
            model,
            tok,
            _problems(),
            torch.arange(4),
            group_size=2,
            max_new_tokens=4,
            temperature=0.7,
            top_p=0.9,
            do_sample=True,
            chat_template="auto",
            batch_size=0,
            share_prompt_cache=True,
        )
        sequence_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_length, 0.7)


# ---------------------------------------------------------------- trainer-level checks (in process, one rank)
def _full_batch_loss(trainer, rollout, advantages):
    """Oracle: the loss function once on the whole batch (one forward, own counts), before any update."""
    from ebpo.losses import LossInputs
    from ebpo.train.rollout import rows_logprobs

    rows = torch.arange(len(advantages))
    with torch.no_grad():
        assert trainer.config.temperature == 1.0  # (so the oracle needs no temperature argument)
        logprobs = rows_logprobs(trainer.model, rollout, rows)
    mask = rollout.completion_mask.float()
    return trainer.c.loss_fn(LossInputs(logprobs, logprobs, advantages, mask))


def test_logged_loss_is_invariant_to_micro_batches_and_lr_is_the_one_used(make_trainer, synthetic_batch):
    """Defect 6: loss/policy shrank with the number of micro-batches, loss/total was added twice, lr was the next one."""
    first = make_trainer(
        "--method", "grpo", "--micro-batch-size", "0", "--length-buckets", "1", "--lr-warmup-steps", "4"
    )
    rollout, advantages = synthetic_batch(first)
    expected = _full_batch_loss(first, rollout, advantages)
    logged = []
    for flags in (
        ["--micro-batch-size", "0", "--length-buckets", "1"],
        ["--micro-batch-size", "2"],
        ["--micro-batch-size", "0", "--length-buckets", "4"],
    ):
        trainer = make_trainer("--method", "grpo", "--lr-warmup-steps", "4", *flags)
        logged.append(trainer.update(rollout, advantages))
    for metrics in logged:
        assert metrics["loss/policy"] == pytest.approx(float(expected.loss), rel=1e-5, abs=1e-7)
        assert metrics["loss/total"] == pytest.approx(metrics["loss/policy"], rel=1e-6)  # no divergence in grpo
        assert metrics["loss/approx_kl"] == pytest.approx(0.0, abs=1e-7)
        assert metrics["optim/lr"] == pytest.approx(first.config.lr / 4)  # the first warm-up update's rate


def test_policy_entropy_is_the_token_mean_entropy_of_the_tempered_policy(make_trainer, synthetic_batch):
    """Defect 7: policy/entropy from the update's own forward; oracle: softmax(logits / T) entropy, token mean."""
    from ebpo.train.rollout import completion_logits

    trainer = make_trainer("--method", "grpo", "--temperature", "0.5", "--micro-batch-size", "3")
    rollout, advantages = synthetic_batch(trainer)
    with torch.no_grad():
        logits = completion_logits(trainer.model, rollout.input_ids, rollout.attention_mask, rollout.prompt_length, 0.5)
    probs = torch.softmax(logits.double(), -1)
    entropy = -(probs * torch.log(probs)).sum(-1)  # (B, T)
    mask = rollout.completion_mask.double()
    expected = float((entropy * mask).sum() / mask.sum())
    assert trainer.update(rollout, advantages)["policy/entropy"] == pytest.approx(expected, rel=1e-4)


def test_kl_cov_without_a_moving_policy_warns(make_trainer):
    lines: list[str] = []
    make_trainer("--loss", "kl_cov", echo=lines.append)
    assert any("kl_cov has no effect" in line for line in lines)
    lines.clear()
    make_trainer("--loss", "kl_cov", "--ppo-epochs", "2", echo=lines.append)
    assert not any("kl_cov" in line for line in lines)


def test_bf16_compute_keeps_fp32_weights_that_move_at_a_small_lr(make_trainer, synthetic_batch):
    """Defect 3: bf16 parameters trained directly lost ~98% of the updates at lr 1e-6; now fp32 masters + autocast."""
    trainer = make_trainer("--method", "grpo", "--dtype", "bfloat16", "--lr", "1e-6", "--lr-warmup-steps", "0")
    assert all(p.dtype == torch.float32 for p in trainer.params)
    rollout, advantages = synthetic_batch(trainer)
    seen: list[torch.dtype] = []
    hook = trainer.model.lm_head.register_forward_hook(
        lambda module, args, output: seen.append(output.dtype) if torch.is_grad_enabled() else None
    )
    before = [p.detach().clone() for p in trainer.params]
    trainer.update(rollout, advantages)
    hook.remove()
    assert seen and all(d == torch.bfloat16 for d in seen)  # the update's forward ran under bf16 autocast
    moved = sum(int((p.detach() != b).sum()) for p, b in zip(trainer.params, before))
    used = sum(p.numel() for p in trainer.params)
    assert moved / used > 0.5, moved / used


def test_help_shows_the_defaults_that_actually_run():
    """Defect 8: --help showed the dataclass defaults (no divergence) while the default run uses the ebpo preset."""
    from ebpo.train.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "Coefficient of the divergence in the loss. (default: 0.001; set by the --method ebpo preset" in text
    assert "(default: 'kl'; set by the --method ebpo preset" in text
    assert (
        "Policy loss: clip, clip_cov, kl_cov." in text and "(default: 'clip'; set by the --method ebpo preset" in text
    )
    assert "Responses sampled per prompt (G). (default: 8)" in text  # not a preset field: no note


def test_lora_adapters_do_not_depend_on_the_ranks_sampling_seed(make_trainer):
    """Defect 5: adapters were initialised from the seed + rank stream, so ranks started from different policies.

    (Under DDP the wrapper would also copy rank 0's weights at construction; the trainer additionally
    broadcasts them, and this checks the initialisation itself, which other engines rely on.)"""
    pytest.importorskip("peft")
    trainer = make_trainer("--lora-rank", "4", "--method", "grpo")
    adapters = []
    for rank_seed in (0, 1):  # what seed + rank leaves in the global RNG on ranks 0 and 1
        base, _ = load_policy("builtin:tiny", device=torch.device("cpu"), seed=0)
        torch.manual_seed(rank_seed)
        model = trainer._with_lora(base, "builtin:tiny")
        adapters.append({k: v.clone() for k, v in model.state_dict().items() if "lora_" in k})
    assert adapters[0] and all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def test_builtin_medium_is_a_named_size_of_tens_of_millions_of_parameters():
    from ebpo.models.loading import BUILTIN_SPECS, build_tiny_llama, check_model_source
    from ebpo.models.tokenizer import CharTokenizer

    check_model_source("builtin:medium")
    with pytest.raises(ValueError, match="builtin:tiny"):
        check_model_source("builtin:large")
    model = build_tiny_llama(BUILTIN_SPECS["medium"], CharTokenizer(), seed=0)
    assert 20e6 < sum(p.numel() for p in model.parameters()) < 100e6


@pytest.mark.parametrize("world", [1, 2, 3])
def test_accuracy_by_topic_maps_each_gathered_score_to_its_problems_topic(world):
    """Scores come back in rank order of the ``problems[rank::world]`` shards; each lands on its own problem's topic."""
    from types import SimpleNamespace

    from ebpo.tasks.base import Problem
    from ebpo.train.trainer import Trainer

    problems = [
        Problem(id=str(i), prompt=f"{i}=", answer="0", topic="abc"[i % 3] if i != 4 else None) for i in range(11)
    ]
    truth_before = {"a": 1.0, "b": 0.25, "c": 0.0}
    order = [p for rank in range(world) for p in problems[rank::world]]  # the gathered order
    before = torch.tensor([truth_before.get(p.topic, 0.5) for p in order])
    after = torch.tensor([float(int(p.id)) for p in order])  # score = problem index
    stub = SimpleNamespace(
        c=SimpleNamespace(task=SimpleNamespace(eval_problems=lambda: problems)),
        config=SimpleNamespace(max_eval_problems=0),
        dist=SimpleNamespace(world=world),
        scores_before=before,
        last_eval_scores=after,
    )
    table = Trainer._by_topic(stub)
    assert set(table) == {"a", "b", "c"}  # the topic-less problem is in no topic
    for topic in "abc":
        ids = [int(p.id) for p in problems if p.topic == topic]
        assert table[topic] == {
            "problems": len(ids),
            "before": truth_before[topic],
            "after": pytest.approx(sum(ids) / len(ids)),
        }
    stub.c.task = SimpleNamespace(eval_problems=lambda: [Problem(id="x", prompt="1=", answer="1")])
    assert Trainer._by_topic(stub) == {}
