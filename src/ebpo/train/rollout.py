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

from typing import Any

import torch
from torch import Tensor

from ebpo.sampling import Rollout, base_model, cache_kwarg, keeps_logits, position_ids
from ebpo.verifiers.base import Verifier

__all__ = [
    "completion_logits",
    "shared_prompt_logits",
    "distinct_prompts",
    "token_entropy",
    "sequence_logprobs",
    "rows_logprobs",
    "length_chunks",
    "score",
    "overlong_penalty",
]


_keeps_logits = keeps_logits  # the name the tests imported before generation's prefill needed it too


def completion_logits(
    model: Any, input_ids: Tensor, attention_mask: Tensor, prompt_length: int, temperature: float = 1.0
) -> Tensor:
    """The temperature-scaled logits (B, T, V) that predict each completion token, fp32; grad flows when enabled.

    Only the positions that predict a completion token go through the LM
    head (``logits_to_keep``): the (B, P, V) prompt logits were computed and
    thrown away otherwise. Models whose forward does not take
    ``logits_to_keep`` run the full forward and are sliced (same values).
    """
    completion = input_ids.shape[1] - prompt_length  # T
    kwargs = {"logits_to_keep": completion + 1} if keeps_logits(model) else {}  # positions P-1 .. P+T-1
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
        **kwargs,
    ).logits
    logits = logits[:, -completion - 1 : -1].float()  # (B, T, V) the logits that predict each completion token
    return logits / temperature if temperature != 1.0 else logits


