"""The trainer at a real chat model's shapes: the prefill's LM head, several end-of-turn ids, the reference's dtype.

Real users train Qwen-class models: a ~152k vocabulary, prompts of hundreds of
tokens, a chat template whose turn ends in a token (``<|im_end|>``) that is not
the tokenizer's ``eos_token_id`` (the generation config lists both). The unit
tests below use the tiny built-in model; the last test runs the trainer on
``builtin:qwen-shapes`` (Qwen2.5's vocabulary size, a ChatML template) with
512-token prompts and bounds the memory of the generation prefill by the shapes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from ebpo.models import load_policy
from ebpo.sampling import Rollout, completion_mask, generate
from ebpo.tasks.arithmetic import ArithmeticTask


@pytest.fixture(scope="module")
def tiny():
    return load_policy("builtin:tiny", device=torch.device("cpu"), seed=0)


def _problems(n: int = 4):
    return ArithmeticTask(num_train=10, num_eval=n).eval_problems()


def _sample(model, tok, problems, *, group_size=3, max_new_tokens=6, seed=0, **kwargs):
    torch.manual_seed(seed)
    return generate(
        model,
        tok,
        problems,
        torch.arange(len(problems)),
        group_size=group_size,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        do_sample=True,
        chat_template="auto",
        batch_size=0,
        **kwargs,
    )


class _NoLogitsToKeep(LlamaForCausalLM):
    """A causal LM whose forward does not take ``logits_to_keep`` (older or custom models)."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None, cache=None, **kwargs):
        assert "logits_to_keep" not in kwargs
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            cache=cache,
            **kwargs,
        )


def _head_widths(model):
    """Record the number of positions of every output of the LM head (and remove the hook with ``.remove()``)."""
    widths: list[int] = []
    head = model.get_output_embeddings()
    return widths, head.register_forward_hook(lambda _m, _args, out: widths.append(out.shape[1]))


def _favour(model, token: int, logit: float):
    """Add ``logit`` to ``token``'s logit wherever the LM head runs (a policy that ends its turn often)."""
    bias = torch.zeros(model.config.vocab_size)
    bias[token] = logit
    return model.get_output_embeddings().register_forward_hook(lambda _m, _args, out: out + bias.to(out.dtype))


# ---------------------------------------------------------------- the generation prefill keeps one position
def test_generation_prefill_runs_the_lm_head_on_the_last_position_only(tiny):
    """The shared prompt prefill built (n, P - 1, V) logits that nothing read (only its KV cache is used).

    Oracle for the samples: the same weights in a model without ``logits_to_keep`` (full prefill), same seed."""
    model, tok = tiny
    problems = _problems(5)  # prompts of different lengths (left padding)
    widths, hook = _head_widths(model)
    rollout = _sample(model, tok, problems, share_prompt_cache=True)
    hook.remove()
    assert rollout.prompt_length > 2
    assert widths and set(widths) == {1}, widths  # prefill, first step and decode steps: one position each
    plain = _NoLogitsToKeep(model.config)
    plain.load_state_dict(model.state_dict())
    widths, hook = _head_widths(plain)
    same = _sample(plain.eval(), tok, problems, share_prompt_cache=True)  # the fallback: no keyword, full prefill
    hook.remove()
    assert widths[0] == rollout.prompt_length - 1
    assert torch.equal(same.input_ids, rollout.input_ids) and torch.equal(same.completion_mask, rollout.completion_mask)


# ---------------------------------------------------------------- a completion ends at any end-of-turn id
def _turn_end(tok) -> int:
    return tok.convert_tokens_to_ids("#")  # stands for <|im_end|>: an end-of-turn id that is not eos_token_id


