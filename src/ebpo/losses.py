"""Policy losses: the clipped surrogate, EntropyMech's Clip-Cov / KL-Cov, loss aggregation.

One input record and one output record::

    loss_fn = build_policy_loss("clip", eps_low=0.2, eps_high=0.28, agg="token-mean")
    out = loss_fn(LossInputs(logprobs, old_logprobs, advantages, mask), num_tokens=global_tokens)
    out.loss.backward(); out.metrics["loss/clip_frac_high"]

Per token, ratio = exp(logprobs - old_logprobs) and
loss = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
(PPO; clip-higher eps_high > eps_low from DAPO, arXiv 2503.14476). An
optional divergence to the reference policy is added per token, with
coefficient ``div_coef``, before aggregation (GRPO's KL term; GBMPO's
Bregman divergences, arXiv 2602.04380).

Policy losses (registry :data:`POLICY_LOSSES`):

* ``clip``: the clipped surrogate.
* ``clip_cov`` (EntropyMech Clip-Cov, arXiv 2505.22617): among valid,
  unclipped tokens whose centred covariance
  cov = (A - mean(A)) * (logp - mean(logp)) lies in (clip_cov_lb, clip_cov_ub),
  a random subset of max(1, int(clip_cov_ratio * valid tokens)) gets its
  gradient detached (its loss term is zeroed, as in the authors' verl code).
* ``kl_cov`` (EntropyMech KL-Cov): no ratio clipping; the top
  max(1, int(kl_cov_ratio * valid tokens)) tokens by covariance get an extra
  kl_coef * |logprobs - old_logprobs| penalty.

Aggregations (registry :data:`AGGREGATIONS`), on the per-token loss L (B, T)
and mask M (B, T):

* ``token-mean`` (DAPO): sum(L M) / num_tokens.
* ``seq-mean-token-mean`` (GRPO): mean over sequences of each sequence's token mean.
* ``seq-mean-token-sum``: mean over sequences of each sequence's token sum.
* ``seq-mean-token-sum-norm`` (Dr. GRPO): each sequence's token sum divided by
  a constant (the maximum completion length), averaged over sequences.

``num_tokens`` / ``num_seqs`` are the global counts over every shard and
micro-batch of one optimiser step. Dividing each shard's sum by the global
count (instead of its own) makes the sum of the shard losses equal the loss
of the whole batch, so data parallelism and gradient accumulation do not
change the objective (the reason OpenRLHF's ``aggregate_loss`` takes global
counts). Without them, the shard's own counts are used. A sequence with no
valid token contributes 0 (never NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from ebpo.divergences import Divergence
from ebpo.registry import Registry

__all__ = [
    "LossInputs",
    "LossOutputs",
    "PolicyLoss",
    "POLICY_LOSSES",
    "AGGREGATIONS",
    "aggregate",
    "build_policy_loss",
    "list_policy_losses",
    "list_aggregations",
]


@dataclass(frozen=True)
class LossInputs:
    """What every policy loss takes: the tensors of one micro-batch, named for where they came from."""

    logprobs: Tensor
    """(B, T) log-probs of the sampled tokens under the current policy (with grad)."""
    old_logprobs: Tensor
    """(B, T) log-probs under the behaviour policy that sampled them (rollout time)."""
    advantages: Tensor
    """(B,) per sequence or (B, T) per token."""
    mask: Tensor
    """(B, T) 1 for response tokens, 0 for prompt and padding."""
    ref_logprobs: Tensor | None = None
    """(B, T) log-probs under the reference policy; needed only with a divergence."""


class LossOutputs(NamedTuple):
    """What a policy loss returns: the scalar to differentiate and its diagnostics."""

    loss: Tensor
    """0-dim: the aggregated loss (divergence term included), for ``loss.backward()``."""
    metrics: dict[str, Tensor | float]
    """Flat diagnostics; the per-token ones are detached 0-dim tensors on the loss's device (``float()`` reads
    one), so a training loop can sum them over micro-batches and read them back once per step."""


class PolicyLoss(Protocol):
    """What a registered policy loss implements (built by :func:`build_policy_loss` with its options).

    The built-in ones take ``eps_low``, ``eps_high``, ``agg`` (a name in :data:`AGGREGATIONS`),
    ``agg_constant``, ``divergence`` (a :class:`~ebpo.divergences.Divergence`) and ``div_coef``; ``ebpo train``
    passes a loss of your own (``--loss package.module:attr``) these too, with its ``--loss-options``.
    """

    def __call__(
        self, inputs: LossInputs, *, num_tokens: float | None = None, num_seqs: float | None = None
    ) -> LossOutputs:
        """The loss of one micro-batch and its metrics (flat, namespaced: ``"loss/clip_frac_high"``).

        Args:
            inputs: the micro-batch's log-probabilities, advantages and mask.
            num_tokens: valid tokens in the whole optimiser step (every shard and micro-batch), or None
                for this micro-batch's own count; dividing by the global count keeps data parallelism and
                gradient accumulation from changing the objective.
            num_seqs: sequences in the whole optimiser step, likewise.
        """
        ...


Aggregation = Callable[..., Tensor]
AGGREGATIONS: Registry[Aggregation] = Registry("loss aggregation")
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


def _seq_count(mask: Tensor, num_seqs: float | None) -> float | Tensor:
    return num_seqs if num_seqs is not None else mask.shape[0]


@AGGREGATIONS.register("token-mean")
def _token_mean(
    per_token: Tensor, mask: Tensor, *, constant: float | None, num_tokens: float | None, num_seqs: float | None
) -> Tensor:
    denom = num_tokens if num_tokens is not None else mask.sum().clamp_min(1.0)
    return (per_token * mask).sum() / denom


@AGGREGATIONS.register("seq-mean-token-mean")
def _seq_mean_token_mean(
    per_token: Tensor, mask: Tensor, *, constant: float | None, num_tokens: float | None, num_seqs: float | None
) -> Tensor:
    seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)  # (B,); empty sequences give 0
    return seq.sum() / _seq_count(mask, num_seqs)


@AGGREGATIONS.register("seq-mean-token-sum")
def _seq_mean_token_sum(
    per_token: Tensor, mask: Tensor, *, constant: float | None, num_tokens: float | None, num_seqs: float | None
) -> Tensor:
    return (per_token * mask).sum() / _seq_count(mask, num_seqs)


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(
    per_token: Tensor, mask: Tensor, *, constant: float | None, num_tokens: float | None, num_seqs: float | None
) -> Tensor:
    if constant is None or not constant > 0:
        raise ValueError("seq-mean-token-sum-norm (Dr. GRPO) needs agg_constant > 0: the maximum completion length")
    return (per_token * mask).sum() / constant / _seq_count(mask, num_seqs)


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    mode: str,
    *,
    constant: float | None = None,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> Tensor:
    """Reduce a per-token loss (B, T) to a scalar with aggregation ``mode``."""
    return AGGREGATIONS.get(mode)(per_token, mask, constant=constant, num_tokens=num_tokens, num_seqs=num_seqs)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return ((values * mask).sum() / mask.sum().clamp_min(1.0)).detach()  # 0-dim; no host sync


def _covariance(inputs: LossInputs, advantages: Tensor, mask: Tensor) -> Tensor:
    """Per-token (A - mean A)(logp - mean logp) over valid tokens, detached (B, T)."""
    adv_mean = (advantages * mask).sum() / mask.sum().clamp_min(1.0)
    logp = inputs.logprobs.detach()
    logp_mean = (logp * mask).sum() / mask.sum().clamp_min(1.0)
    return (advantages - adv_mean) * (logp - logp_mean)


class _ClippedSurrogate:
    """Shared machinery: validation, ratio, divergence term, aggregation, metrics."""

    kind = "clip"

    def __init__(
        self,
        *,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        agg: str = "token-mean",
        agg_constant: float | None = None,
        divergence: Divergence | None = None,
        div_coef: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0.0 <= eps_low < 1.0:
            raise ValueError(f"eps_low must be in [0, 1), got {eps_low}")
        if not eps_high >= 0.0:
            raise ValueError(f"eps_high must be >= 0, got {eps_high}")
        if not div_coef >= 0.0:
            raise ValueError(f"div_coef must be >= 0, got {div_coef}")
        AGGREGATIONS.get(agg)  # unknown mode -> ValueError listing the choices, before training starts
        if agg == "seq-mean-token-sum-norm" and (agg_constant is None or not agg_constant > 0):
            raise ValueError("seq-mean-token-sum-norm (Dr. GRPO) needs agg_constant > 0: the maximum completion length")
        self.eps_low, self.eps_high, self.agg, self.agg_constant = eps_low, eps_high, agg, agg_constant
        self.divergence, self.div_coef, self.generator = divergence, div_coef, generator

    def _validate(self, inputs: LossInputs) -> tuple[Tensor, Tensor]:
        shape = inputs.logprobs.shape
        if inputs.logprobs.dim() != 2:
            raise ValueError(f"logprobs must be (B, T), got shape {tuple(shape)}")
        for name in ("old_logprobs", "mask"):
            if getattr(inputs, name).shape != shape:
                raise ValueError(f"{name} has shape {tuple(getattr(inputs, name).shape)}, expected {tuple(shape)}")
        advantages = inputs.advantages
        if advantages.shape == shape[:1]:
            advantages = advantages.unsqueeze(-1).expand(shape)  # (B,) -> (B, T)
        elif advantages.shape != shape:
            raise ValueError(f"advantages must be (B,) or (B, T) = {tuple(shape)}, got {tuple(advantages.shape)}")
        checked = (("advantages", advantages), ("logprobs", inputs.logprobs), ("old_logprobs", inputs.old_logprobs))
        finite = torch.stack(
            [torch.isfinite(tensor.detach()).all() for _, tensor in checked]
        )  # (3,): one host sync, not three
        if not bool(finite.all()):
            raise ValueError(f"{checked[int((~finite).nonzero()[0])][0]} contains NaN or infinite values")
        if self.divergence is not None and self.div_coef > 0:
            if inputs.ref_logprobs is None:
                raise ValueError(
                    "this loss has a divergence to the reference policy but got no ref_logprobs; "
                    "compute reference log-probs (a reference model is needed) or set div_coef=0"
                )
            if inputs.ref_logprobs.shape != shape:
                raise ValueError(f"ref_logprobs has shape {tuple(inputs.ref_logprobs.shape)}, expected {tuple(shape)}")
        return advantages.detach(), inputs.mask.to(inputs.logprobs.dtype)

    def _surrogate(self, ratio: Tensor, advantages: Tensor) -> Tensor:
        unclipped = -advantages * ratio
        clipped = -advantages * ratio.clamp(1.0 - self.eps_low, 1.0 + self.eps_high)
        return torch.maximum(unclipped, clipped)

    def _select(
        self, inputs: LossInputs, per_token: Tensor, ratio: Tensor, advantages: Tensor, mask: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """Hook for EntropyMech variants: adjust the per-token loss."""
        return per_token, {}

    def __call__(
        self, inputs: LossInputs, *, num_tokens: float | None = None, num_seqs: float | None = None
    ) -> LossOutputs:
        advantages, mask = self._validate(inputs)
        log_ratio = inputs.logprobs - inputs.old_logprobs.detach()  # (B, T)
        ratio = log_ratio.exp()
        per_token = self._surrogate(ratio, advantages)
        per_token, metrics = self._select(inputs, per_token, ratio, advantages, mask)
        policy_loss = aggregate(
            per_token, mask, self.agg, constant=self.agg_constant, num_tokens=num_tokens, num_seqs=num_seqs
        )
        loss = policy_loss  # aggregated once when there is no divergence term
        if self.divergence is not None and self.div_coef > 0:
            assert inputs.ref_logprobs is not None
            div = self.divergence(inputs.logprobs, inputs.ref_logprobs.detach())  # (B, T)
            total = per_token + self.div_coef * div
            metrics["loss/divergence"] = _masked_mean(div.detach(), mask)
            loss = aggregate(
                total, mask, self.agg, constant=self.agg_constant, num_tokens=num_tokens, num_seqs=num_seqs
            )
        with torch.no_grad():
            r = ratio.detach()
            low = (r < 1.0 - self.eps_low) & (advantages < 0)  # clip binds on the low side
            high = (r > 1.0 + self.eps_high) & (advantages > 0)  # clip binds on the high side
            metrics.update(
                {
                    "loss/policy": policy_loss.detach(),
                    "loss/total": loss.detach(),
                    "loss/clip_frac_low": _masked_mean(low.to(mask.dtype), mask),
                    "loss/clip_frac_high": _masked_mean(high.to(mask.dtype), mask),
                    # k3 estimate of KL(old || new) from tokens sampled by old
                    "loss/approx_kl": _masked_mean(torch.expm1(log_ratio.detach()) - log_ratio.detach(), mask),
                    "loss/ratio_mean": _masked_mean(r, mask),
                }
            )
        return LossOutputs(loss, metrics)


POLICY_LOSSES.register("clip")(_ClippedSurrogate)


@POLICY_LOSSES.register("clip_cov")
class ClipCov(_ClippedSurrogate):
    """EntropyMech Clip-Cov; see the module docstring."""

    kind = "clip_cov"

    def __init__(
        self, *, clip_cov_ratio: float = 2e-4, clip_cov_lb: float = 1.0, clip_cov_ub: float = 5.0, **kwargs: object
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if not 0 < clip_cov_ratio <= 1:
            raise ValueError(f"clip_cov_ratio must be in (0, 1], got {clip_cov_ratio}")
        self.ratio_frac, self.lb, self.ub = clip_cov_ratio, clip_cov_lb, clip_cov_ub

    def _select(self, inputs, per_token, ratio, advantages, mask):
        cov = _covariance(inputs, advantages, mask)  # (B, T)
        clipped = (-advantages * ratio.clamp(1.0 - self.eps_low, 1.0 + self.eps_high)) > (-advantages * ratio)
        eligible = (mask > 0) & ~clipped.detach() & (cov > self.lb) & (cov < self.ub)  # (B, T)
        count = max(1, int(self.ratio_frac * float(mask.sum())))
        candidates = eligible.reshape(-1).nonzero().squeeze(-1)  # (K,)
        pick = torch.randperm(candidates.numel(), generator=self.generator)[:count].to(candidates.device)
        chosen = candidates[pick]
        keep = torch.ones(per_token.numel(), dtype=per_token.dtype, device=per_token.device)
        keep[chosen] = 0.0
        per_token = per_token * keep.reshape(per_token.shape)  # detached tokens contribute no loss, no gradient
        return per_token, {"loss/entropymech_frac": float(chosen.numel()) / max(float(mask.sum()), 1.0)}


@POLICY_LOSSES.register("kl_cov")
class KLCov(_ClippedSurrogate):
    """EntropyMech KL-Cov; see the module docstring. No ratio clipping."""

    kind = "kl_cov"

    def __init__(self, *, kl_cov_ratio: float = 2e-4, kl_coef: float = 1.0, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if not 0 < kl_cov_ratio <= 1:
            raise ValueError(f"kl_cov_ratio must be in (0, 1], got {kl_cov_ratio}")
        self.ratio_frac, self.kl_coef = kl_cov_ratio, kl_coef

    def _surrogate(self, ratio: Tensor, advantages: Tensor) -> Tensor:
        return -advantages * ratio

    def _select(self, inputs, per_token, ratio, advantages, mask):
        cov = _covariance(inputs, advantages, mask).masked_fill(mask <= 0, float("-inf"))  # (B, T)
        count = min(max(1, int(self.ratio_frac * float(mask.sum()))), int((mask > 0).sum()))
        top = torch.topk(cov.reshape(-1), count).indices
        penalty = torch.zeros(per_token.numel(), dtype=per_token.dtype, device=per_token.device)
        penalty[top] = 1.0
        abs_kl = (inputs.logprobs - inputs.old_logprobs.detach()).abs()
        per_token = per_token + self.kl_coef * abs_kl * penalty.reshape(per_token.shape)
        return per_token, {"loss/entropymech_frac": count / max(float(mask.sum()), 1.0)}


def build_policy_loss(name: str = "clip", **options: object) -> PolicyLoss:
    """Build a policy loss by registry name or ``module:attr`` path (options as in ``_ClippedSurrogate``)."""
    return POLICY_LOSSES.build(name, **options)


def list_policy_losses() -> list[str]:
    return POLICY_LOSSES.names()


def list_aggregations() -> list[str]:
    return AGGREGATIONS.names()