def shared_prompt_logits(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    prompt_length: int,
    heads: Tensor,
    inverse: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """:func:`completion_logits` with each distinct prompt run through the model once (B, T, V); grad flows.

    Rows ``heads`` (U,) of ``input_ids`` (B, P + T) hold the U distinct
    prompts and row b's prompt is row ``heads[inverse[b]]``'s (the G
    responses of a group share theirs). Pass 1 runs the U prompts, keeps their
    KV cache and the logits of the last prompt position (which predict the
    first completion token); the cache is indexed out to the B rows and pass 2
    runs only the completions, attending to it. Causal attention makes the
    prompt positions' keys and values independent of the completion, so this
    is the full forward's value (up to float rounding; tests/test_shared_prompt.py),
    and the gradient of the shared prompt positions sums over the G rows as
    the full forward's would. Saves (G - 1) / G of the prompt tokens' forward
    and backward work.

    Always exactly two calls of ``model`` (:data:`SHARED_FORWARDS`), whatever
    the rows: a DDP wrapper may broadcast buffers at every forward, so every
    rank must make the same number of calls per micro-batch. Pass 2 therefore
    takes all T completion tokens (never an empty input) and drops the logits
    of the last one, which predict nothing.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=base_model(model).config)
    prompt_ids, prompt_mask = input_ids[heads, :prompt_length], attention_mask[heads, :prompt_length]  # (U, P)
    keep = {"logits_to_keep": 1} if keeps_logits(model) else {}
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids(prompt_mask),
        use_cache=True,
        **{cache_kwarg(model): cache},
        **keep,
    )
    first = out.logits[:, -1:].float()[inverse]  # (B, 1, V) the logits that predict the first completion token
    cache.batch_select_indices(inverse)  # (U, ...) -> (B, ...), differentiable
    rest = model(
        input_ids=input_ids[:, prompt_length:],
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask)[:, prompt_length:],
        use_cache=True,
        **{cache_kwarg(model): cache},
    ).logits  # (B, T, V): completion token t predicts token t + 1
    logits = torch.cat([first, rest[:, :-1].float()], dim=1)  # (B, T, V)
    return logits / temperature if temperature != 1.0 else logits


SHARED_FORWARDS = 2
"""Calls of the model per :func:`shared_prompt_logits` (and per padding pass of the update when prompts are shared)."""


def distinct_prompts(group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(heads, inverse) for :func:`shared_prompt_logits`: the first row of each group and each row's group (CPU)."""
    _, inverse = torch.unique(group_ids, return_inverse=True)  # (B,)
    rows = torch.arange(group_ids.numel())
    heads = torch.full((int(inverse.max()) + 1,), group_ids.numel(), dtype=torch.long).scatter_reduce_(
        0, inverse, rows, "amin"
    )
    return heads, inverse


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


def sequence_logprobs(
    model: Any, input_ids: Tensor, attention_mask: Tensor, prompt_length: int, temperature: float = 1.0
) -> Tensor:
    """Log-probability (B, T) of each completion token under ``model`` sampled at ``temperature``; grad flows when enabled."""
    logits = completion_logits(model, input_ids, attention_mask, prompt_length, temperature)
    return _gather_logprobs(logits, input_ids[:, prompt_length:])


def rows_logprobs(
    model: Any,
    rollout: Rollout,
    rows: Tensor,
    temperature: float = 1.0,
    *,
    entropy: bool = False,
    lengths: tuple[Tensor, Tensor] | None = None,
    share_prompts: bool = False,
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
    reads no value back from the device. ``share_prompts``: run each group's
    prompt once (:func:`shared_prompt_logits`; two model calls, even when no
    two rows share a prompt, so that every rank makes the same calls).
    """
    prompt_length, width = rollout.prompt_length, rollout.completion_mask.shape[1]
    prompt_lengths, completion_lengths = rollout.row_lengths() if lengths is None else lengths
    used_prompt = int(prompt_lengths[rows].max())
    used_completion = max(int(completion_lengths[rows].max()), 1)
    start, end = prompt_length - used_prompt, prompt_length + used_completion
    input_ids = rollout.input_ids[rows, start:end]
    attention_mask = rollout.attention_mask[rows, start:end]
    if share_prompts:
        heads, inverse = (t.to(input_ids.device) for t in distinct_prompts(rollout.group_ids[rows]))
        logits = shared_prompt_logits(model, input_ids, attention_mask, used_prompt, heads, inverse, temperature)
    else:
        logits = completion_logits(model, input_ids, attention_mask, used_prompt, temperature)  # (R, T', V)
    lse = torch.logsumexp(logits, dim=-1)  # (R, T'), shared by the log-probs and the entropy
    logprobs = torch.nn.functional.pad(
        _gather_logprobs(logits, input_ids[:, used_prompt:], lse), (0, width - used_completion)
    )
    if not entropy:
        return logprobs
    with torch.no_grad():
        entropies = torch.nn.functional.pad(token_entropy(logits.detach(), lse.detach()), (0, width - used_completion))
    return logprobs, entropies


def length_chunks(
    rollout: Rollout,
    rows: Tensor,
    size: int,
    chunks: int,
    lengths: tuple[Tensor, Tensor] | None = None,
    *,
    whole_groups: bool = False,
) -> list[Tensor]:
    """Split ``rows`` into micro-batches of rows of similar length (so :func:`rows_logprobs` cuts more padding).

    ``size`` > 0: micro-batches of ``size`` rows; otherwise ``chunks`` micro-batches of equal size.
    Rows are ordered by real length (prompt + completion), stably. ``lengths``: :meth:`Rollout.row_lengths`.
    ``whole_groups``: keep the rows of a group next to each other (ordered by the group's longest row), so
    that a micro-batch holds whole groups, whose prompts :func:`rows_logprobs` can run once (a cut between
    micro-batches may still split one group).
    """
    if rows.numel() == 0:
        return [rows]
    prompt_lengths, completion_lengths = rollout.row_lengths() if lengths is None else lengths  # CPU, as rows
    key = (prompt_lengths + completion_lengths)[rows]  # (R,)
    if whole_groups:
        _, group = torch.unique(rollout.group_ids[rows], return_inverse=True)  # (R,) group of each row
        longest = torch.zeros(int(group.max()) + 1, dtype=key.dtype).scatter_reduce_(
            0, group, key, "amax", include_self=False
        )
        by_group = torch.sort(group, stable=True).indices
        rows, key = (
            rows[by_group],
            longest[group][by_group],
        )  # a group's rows share its key: the stable sort keeps them together
    ordered = rows[torch.sort(key, stable=True).indices]
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
    return torch.tensor(rewards, dtype=torch.float64), torch.tensor(keep, dtype=torch.bool), info  # bool when empty too


def overlong_penalty(lengths: Tensor, truncated: Tensor, *, max_new_tokens: int, buffer: int, penalty: float) -> Tensor:
    """DAPO overlong reward shaping (arXiv 2503.14476, eq. 13), float64 (B,).

    0 up to ``max_new_tokens - buffer`` tokens, then a linear ramp down to
    ``-penalty`` at ``max_new_tokens``; a truncated completion (no EOS)
    gets the full ``-penalty``.
    """
    soft_start = max_new_tokens - buffer
    ramp = -(lengths.double() - soft_start).clamp_min(0) / buffer * penalty  # (B,)
    return torch.where(truncated, torch.full_like(ramp, -penalty), ramp)
