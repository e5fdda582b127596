"""Rollouts for the update: scoring, token log-probabilities and their micro-batches (sampling: :mod:`ebpo.sampling`).

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
default.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from ebpo.sampling import Rollout, position_ids
from ebpo.verifiers.base import Verifier

__all__ = ["completion_logits", "token_entropy", "sequence_logprobs", "rows_logprobs", "length_chunks", "score", "overlong_penalty"]


def _keeps_logits(model: Any) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep`` (transformers' causal LMs since 4.50).

    Looked up on the class of the innermost model (DDP/FSDP wrappers expose
    ``.module``, peft ``get_base_model``), as :func:`ebpo.sampling._cache_kwarg` does; the
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
