"""Rollout: sample G completions per prompt, score them, and compute token log-probabilities.

Shapes: B = sequences in the batch (prompts * G), P = padded prompt length,
T = completion length (max_new_tokens or shorter when every sequence
stopped). Prompts are left-padded so every completion starts at column P;
position ids are counted from the first real token, as ``generate`` does, so
the log-probabilities recomputed for the update match the sampling policy.

The policy whose log-probabilities the update, the old and the reference
passes compute is the *sampling* policy: logits divided by the rollout
temperature (as TRL's GRPOTrainer and verl's actor do), so the PPO ratio is
1 on the first mini-batch at any temperature. Top-p truncation is not applied
to the recomputed log-probabilities (neither does TRL nor verl); it is 1.0 by
default. Sampling uses :func:`sampling_config`, a fresh
``GenerationConfig`` that names every setting and neutralises the rest, so a
checkpoint's own ``generation_config.json`` (repetition penalty, top-k, ...)
never changes what the trainer samples.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import inspect

import torch
from torch import Tensor

from ebpo.tasks.base import Problem
from ebpo.verifiers.base import Verifier

__all__ = [
    "Rollout", "encode_prompts", "generate", "completion_mask", "sequence_logprobs", "rows_logprobs", "length_chunks",
    "score", "overlong_penalty", "sampling_config", "token_entropy",
]  # fmt: skip


@dataclass
class Rollout:
    """One batch of sampled sequences (B rows)."""

    input_ids: Tensor  # (B, P + T) prompt and completion tokens
    attention_mask: Tensor  # (B, P + T) 1 on real prompt tokens and on completion tokens up to EOS
    completion_mask: Tensor  # (B, T) 1 on completion tokens up to and including the first EOS
    prompt_length: int  # P
    group_ids: Tensor  # (B,) int64 on the CPU, one id per prompt of the step (global over ranks); the estimator runs on the CPU
    texts: list[str]  # decoded completions, special tokens removed
    problems: list[Problem]  # the problem of each row

    @staticmethod
    def concat(parts: list["Rollout"]) -> "Rollout":
        """Stack rollouts with different prompt and completion lengths (re-padded: prompts left, completions right)."""
        if len(parts) == 1:
            return parts[0]
        prompt_length = max(p.prompt_length for p in parts)
        width = max(p.completion_mask.shape[1] for p in parts)

        def pad(part: "Rollout", tensor: Tensor, value: int) -> Tensor:
            completion = tensor.shape[1] - part.prompt_length
            return torch.nn.functional.pad(tensor, (prompt_length - part.prompt_length, width - completion), value=value)

        pad_id = 0  # padded positions are masked out of attention and loss, so any valid id works
        return Rollout(
            input_ids=torch.cat([pad(p, p.input_ids, pad_id) for p in parts]),
            attention_mask=torch.cat([pad(p, p.attention_mask, 0) for p in parts]),
            completion_mask=torch.cat([torch.nn.functional.pad(p.completion_mask, (0, width - p.completion_mask.shape[1])) for p in parts]),
            prompt_length=prompt_length,
            group_ids=torch.cat([p.group_ids for p in parts]),
            texts=[t for p in parts for t in p.texts],
            problems=[q for p in parts for q in p.problems],
        )

    def row_lengths(self) -> tuple[Tensor, Tensor]:
        """Real prompt tokens and completion tokens (through EOS) of each row: two (B,) int64 CPU tensors.

        One device-to-host copy; the update slices micro-batches with them
        instead of reading a maximum back from the device per micro-batch.
        """
        lengths = torch.stack([self.attention_mask[:, : self.prompt_length].sum(1), self.completion_mask.sum(1)]).cpu()  # (2, B)
        return lengths[0], lengths[1]

    def select(self, rows: Tensor) -> "Rollout":
        """The rows ``rows`` (int64 index tensor) of this rollout."""
        index = rows.tolist()
        return Rollout(
            self.input_ids[rows],
            self.attention_mask[rows],
            self.completion_mask[rows],
            self.prompt_length,
            self.group_ids[rows],
            [self.texts[i] for i in index],
            [self.problems[i] for i in index],
        )


def prompt_text(problem: Problem, tokenizer: Any, chat_template: str) -> str:
    """The text fed to the model: the raw prompt, or the tokenizer's chat template around it."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat_template == "always" and not has_template:
        raise ValueError("chat_template is 'always' but the tokenizer has no chat template; use --chat-template auto")
    if chat_template == "never" or not has_template:
        return problem.prompt
    messages = [{"role": "user", "content": problem.prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompts(problems: Sequence[Problem], tokenizer: Any, chat_template: str, device: torch.device) -> dict[str, Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` (len(problems), P)."""
    texts = [prompt_text(p, tokenizer, chat_template) for p in problems]
    # A chat template already carries the BOS token; otherwise let the tokenizer add it.
    templated = texts[0] != problems[0].prompt if problems else False
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def completion_mask(completion_ids: Tensor, eos_token_id: int | list[int]) -> Tensor:
    """(B, T) mask: 1 up to and including the first EOS, 0 after it (padding)."""
    eos_ids = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos_ids).long()  # (B, T)
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS tokens strictly before t
    return (eos_before == 0).long()


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted from each row's first real token (left padding), as ``generate`` uses."""
    return (torch.cumsum(attention_mask, dim=1) - 1).clamp_min(0)


def _cache_kwarg(model: Any) -> str:
    """The name under which ``model`` (its forward and ``generate``) takes a KV cache.

    Recent transformers (5.2x) renamed ``past_key_values`` to ``cache`` and
    warn (FutureWarning) on the old name; older releases only know the old
    one. ``generate`` takes it through ``**kwargs``, so the forward's
    signature (renamed in the same release) decides.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = type(base).forward  # the class's own: mixed precision may patch the instance's forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def sampling_config(
    *, do_sample: bool, temperature: float, top_p: float, max_new_tokens: int, pad_token_id: int, eos_token_id: int | list[int]
) -> Any:
    """A fresh ``GenerationConfig`` naming every setting rollouts and evaluation rely on, the rest neutral.

    ``generate`` fills every field left ``None`` from the model's own
    ``generation_config`` (and then from library defaults such as top_k 50),
    so each processor that could change the distribution is set to its
    neutral value explicitly: the trainer's log-probabilities assume plain
    temperature (and top-p) sampling. Qwen2.5-Instruct, for instance, ships
    repetition_penalty 1.05, top_k 20 and top_p 0.8.
    """
    from transformers import GenerationConfig

    # Sampling-only settings are named only when sampling (greedy decoding ignores them, and transformers warns).
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}
    return GenerationConfig(
        do_sample=do_sample,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,  # (min_length is then unused)
        num_beams=1,
        num_return_sequences=1,
        min_p=None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        length_penalty=1.0,
        no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0,
        bad_words_ids=None,
        sequence_bias=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        exponential_decay_length_penalty=None,
        renormalize_logits=False,
        remove_invalid_values=False,
        guidance_scale=None,
        watermarking_config=None,
        stop_strings=None,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        use_cache=True,
        **sampling,
    )


class _NeutralDefaults:
    """Swap ``model.generation_config`` for a neutral one while sampling.

    ``generate`` fills the ``None`` fields of the config it is given (bad
    words, suppressed tokens, ...) from ``model.generation_config``; a
    ``None`` cannot say "off", so the model's own config is replaced by the
    sampling config itself for the duration of the call and restored after.
    """

    def __init__(self, model: Any, config: Any) -> None:
        # peft models generate with their base model, whose config generate reads.
        self.model = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.config = config

    def __enter__(self) -> None:
        self.saved = getattr(self.model, "generation_config", None)
        self.model.generation_config = self.config

    def __exit__(self, *exc: object) -> None:
        self.model.generation_config = self.saved


def _shared_prompt_cache(model: Any, input_ids: Tensor, attention_mask: Tensor, repeats: int) -> Any:
    """KV cache of every prompt but its last token, computed once per prompt and repeated ``repeats`` times.

    The G samples of a prompt share its prefix, so the prompt is run through
    the model once instead of G times; ``generate`` then starts from this
    cache and processes only the last prompt token for each sample (the
    prefix-cache reuse that transformers documents for ``generate``). Same
    positions and mask as a full prefill, so the sampling distribution is
    unchanged (tested against ``share_prompt_cache=False``).
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    prefix_ids, prefix_mask = input_ids[:, :-1], attention_mask[:, :-1]
    model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=position_ids(prefix_mask), use_cache=True, **{_cache_kwarg(model): cache})
    cache.batch_repeat_interleave(repeats)
    return cache


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    group_ids: Tensor,
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    do_sample: bool,
    chat_template: str,
    batch_size: int,
    share_prompt_cache: bool = True,
    autocast: Any = None,
) -> Rollout:
    """Sample ``group_size`` completions per problem with batched ``generate`` (KV cache on).

    ``group_ids`` (len(problems),) names each problem; rows of the result are
    ordered problem by problem, G consecutive rows each. ``batch_size``
    sequences per ``generate`` call (0 = all; rounded to whole groups).
    ``share_prompt_cache``: prefill each prompt once for its G samples.
    Sampling settings come from :func:`sampling_config` only (the model's own
    generation config is ignored). ``autocast``: a context manager factory
    for the forward passes (mixed precision), none = run as stored.
    """
    device = next(model.parameters()).device
    repeated = [p for p in problems for _ in range(group_size)]
    encoded = encode_prompts(problems, tokenizer, chat_template, device)  # (n, P), one row per problem
    prompt_length = encoded["input_ids"].shape[1]
    eos = tokenizer.eos_token_id
    chunks = []
    per_call = max(1, batch_size // group_size) if batch_size > 0 else max(len(problems), 1)
    share = share_prompt_cache and group_size > 1 and prompt_length > 1
    was_training = model.training
    model.eval()
    config = sampling_config(
        do_sample=do_sample, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
    )  # fmt: skip
    cache_name = _cache_kwarg(model)
    with _NeutralDefaults(model, config), (autocast or contextlib.nullcontext)():
        for start in range(0, len(problems), per_call):  # one generate call per chunk of whole groups
            ids = encoded["input_ids"][start : start + per_call]
            mask = encoded["attention_mask"][start : start + per_call]
            cache = {cache_name: _shared_prompt_cache(model, ids, mask, group_size)} if share else {}
            out = model.generate(
                input_ids=ids.repeat_interleave(group_size, dim=0),
                attention_mask=mask.repeat_interleave(group_size, dim=0),
                generation_config=config,
                **cache,
            )
            chunks.append(out[:, prompt_length:])
    model.train(was_training)
    width = max(c.shape[1] for c in chunks)
    completion_ids = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=tokenizer.pad_token_id) for c in chunks])
    mask = completion_mask(completion_ids, eos)  # (B, T)
    completion_ids = torch.where(mask.bool(), completion_ids, torch.full_like(completion_ids, tokenizer.pad_token_id))
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    prompt_ids = encoded["input_ids"].repeat_interleave(group_size, dim=0)
    prompt_mask = encoded["attention_mask"].repeat_interleave(group_size, dim=0)
    return Rollout(
        input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, mask], dim=1),
        completion_mask=mask,
        prompt_length=prompt_length,
        group_ids=group_ids.cpu().repeat_interleave(group_size),
        texts=texts,
        problems=repeated,
    )


def _keeps_logits(model: Any) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep`` (transformers' causal LMs since 4.50).

    Looked up on the class of the innermost model (DDP/FSDP wrappers expose
    ``.module``, peft ``get_base_model``), as :func:`_cache_kwarg` does; the
    wrappers pass the keyword through to it.
    """
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):  # DDP, FSDP
        inner = inner.module
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters


def completion_logits(model: Any, input_ids: Tensor, attention_mask: Tensor, prompt_length: int, temperature: float = 1.0) -> Tensor:
    """The temperature-scaled logits (B, T, V) that predict each completion token, fp32; grad flows when enabled.

    Only the positions that predict a completion token go through the LM
    head (``logits_to_keep``): the (B, P, V) prompt logits were computed and
    thrown away otherwise. Models whose forward does not take
    ``logits_to_keep`` run the full forward and are sliced (same values).
    """
    completion = input_ids.shape[1] - prompt_length  # T
    kwargs = {"logits_to_keep": completion + 1} if _keeps_logits(model) else {}  # positions P-1 .. P+T-1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False, **kwargs).logits
    logits = logits[:, -completion - 1 : -1].float()  # (B, T, V) the logits that predict each completion token
    return logits / temperature if temperature != 1.0 else logits


def _gather_logprobs(logits: Tensor, targets: Tensor, lse: Tensor | None = None) -> Tensor:
    # log_softmax + gather, written as logit - logsumexp to avoid a second (B, T, V) tensor.
    lse = torch.logsumexp(logits, dim=-1) if lse is None else lse
    return torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - lse


def token_entropy(logits: Tensor, lse: Tensor | None = None) -> Tensor:
    """Entropy (B, T) of the softmax of ``logits`` (B, T, V): logsumexp(z) - sum softmax(z) z.

    ``lse``: ``logsumexp(logits, -1)`` when the caller has it already.
    """
    lse = torch.logsumexp(logits, dim=-1) if lse is None else lse
    return lse - (torch.exp(logits - lse.unsqueeze(-1)) * logits).sum(-1)


def sequence_logprobs(model: Any, input_ids: Tensor, attention_mask: Tensor, prompt_length: int, temperature: float = 1.0) -> Tensor:
    """Log-probability (B, T) of each completion token under ``model`` sampled at ``temperature``; grad flows when enabled."""
    logits = completion_logits(model, input_ids, attention_mask, prompt_length, temperature)
    return _gather_logprobs(logits, input_ids[:, prompt_length:])


def rows_logprobs(
    model: Any, rollout: Rollout, rows: Tensor, temperature: float = 1.0, *, entropy: bool = False, lengths: tuple[Tensor, Tensor] | None = None
) -> Any:
    """Completion log-probs (len(rows), T) of ``rows``, computed on those rows' own padding.

    Prompt columns that none of the rows uses (left padding) and completion
    columns after every row has ended are cut before the forward pass; they
    are masked out of attention and loss anyway, so the result equals
    :func:`sequence_logprobs` on the full rows (up to float rounding) and is
    padded back to width T with zeros. ``entropy``: also return the
    per-token entropy (len(rows), T) of the same temperature-scaled
    distribution, from the same forward pass, detached. ``lengths``:
    :meth:`Rollout.row_lengths`, computed once by the caller, so the cut
    reads no value back from the device.
    """
    prompt_length, width = rollout.prompt_length, rollout.completion_mask.shape[1]
    prompt_lengths, completion_lengths = rollout.row_lengths() if lengths is None else lengths
    used_prompt = int(prompt_lengths[rows].max())
    used_completion = max(int(completion_lengths[rows].max()), 1)
    start, end = prompt_length - used_prompt, prompt_length + used_completion
    input_ids = rollout.input_ids[rows, start:end]
    logits = completion_logits(model, input_ids, rollout.attention_mask[rows, start:end], used_prompt, temperature)  # (R, T', V)
    lse = torch.logsumexp(logits, dim=-1)  # (R, T'), shared by the log-probs and the entropy
    logprobs = torch.nn.functional.pad(_gather_logprobs(logits, input_ids[:, used_prompt:], lse), (0, width - used_completion))
    if not entropy:
        return logprobs
    with torch.no_grad():
        entropies = torch.nn.functional.pad(token_entropy(logits.detach(), lse.detach()), (0, width - used_completion))
    return logprobs, entropies


def length_chunks(rollout: Rollout, rows: Tensor, size: int, chunks: int, lengths: tuple[Tensor, Tensor] | None = None) -> list[Tensor]:
    """Split ``rows`` into micro-batches of rows of similar length (so :func:`rows_logprobs` cuts more padding).

    ``size`` > 0: micro-batches of ``size`` rows; otherwise ``chunks`` micro-batches of equal size.
    Rows are ordered by real length (prompt + completion), stably. ``lengths``: :meth:`Rollout.row_lengths`.
    """
    if rows.numel() == 0:
        return [rows]
    prompt_lengths, completion_lengths = rollout.row_lengths() if lengths is None else lengths  # CPU, as rows
    ordered = rows[torch.sort((prompt_lengths + completion_lengths)[rows], stable=True).indices]
    if size > 0:
        return list(torch.split(ordered, size))
    return [c for c in torch.tensor_split(ordered, max(1, min(chunks, ordered.numel()))) if c.numel() > 0]


def score(rollout: Rollout, verifier: Verifier) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Rewards (B,) float64, a keep-mask (B,) (False where the verifier returned None) and summed verifier info."""
    rewards, keep, info = [], [], {}
    for text, problem in zip(rollout.texts, rollout.problems):  # verifiers score one string at a time
        result = verifier(text, problem.answer)
        keep.append(result.reward is not None)
        rewards.append(0.0 if result.reward is None else float(result.reward))
        for key, value in result.info.items():
            info[f"verifier/{key}"] = info.get(f"verifier/{key}", 0.0) + float(value)
    return torch.tensor(rewards, dtype=torch.float64), torch.tensor(keep), info


def overlong_penalty(lengths: Tensor, truncated: Tensor, *, max_new_tokens: int, buffer: int, penalty: float) -> Tensor:
    """DAPO overlong reward shaping (arXiv 2503.14476, eq. 13), float64 (B,).

    0 up to ``max_new_tokens - buffer`` tokens, then a linear ramp down to
    ``-penalty`` at ``max_new_tokens``; a truncated completion (no EOS)
    gets the full ``-penalty``.
    """
    soft_start = max_new_tokens - buffer
    ramp = -(lengths.double() - soft_start).clamp_min(0) / buffer * penalty  # (B,)
    return torch.where(truncated, torch.full_like(ramp, -penalty), ramp)
