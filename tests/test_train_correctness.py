"""The trainer's maths on real-model settings: temperature, sampling config, mixed precision, logged metrics,
entropy, help text and warnings. Each test names the defect it guards (issue 13)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from ebpo.models import load_policy
from ebpo.tasks.arithmetic import ArithmeticTask
from ebpo.train.rollout import generate, sequence_logprobs


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_policy("builtin:tiny", device=torch.device("cpu"), seed=0)
    return model, tok


def _problems(n: int = 4):
    return ArithmeticTask(num_train=10, num_eval=n).eval_problems()


# ---------------------------------------------------------------- 1. temperature
@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_update_logprobs_are_the_samplers_own_scores_at_temperature(tiny, temperature):
    """Oracle: generate's processed scores (logits / T, nothing else) at the sampled tokens."""
    from ebpo.train.rollout import completion_mask, sampling_config

    model, tok = tiny
    problems = _problems()
    batch = tok([p.prompt for p in problems], return_tensors="pt", padding=True)
    config = sampling_config(do_sample=True, temperature=temperature, top_p=1.0, max_new_tokens=6, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    config.output_scores, config.return_dict_in_generate = True, True
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], generation_config=config)
    prompt_length = batch["input_ids"].shape[1]
    completion = out.sequences[:, prompt_length:]  # (B, T)
    mask = completion_mask(completion, tok.eos_token_id)
    scores = torch.stack(out.scores, dim=1).float()  # (B, T, V) processed: logits / T
    expected = torch.log_softmax(scores, -1).gather(2, completion.unsqueeze(-1)).squeeze(-1)  # (B, T)
    attention = torch.cat([batch["attention_mask"], mask], dim=1)
    with torch.no_grad():
        got = sequence_logprobs(model, out.sequences, attention, prompt_length, temperature)
    assert mask.sum() > 8
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-5)
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
        outs.append(generate(m, tok, _problems(5), torch.arange(5), group_size=3, max_new_tokens=8, temperature=1.0, top_p=1.0,
                             do_sample=do_sample, chat_template="auto", batch_size=0))  # fmt: skip
    assert torch.equal(outs[0].input_ids, outs[1].input_ids)
    assert opinionated.generation_config.repetition_penalty == 1.8  # restored after sampling


def test_evaluation_sampling_ignores_the_models_own_generation_config(tiny):
    from ebpo.evaluate import sample_correctness
    from ebpo.verifiers import build_verifier

    model, tok = tiny
    verifier = build_verifier("exact")
    results = [
        sample_correctness(m, tok, _problems(5), verifier, samples=3, max_new_tokens=8, temperature=1.0, top_p=1.0,
                           chat_template="auto", generation_batch_size=0, seed=4)[1]  # fmt: skip
        for m in (model, _opinionated(model))
    ]
    assert results[0] == results[1]


# ---------------------------------------------------------------- 9. deprecated cache API
def test_rollout_emits_no_future_or_deprecation_warning(tiny):
    model, tok = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        rollout = generate(model, tok, _problems(), torch.arange(4), group_size=2, max_new_tokens=4, temperature=0.7, top_p=0.9,
                           do_sample=True, chat_template="auto", batch_size=0, share_prompt_cache=True)  # fmt: skip
        sequence_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_length, 0.7)
