"""Advantage weightings that compose with every estimator.

HA-DW, History-Aware Adaptive Difficulty Weighting (arXiv 2601.08521),
docs/methods.md#ha-dw. Per step t, with y_t the batch accuracy (mean reward of every
response in the batch) and a difficulty anchor C::

    diff_q  = mu_q - C
    D_{q,i} = -sign(A_{q,i}) * sign(diff_q)
    Phi_q,i = lam * exp(D_{q,i} * |diff_q|)
    A'      = A * Phi          (the weight sits inside both clip branches)

Hard prompt & correct answer, or easy prompt & wrong answer, are amplified
(lam * exp(+|diff|)); the other two cases damped (lam * exp(-|diff|)).

Two anchors:

* ``anchor="soft"`` (the paper, default): C+ = (1 - eta_t) C- + eta_t y_t with
  eta_t = clip(eta * sigma_t, 0, 1); diff is measured against C- (before this
  step's update). The paper defines sigma_t as the std of the anchor over the
  last m steps. Read literally, an anchor that starts constant has sigma = 0
  forever and never moves; we therefore take sigma_t over the last ``m``
  anchors *together with the current observation* y_t, which equals the
  paper's sigma once the anchor varies and lets it start moving.
* ``anchor="hard"`` (the paper's appendix and the authors' released code):
  C = mean of the last ``k`` batch accuracies, the current batch included
  (k = 10 in the code); diff is measured against that C.

Defaults for what the paper does not publish: ``eta = 2.0`` (with 0/1
rewards sigma_t <= 0.5, so the gain eta_t stays in [0, 1]), ``m = 10`` (the
code's k), and C_0 = the first batch's accuracy (``c0=None``; pass a number
to start elsewhere). ``lam = 1.3`` is the paper's best; the released code
hard-codes 1.5.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from ebpo.grouping import GroupedBatch
from ebpo.registry import Registry

__all__ = ["Weighting", "WEIGHTINGS", "HADW", "list_weightings"]


class Weighting(Protocol):
    """Per-response multiplicative weights for the advantages.

    A weighting that reads ``batch.correctness`` (each response's success, in [0, 1]) declares it with a class
    attribute ``reads_correctness = True``; the TRL and verl adapters then require the user to say where the
    correctness comes from (their rewards are arbitrary sums and scales) and refuse to start otherwise.
    Without the attribute a weighting is taken not to read it.
    """

    def __call__(self, advantages: Tensor, batch: GroupedBatch, *, training: bool) -> tuple[Tensor, dict[str, float]]:
        """Return weights (N,) float64 and metrics; no state change when ``training`` is False."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Its state across steps (plain Python values and tensors), saved with the run's checkpoints."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, so a resumed run continues where it stopped."""
        ...


WEIGHTINGS: Registry[Weighting] = Registry("advantage weighting")

_ANCHORS = ("soft", "hard")


@WEIGHTINGS.register("ha_dw")
class HADW:
    """HA-DW weighting; see the module docstring for the maths and defaults.

    Args:
        anchor: ``"soft"`` (paper) or ``"hard"`` (released code).
        lam: the scale lambda (paper best 1.3; code 1.5).
        eta: soft anchor gain multiplier (unpublished; default 2.0).
        m: soft anchor window for sigma_t (unpublished; default 10).
        k: hard anchor window of batch accuracies (code: 10).
        c0: initial soft anchor; ``None`` uses the first batch's accuracy.
    """

    # Reads batch.correctness: the batch accuracy y_t, the group accuracies mu_q and the anchor C are success
    # rates, which rewards of another scale (TRL's summed reward functions, a -1/1 verifier) are not.
    reads_correctness = True

    def __init__(
        self,
        anchor: str = "soft",
        lam: float = 1.3,
        eta: float = 2.0,
        m: int = 10,
        k: int = 10,
        c0: float | None = None,
    ) -> None:
        if anchor not in _ANCHORS:
            raise ValueError(f"ha_dw anchor must be one of {_ANCHORS}, got {anchor!r}")
        if not lam > 0:
            raise ValueError(f"ha_dw lam must be > 0, got {lam}")
        if not eta >= 0:
            raise ValueError(f"ha_dw eta must be >= 0, got {eta}")
        if m < 1 or k < 1:
            raise ValueError(f"ha_dw windows must be >= 1, got m={m}, k={k}")
        self.anchor_kind, self.lam, self.eta, self.m, self.k, self.c0 = anchor, float(lam), float(eta), m, k, c0
        self.anchor: float | None = None  # soft: C before the next step's update
        self.history: deque[float] = deque(maxlen=m if anchor == "soft" else k)

    def _next_anchor(self, accuracy: float) -> tuple[float, float, deque[float], dict[str, float]]:
        """(anchor used for diff, anchor after this step, history after this step, metrics)."""
        history = deque(self.history, maxlen=self.history.maxlen)
        if self.anchor_kind == "hard":
            history.append(accuracy)
            anchor = sum(history) / len(history)
            return anchor, anchor, history, {}
        prior = self.anchor if self.anchor is not None else (accuracy if self.c0 is None else float(self.c0))
        if not history:
            history.append(prior)
        window = torch.tensor([*history, accuracy], dtype=torch.float64)
        gain = min(max(self.eta * float(window.std(unbiased=False)), 0.0), 1.0)
        updated = (1.0 - gain) * prior + gain * accuracy
        history.append(updated)
        return prior, updated, history, {"hadw/eta_t": gain}

    def __call__(self, advantages: Tensor, batch: GroupedBatch, *, training: bool) -> tuple[Tensor, dict[str, float]]:
        correct = batch.correctness  # (N,) the verifier's correctness: the rewards unless the caller passed it
        low, high = torch.stack(correct.aminmax()).tolist()  # one pass, one host sync
        if low < 0 or high > 1:
            # diff = mu_q - C is a difference of accuracies; exp(|diff|) of arbitrary rewards overflows.
            what = "rewards" if correct is batch.rewards else "correctness"
            raise ValueError(
                f"ha_dw weights by accuracy and needs {what} in [0, 1], got {what} in "
                f"[{low}, {high}]; "
                + (
                    "pass the unshaped verifier score as correctness= (shaped rewards, e.g. DAPO's overlong "
                    "penalty, may leave [0, 1]) or rescale the rewards"
                    if what == "rewards"
                    else "correctness is the verifier's score before shaping"
                )
            )
        accuracy = float(correct.mean())  # y_t, over correctness, not the shaped reward (shaping may go below 0)
        anchor, updated, history, metrics = self._next_anchor(accuracy)
        if training:
            self.anchor, self.history = updated, history
        diff = batch.group_correctness - anchor  # (M,) mu_q - C, mu_q = the group's accuracy
        lam = self.lam

        def weight(adv: Tensor, diff_sign: Tensor, diff_size: Tensor) -> Tensor:
            direction = -torch.sign(adv) * diff_sign  # D in {-1, 0, 1}
            return lam * torch.exp(direction * diff_size)

        weights = batch.grouping.map(weight, advantages, torch.sign(diff), diff.abs())  # (N,)
        weight_min, weight_max = weights.aminmax()
        weight_mean, weight_max, weight_min = torch.stack([weights.mean(), weight_max, weight_min]).tolist()
        metrics.update(
            {
                "hadw/anchor": anchor,
                "hadw/batch_accuracy": accuracy,
                "hadw/weight_mean": weight_mean,
                "hadw/weight_max": weight_max,
                "hadw/weight_min": weight_min,
            }
        )
        return weights, metrics

    def state_dict(self) -> dict[str, Any]:
        return {"anchor_kind": self.anchor_kind, "anchor": self.anchor, "history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("anchor_kind") != self.anchor_kind:
            raise ValueError(
                f"ha_dw state has anchor {state.get('anchor_kind')!r}, this weighting has {self.anchor_kind!r}"
            )
        anchor = state["anchor"]
        self.anchor = None if anchor is None else float(anchor)
        self.history = deque((float(x) for x in state["history"]), maxlen=self.history.maxlen)


def list_weightings() -> list[str]:
    return WEIGHTINGS.names()