def test_completions_end_at_every_end_of_turn_id_of_the_generation_config(tiny):
    """Generation and the completion mask stopped only at ``tokenizer.eos_token_id``; a chat model's generation
    config lists its turn's end too (Qwen2.5: ``<|im_end|>`` and ``<|endoftext|>``), which then ran on."""
    base, tok = tiny
    model = copy.deepcopy(base)
    turn_end = _turn_end(tok)
    model.generation_config.eos_token_id = [turn_end, tok.eos_token_id]
    hook = _favour(model, turn_end, 3.0)
    rollout = _sample(model, tok, _problems(6), group_size=4, max_new_tokens=10)
    hook.remove()
    completion = rollout.input_ids[:, rollout.prompt_length :]  # (B, T)
    ends = torch.isin(completion, torch.tensor([turn_end, tok.eos_token_id]))
    ended_at_turn_end = 0
    for row in range(completion.shape[0]):
        hits = torch.nonzero(ends[row]).flatten().tolist()
        length = hits[0] + 1 if hits else completion.shape[1]  # through the first end-of-turn token
        assert rollout.completion_mask[row].tolist() == [1] * length + [0] * (completion.shape[1] - length), row
        assert (completion[row, length:] == tok.pad_token_id).all(), row  # generation stopped there
        ended_at_turn_end += int(bool(hits) and int(completion[row, hits[0]]) == turn_end)
        assert "#" not in rollout.texts[row][:-1]  # (a character, so the text keeps it, as its last one)
    assert ended_at_turn_end >= 4  # the case under test happened (the turn end has p ~ 0.2 per token)
    assert model.generation_config.eos_token_id == [turn_end, tok.eos_token_id]  # restored after sampling


def test_overlong_shaping_counts_a_turn_end_as_a_stop(tiny, make_trainer):
    """DAPO's overlong shaping read only ``eos_token_id``: a completion that ended its turn in 2 tokens was
    'truncated' and got the full penalty."""
    trainer = make_trainer("--method", "dapo", "--overlong-buffer", "2")
    tok = trainer.tokenizer
    turn_end = _turn_end(tok)
    trainer.model.generation_config.eos_token_id = [turn_end, tok.eos_token_id]
    digit, pad = tok.convert_tokens_to_ids("7"), tok.pad_token_id
    width = trainer.config.max_new_tokens  # 6
    completion = torch.tensor(
        [
            [digit, turn_end] + [pad] * (width - 2),  # ended its turn: no penalty
            [digit] * (width - 2) + [tok.eos_token_id, pad],  # EOS as token 5 of 6, in the buffer: ramp, -1/2
            [digit] * width,  # truncated: -1
        ]
    )
    mask = completion_mask(completion, [turn_end, tok.eos_token_id])
    prompt = torch.tensor([[tok.bos_token_id, digit]] * 3)
    problem = _problems(1)[0]
    rollout = Rollout(
        input_ids=torch.cat([prompt, completion], 1),
        attention_mask=torch.cat([torch.ones_like(prompt), mask], 1),
        completion_mask=mask,
        prompt_length=2,
        group_ids=torch.zeros(3, dtype=torch.long),
        texts=["7", "77777", "777777"],
        problems=[problem] * 3,
    )
    assert trainer._overlong(rollout).tolist() == [0.0, -0.5, -1.0]


# ---------------------------------------------------------------- the reference policy
def test_reference_equals_the_policy_at_step_zero_under_bf16_autocast(make_trainer):
    """A full-parameter reference stored in bf16 while the policy keeps fp32 weights under autocast: embeddings,
    norms and the residual stream differ, so the two policies differed before any update (and the KL pulled
    toward the copy's rounding). Oracle: identical log-probs, KL exactly 0, at step 0."""
    trainer = make_trainer("--method", "ebpo", "--dtype", "bfloat16")
    rollout, _, _, _ = trainer.rollout_and_score()
    rows = torch.arange(len(rollout.texts))
    policy = trainer._logprobs(trainer.model, rollout, rows)
    reference = trainer._logprobs(trainer.ref_model, rollout, rows, reference=True)
    mask = rollout.completion_mask.bool()
    delta = (reference - policy)[mask].double()
    kl = float((delta.exp() - delta - 1).mean())  # k3, the ebpo preset's estimator
    assert torch.equal(policy[mask], reference[mask]), (float(delta.abs().max()), kl)
    assert {p.dtype for p in trainer.ref_model.parameters()} == {p.dtype for p in trainer.model.parameters()}


