"""Sampling from a policy: G completions per prompt (training rollouts) and k per problem (held-out accuracy).

``ebpo train`` and ``ebpo eval`` both sample through this module, so it sits
below both: the trainer's held-out accuracy and ``ebpo eval`` are the same
function, :func:`sample_correctness` (same chunking, same seed offset
:data:`EVAL_SEED_OFFSET`). Scoring a rollout and the log-probabilities for
the update are the trainer's (:mod:`ebpo.train.rollout`).

Shapes: B = sequences in the batch (prompts * G), P = padded prompt length,
T = completion length (max_new_tokens or shorter when every sequence
stopped). Prompts are left-padded so every completion starts at column P;
position ids are counted from the first real token, as ``generate`` does, so
the log-probabilities recomputed for the update match the sampling policy.

Sampling uses :func:`sampling_config`, a fresh
``GenerationConfig`` that names every setting and neutralises the rest, so a
checkpoint's own ``generation_config.json`` (repetition penalty, top-k, ...)
never changes what the trainer samples. The one thing read from it is where a
turn ends (:func:`end_of_turn_ids`): chat models end a turn in a token that is
not the tokenizer's EOS (Qwen2.5-Instruct: ``<|im_end|>``, with
``<|endoftext|>`` as EOS), and a completion ends at the first token of either.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ebpo.tasks.base import Problem

__all__ = [
    "Rollout",
    "prompt_text",
    "encode_prompts",
    "completion_mask",
    "end_of_turn_ids",
    "position_ids",
    "base_model",
    "cache_kwarg",
    "keeps_logits",
    "sampling_config",
    "generate",
    "EVAL_SEED_OFFSET",
    "sample_correctness",
]

EVAL_SEED_OFFSET = 7919
"""Held-out accuracy samples under ``seed + EVAL_SEED_OFFSET``, in ``ebpo train`` and ``ebpo eval`` alike."""


@dataclass
class Rollout:
    """One batch of sampled sequences (B rows)."""

    input_ids: Tensor  # (B, P + T) prompt and completion tokens
    attention_mask: Tensor  # (B, P + T) 1 on real prompt tokens and on completion tokens up to the turn's end
    completion_mask: Tensor  # (B, T) 1 on completion tokens up to and including the first end_of_turn_ids token
    prompt_length: int  # P
    group_ids: Tensor  # (B,) int64 on the CPU, one id per prompt of the step (global over ranks); the estimator runs on the CPU.
    # Rows with the same group id have the same prompt tokens and padding (the update runs each prompt once).
    texts: list[str]  # decoded completions, special tokens removed
    problems: list[Problem]  # the problem of each row

    @staticmethod
    def concat(parts: list[Rollout]) -> Rollout:
        """Stack rollouts with different prompt and completion lengths (re-padded: prompts left, completions right)."""
        if len(parts) == 1:
            return parts[0]
        prompt_length = max(p.prompt_length for p in parts)
        width = max(p.completion_mask.shape[1] for p in parts)

        def pad(part: Rollout, tensor: Tensor, value: int) -> Tensor:
            completion = tensor.shape[1] - part.prompt_length
            return torch.nn.functional.pad(
                tensor, (prompt_length - part.prompt_length, width - completion), value=value
            )

        pad_id = 0  # padded positions are masked out of attention and loss, so any valid id works
        return Rollout(
            input_ids=torch.cat([pad(p, p.input_ids, pad_id) for p in parts]),
            attention_mask=torch.cat([pad(p, p.attention_mask, 0) for p in parts]),
            completion_mask=torch.cat(
                [torch.nn.functional.pad(p.completion_mask, (0, width - p.completion_mask.shape[1])) for p in parts]
            ),
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
        lengths = torch.stack(
            [self.attention_mask[:, : self.prompt_length].sum(1), self.completion_mask.sum(1)]
        ).cpu()  # (2, B)
        return lengths[0], lengths[1]

    def select(self, rows: Tensor) -> Rollout:
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


def encode_prompts(
    problems: Sequence[Problem], tokenizer: Any, chat_template: str, device: torch.device
) -> dict[str, Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` (len(problems), P)."""
    texts = [prompt_text(p, tokenizer, chat_template) for p in problems]
    # A chat template already carries the BOS token; otherwise let the tokenizer add it.
    templated = texts[0] != problems[0].prompt if problems else False
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def end_of_turn_ids(model: Any, tokenizer: Any) -> list[int]:
    """The token ids that end a completion: the tokenizer's EOS and every id of the model's generation config.

    A chat model's ``generation_config.eos_token_id`` (an id or a list) names
    the end of its turn, which need not be ``tokenizer.eos_token_id``:
    Qwen2.5-Instruct lists ``<|im_end|>`` and ``<|endoftext|>``, its tokenizer's
    EOS being ``<|endoftext|>``; stopping at EOS alone samples past the turn's
    end, and that continuation would be scored and trained on. Sampling, the
    completion mask and DAPO's truncation test all use this union.
    """
    ids = [tokenizer.eos_token_id]
    config = getattr(base_model(model), "generation_config", None)
    listed = getattr(config, "eos_token_id", None)
    ids += [listed] if isinstance(listed, int) else list(listed or [])
    return sorted({int(i) for i in ids if i is not None})