def test_non_finite_reference_logprobs_stop_the_update_before_the_optimiser(make_trainer):
    """The reference's log-probs were not in the finite check: an overflow there (fp16) reached AdamW as NaN.
    A NaN weight in the reference stands for the overflow."""
    trainer = make_trainer("--method", "ebpo")
    rollout, _, _, _ = trainer.rollout_and_score()
    advantages = torch.randn(len(rollout.texts), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trainer.ref_model.model.norm.weight[0] = float("nan")
    before = [p.detach().clone() for p in trainer.params]
    with pytest.raises(ValueError, match="reference"):
        trainer.update(rollout, advantages)
    assert all(torch.equal(p, b) for p, b in zip(trainer.params, before))  # no step was taken


# ---------------------------------------------------------------- the trainer at a real model's shapes
QWEN_VOCAB = 151_936  # rows of Qwen2.5's embedding
PROMPT_TOKENS = 512


class _LongPrompts:
    """A task whose prompts are ``length`` tokens long once the chat template wraps them: a long context, then
    a sum. Built here; no registry entry."""

    name, verifier, recommended = "long_prompts", "exact", {}

    def __init__(self, tokenizer, length: int = PROMPT_TOKENS, count: int = 8) -> None:
        from ebpo.tasks.base import Problem

        def tokens(content: str) -> int:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        problems = []
        for i in range(count):
            question = f"\nWhat is {i + 3}+{2 * i + 1}?"
            room = length - tokens(question)
            context = ("Notes on sums: carry the tens; check each digit. " * 20)[:room]
            problems.append(Problem(id=f"long{i}", prompt=context + question, answer=str(3 * i + 4)))
        assert {tokens(p.prompt) for p in problems} == {length}
        self.problems = problems

    def train_problems(self):
        return self.problems

    def eval_problems(self):
        return self.problems[:2]


def _proc_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key + ":"))