def completion_mask(completion_ids: Tensor, eos_token_id: int | list[int]) -> Tensor:
    """(B, T) mask: 1 up to and including the first EOS (any of ``eos_token_id``), 0 after it (padding)."""
    eos_ids = torch.as_tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=completion_ids.device
    )
    is_eos = torch.isin(completion_ids, eos_ids).long()  # (B, T)
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS tokens strictly before t
    return (eos_before == 0).long()


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted from each row's first real token (left padding), as ``generate`` uses."""
    return (torch.cumsum(attention_mask, dim=1) - 1).clamp_min(0)


def base_model(model: Any) -> Any:
    """The Hugging Face model inside ``model``'s wrappers (DDP and FSDP expose ``.module``, peft ``get_base_model``)."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):  # DDP, FSDP
        inner = inner.module
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def keeps_logits(model: Any) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep`` (transformers' causal LMs since 4.50).

    Looked up on the class of the innermost model (:func:`base_model`), as
    :func:`cache_kwarg` does; the wrappers pass the keyword through to it.
    """
    return "logits_to_keep" in inspect.signature(type(base_model(model)).forward).parameters


def cache_kwarg(model: Any) -> str:
    """The name under which ``model`` (its forward and ``generate``) takes a KV cache.

    Recent transformers (5.2x) renamed ``past_key_values`` to ``cache`` and
    warn (FutureWarning) on the old name; older releases only know the old
    one. ``generate`` takes it through ``**kwargs``, so the forward's
    signature (renamed in the same release) decides; wrappers pass it through.
    """
    forward = type(base_model(model)).forward  # the class's own: mixed precision may patch the instance's forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def sampling_config(
    *,
    do_sample: bool,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | list[int],
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

    Only the cache is used, so the LM head runs on one position
    (``logits_to_keep=1``, as ``generate``'s own prefill does): the full
    (n, P - 1, V) fp32 logits would be 592 MiB for two 512-token prompts at a
    152k vocabulary, tens of GB for 128 prompts of 1k tokens. Models whose
    forward does not take the keyword build them all.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    prefix_ids, prefix_mask = input_ids[:, :-1], attention_mask[:, :-1]
    keep = {"logits_to_keep": 1} if keeps_logits(model) else {}
    model(
        input_ids=prefix_ids,
        attention_mask=prefix_mask,
        position_ids=position_ids(prefix_mask),
        use_cache=True,
        **{cache_kwarg(model): cache},
        **keep,
    )
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
    sync: Callable[[int], int] | None = None,
) -> Rollout:
    """Sample ``group_size`` completions per problem with batched ``generate`` (KV cache on).

    ``group_ids`` (len(problems),) names each problem; rows of the result are
    ordered problem by problem, G consecutive rows each. ``batch_size``
    sequences per ``generate`` call (0 = all; rounded to whole groups).
    ``share_prompt_cache``: prefill each prompt once for its G samples.
    Sampling settings come from :func:`sampling_config` only (of the model's
    own generation config, only its end-of-turn ids are read:
    :func:`end_of_turn_ids`). ``autocast``: a context manager factory
    for the forward passes (mixed precision), none = run as stored.

    ``sync``: when the model's forward is a collective (FSDP: every layer
    gathers its shards), every process must make the same model calls. The
    function maps this process's number of ``generate`` calls to the number
    every process makes (the maximum over processes, e.g. ``Dist.max``);
    each call runs with ``synced_gpus`` (a process that has finished keeps
    stepping until all have), a process with fewer calls makes idle ones on a
    one-token prompt, and prompts are not prefilled apart (the prefill is one
    more model call, which a process whose prompts are one token long would
    not make). ``problems`` may then be empty.
    """
    device = next(model.parameters()).device
    repeated = [p for p in problems for _ in range(group_size)]
    eos = end_of_turn_ids(model, tokenizer)  # read before _NeutralDefaults swaps the generation config out
    if problems:
        encoded = encode_prompts(problems, tokenizer, chat_template, device)  # (n, P), one row per problem
    else:  # (only under sync: this process makes idle calls)
        empty = torch.empty((0, 0), dtype=torch.long, device=device)
        encoded = {"input_ids": empty, "attention_mask": empty}
    prompt_length = encoded["input_ids"].shape[1]
    chunks = []
    per_call = max(1, batch_size // group_size) if batch_size > 0 else max(len(problems), 1)
    local_calls = -(-len(problems) // per_call)
    calls = local_calls if sync is None else int(sync(local_calls))
    if not problems and sync is None:
        raise ValueError("generate: no problems to sample")
    share = share_prompt_cache and group_size > 1 and prompt_length > 1 and sync is None
    synced = {"synced_gpus": True} if sync is not None else {}
    was_training = model.training
    model.eval()
    config = sampling_config(
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
    )
    cache_name = cache_kwarg(model)
    with _NeutralDefaults(model, config), (autocast or contextlib.nullcontext)():
        for call in range(calls):  # one generate call per chunk of whole groups
            if call >= local_calls:  # idle: keeps the collectives of the other processes' calls in step
                idle = torch.full((1, 1), tokenizer.pad_token_id, dtype=torch.long, device=device)
                model.generate(input_ids=idle, attention_mask=torch.ones_like(idle), generation_config=config, **synced)
                continue
            start = call * per_call
            ids = encoded["input_ids"][start : start + per_call]
            mask = encoded["attention_mask"][start : start + per_call]
            cache = {cache_name: _shared_prompt_cache(model, ids, mask, group_size)} if share else {}
            out = model.generate(
                input_ids=ids.repeat_interleave(group_size, dim=0),
                attention_mask=mask.repeat_interleave(group_size, dim=0),
                generation_config=config,
                **cache,
                **synced,
            )
            chunks.append(out[:, prompt_length:])
    model.train(was_training)
    width = max((c.shape[1] for c in chunks), default=0)
    completion_ids = torch.cat(
        [torch.nn.functional.pad(c, (0, width - c.shape[1]), value=tokenizer.pad_token_id) for c in chunks]
        or [torch.empty((0, 0), dtype=torch.long, device=device)]
    )
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


@torch.no_grad()
def sample_correctness(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    verifier: Any,
    *,
    samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    chat_template: str,
    generation_batch_size: int,
    seed: int,
    sync: Callable[[int], int] | None = None,
) -> tuple[Tensor, list[list[str]]]:
    """Rewards (P, k) (NaN where the verifier skipped) and completions of ``samples`` per problem.

    ``samples = 0`` means one greedy completion. Sampling runs under its own
    seed inside ``fork_rng``, so it neither moves nor depends on the caller's RNG.
    ``sync``: as :func:`generate`'s; processes may hold different numbers of problems.
    """
    k = max(samples, 1)
    device = next(model.parameters()).device
    rewards = torch.full((len(problems), k), float("nan"), dtype=torch.float64)
    texts: list[list[str]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        batch = max(1, (generation_batch_size or 512) // k)
        local_chunks = -(-len(problems) // batch)
        for index in range(local_chunks if sync is None else int(sync(local_chunks))):
            start = index * batch
            chunk = list(problems[start : start + batch])  # empty for this process's idle chunks (sync)
            rollout = generate(
                model,
                tokenizer,
                chunk,
                torch.arange(len(chunk)),
                group_size=k,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                do_sample=samples > 0,
                chat_template=chat_template,
                batch_size=0,
                sync=sync,
            )
            for row, (text, problem) in enumerate(zip(rollout.texts, (p for p in chunk for _ in range(k)))):
                result = verifier(text, problem.answer)  # strings: one verifier call per completion
                if result.reward is not None:
                    rewards[start + row // k, row % k] = float(result.reward)
            texts += [rollout.texts[i * k : (i + 1) * k] for i in range(len(chunk))]
    return rewards, texts