def _can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # Linux: reset VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def test_trainer_at_qwen_shapes_keeps_one_prefill_position_and_ends_completions_at_im_end(tmp_path, monkeypatch):
    """``ebpo train --steps 2`` on ``builtin:qwen-shapes`` (151,936-token vocabulary, ChatML turns ending in
    <|im_end|> = not eos_token_id, generation config listing both) with 512-token prompts.

    * The generation prefill (``sampling._shared_prompt_cache``) runs the LM head on one position per prompt,
      and its peak memory (Linux peak RSS, reset before the prefill) stays within a bound computed from the
      shapes: the logits of one position, the KV cache and one layer's attention, with slack, where the old
      prefill built (n, P - 1, V) fp32 logits (592 MiB for 2 prompts) that nothing read.
    * Every completion ends at its first <|im_end|> or EOS (mask and tokens); most end at <|im_end|>.
    """
    import dataclasses
    import time

    from ebpo import sampling
    from ebpo.train import trainer as trainer_module
    from ebpo.train.cli import build_parser, resolve_config
    from ebpo.train.trainer import Trainer, build_components
    from ebpo.verifiers import build_verifier

    prompts, group = 2, 4
    out = tmp_path / "run"
    out.mkdir()
    argv = ["--out", str(out), "--model", "builtin:qwen-shapes", "--steps", "2", "--task", "arithmetic"]
    argv += ["--warmstart-steps", "0", "--prompts-per-step", str(prompts), "--group-size", str(group)]
    argv += ["--max-new-tokens", "8", "--max-eval-problems", "2", "--eval-samples", "0", "--threads", "1"]
    argv += ["--length-buckets", "1"]  # one micro-batch of the 8 rows: fewer model calls at this vocabulary
    argv += ["--device", "cpu", "--no-tensorboard", "--no-progress", "--save-every", "0"]
    config = resolve_config(build_parser().parse_args(argv))
    started = time.perf_counter()
    components = build_components(config)
    trainer = Trainer(config, str(out), components, resume=False, echo=lambda _: None)
    tok, model = trainer.tokenizer, trainer.model
    assert model.config.vocab_size == len(tok) == QWEN_VOCAB
    turn_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert turn_end != tok.eos_token_id and model.generation_config.eos_token_id == [turn_end, tok.eos_token_id]
    trainer.c = dataclasses.replace(components, task=_LongPrompts(tok), verifier=build_verifier("exact"))
    trainer.stream = trainer_module.PromptStream(trainer.c.task.train_problems(), config.curriculum, config.seed, None)
    for policy in {id(m): m for m in (model, trainer.ref_model) if m is not None}.values():
        _favour(policy, turn_end, 11.0)  # p(<|im_end|>) ~ 0.3 per token over 151,936 ids: turns end early

    head_widths: list[int] = []
    # (prompts in the call, P - 1, the LM head's output widths, peak RSS above the start in bytes) of each prefill
    prefills: list[tuple[int, int, list[int], int]] = []
    measure = _can_reset_peak_rss()
    prefill = sampling._shared_prompt_cache

    def measured_prefill(model, input_ids, attention_mask, repeats):
        head_widths.clear()
        base = _proc_bytes("VmRSS") if measure and _can_reset_peak_rss() else 0
        cache = prefill(model, input_ids, attention_mask, repeats)
        peak = _proc_bytes("VmHWM") - base if measure else 0
        prefills.append((input_ids.shape[0], input_ids.shape[1] - 1, list(head_widths), peak))
        return cache

    rollouts = []

    def kept_generate(*args, **kwargs):
        rollouts.append(sampling.generate(*args, **kwargs))
        return rollouts[-1]

    monkeypatch.setattr(sampling, "_shared_prompt_cache", measured_prefill)
    monkeypatch.setattr(trainer_module, "generate", kept_generate)
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, _a, o: head_widths.append(o.shape[1]))
    summary = trainer.train()
    hook.remove()
    seconds = time.perf_counter() - started

    turn_ends = sum(int((r.input_ids[:, PROMPT_TOKENS:] == turn_end).any(1).sum()) for r in rollouts)
    peaks = [round(p / 2**20, 1) for *_, p in prefills]
    print(f"\nqwen-shapes: prefill peaks {peaks} MiB, {turn_ends} rows with <|im_end|>, {seconds:.1f} s")
    assert summary["steps"] == 2 and len(rollouts) == 2 and len(prefills) == 2
    # Memory of the prefill: what it must hold, computed from the shapes (fp32), against the old (n, P - 1, V).
    cfg, spec = model.config, trainer.spec
    for n, positions, widths, peak in prefills:
        assert (n, positions) == (prompts, PROMPT_TOKENS - 1)
        assert widths == [1], widths  # the LM head ran once, on the last prompt position only
        logits = n * 1 * QWEN_VOCAB * 4  # the one position kept
        cache = spec.num_layers * 2 * n * positions * cfg.hidden_size * 4
        activations = n * positions * (cfg.num_attention_heads * positions + 8 * cfg.hidden_size) * 4  # one layer
        bound = 2 * (logits + cache + activations) + 16 * 2**20
        full = n * positions * QWEN_VOCAB * 4
        assert bound < full / 8  # the bound tells the two prefills apart
        if measure:
            assert peak <= bound, f"prefill peak {peak / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"
    # Where completions end: at the first end-of-turn id, <|im_end|> for most.
    ended = 0
    for rollout in rollouts:
        assert rollout.prompt_length == PROMPT_TOKENS
        completion = rollout.input_ids[:, PROMPT_TOKENS:]  # (B, T)
        ends = torch.isin(completion, torch.tensor([turn_end, tok.eos_token_id]))
        for row in range(completion.shape[0]):
            hits = torch.nonzero(ends[row]).flatten().tolist()
            length = hits[0] + 1 if hits else completion.shape[1]
            assert rollout.completion_mask[row].tolist() == [1] * length + [0] * (completion.shape[1] - length)
            assert (completion[row, length:] == tok.pad_token_id).all()
            ended += int(bool(hits) and int(completion[row, hits[0]]) == turn_end)
    assert ended >= prompts * group  # half of the 16 rows or more ended their turn at <|im_end|>


def test_end_of_turn_ids_take_the_generation_configs_id_or_list(tiny):
    from ebpo.sampling import end_of_turn_ids

    base, tok = tiny
    model = copy.deepcopy(base)
    for listed, expected in ((None, [2]), (2, [2]), (7, [2, 7]), ([9, 2], [2, 9]), ([], [2])):
        model.generation_config.eos_token_id = listed
        assert end_of_turn_ids(model, tok) == expected
    model.generation_config = None  # a model without one: the tokenizer's EOS
    assert end_of_turn_ids(model, tok) == [tok.eos_token_id] == [2]
