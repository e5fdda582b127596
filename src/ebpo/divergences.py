"""Per-token divergences to the reference policy: KL estimators and GBMPO's Bregman divergences.

One interface: ``divergence(logprobs, ref_logprobs) -> (B, T)``, both inputs
the log-probabilities of the *sampled* tokens (B, T) under the current and the
reference policy. The result is differentiable w.r.t. ``logprobs`` and is
added per token to the policy loss before aggregation (GBMPO, arXiv
2602.04380, as released; docs/methods.md#divergences).

* ``kl`` (``estimator="k1"|"k2"|"k3"``, Schulman's estimators of KL(pi||pi_ref)
  from samples of pi; with lr = ref - logp: k1 = -lr, k2 = lr^2 / 2,
  k3 = exp(lr) - lr - 1). k2 and k3 are >= 0 per token; k1 is not (only its
  expectation under the policy, the KL, is).
* ``prob_l2``: (p - p_ref)^2, the Bregman divergence of h(y) = y^2. Its
  gradient w.r.t. log p is 2 (p - p_ref) p, bounded; k3's, 1 - p_ref / p,
  is unbounded as p -> 0.
* ``log_l2``: (log p - log p_ref)^2 (= 2 k2; kept as GBMPO's named variant).
* ``neural_mirror``: D_h for a learned convex mirror map
  h(y) = sum_j v_j H_j(y) + (a/2) y^2 + c (y log y - y), H_j' = act_j(w_j y + b_j),
  126 units (6 activations x 21), 380 parameters as one flat vector.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from ebpo.registry import Registry

__all__ = [
    "Divergence",
    "DIVERGENCES",
    "build_divergence",
    "list_divergences",
    "KL",
    "ProbL2",
    "LogL2",
    "NeuralMirror",
]


class Divergence(Protocol):
    """What a registered divergence implements: a per-token penalty towards the reference policy.

    Built by :func:`build_divergence` (``--divergence NAME`` in ``ebpo train``, a registered name or
    ``package.module:attr``) with its options as keyword arguments. The policy loss adds ``div_coef`` times
    its value to each token's loss before aggregation, so padding is masked there, not here.
    """

    needs_reference: bool
    """Whether it reads ``ref_logprobs`` (True for every built-in one): the trainer builds the frozen
    reference policy only for a divergence that needs it (one without the attribute is taken to)."""

    def __call__(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        """The divergence per token (B, T), differentiable w.r.t. ``logprobs``.

        Args:
            logprobs: (B, T) log-probabilities of the sampled tokens under the current policy (with grad).
            ref_logprobs: (B, T) log-probabilities of the same tokens under the reference policy (detached).
        """
        ...


DIVERGENCES: Registry[Divergence] = Registry("divergence")


def _check(logprobs: Tensor, ref_logprobs: Tensor) -> None:
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} must have the same shape"
        )


_KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {
    "k1": lambda lr: -lr,
    "k2": lambda lr: 0.5 * lr * lr,
    "k3": lambda lr: torch.expm1(lr) - lr,  # exp(lr) - lr - 1, expm1 for accuracy near lr = 0
}


@DIVERGENCES.register("kl")
class KL:
    """KL(pi || pi_ref) per token, estimator ``k1``, ``k2`` or ``k3`` (default, as GRPO)."""

    needs_reference = True

    def __init__(self, estimator: str = "k3") -> None:
        if estimator not in _KL_ESTIMATORS:
            raise ValueError(f"kl estimator must be one of {sorted(_KL_ESTIMATORS)}, got {estimator!r}")
        self.estimator = estimator

    def __call__(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        _check(logprobs, ref_logprobs)
        return _KL_ESTIMATORS[self.estimator](ref_logprobs - logprobs)


@DIVERGENCES.register("prob_l2")
class ProbL2:
    """GBMPO ProbL2: (p - p_ref)^2 on the sampled token's probability."""

    needs_reference = True

    def __call__(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        _check(logprobs, ref_logprobs)
        return (logprobs.exp() - ref_logprobs.exp()) ** 2


@DIVERGENCES.register("log_l2")
class LogL2:
    """GBMPO L2 in log space: (log p - log p_ref)^2."""

    needs_reference = True

    def __call__(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        _check(logprobs, ref_logprobs)
        return (logprobs - ref_logprobs) ** 2


# ----------------------------------------------------------------- neural mirror map

_LOG_DELTA = 1e-3
UNITS_PER_ACTIVATION = 21
ACTIVATIONS = ("cube", "square", "sqrt", "cbrt", "log", "exp")
NUM_UNITS = UNITS_PER_ACTIVATION * len(ACTIVATIONS)  # 126
NUM_PARAMS = 3 * NUM_UNITS + 2  # v, w, b per unit, then a, c: 380


def _act(kind: int, x: Tensor) -> Tensor:
    """act_j(x) for activation index ``kind`` (the clamped ones are constant for x < 0)."""
    xp = x.clamp_min(0.0)
    return (
        x**3,
        x**2,
        xp.sqrt(),
        xp.pow(1.0 / 3.0),
        torch.log(xp + _LOG_DELTA),
        x.exp(),
    )[kind]


def _antiderivative(kind: int, x: Tensor) -> Tensor:
    """F with F' = act (F(0) chosen freely; the clamped ones are linear for x < 0)."""
    xp = x.clamp_min(0.0)
    xn = x.clamp_max(0.0)  # the part of x below 0, where act is constant act(0)
    return (
        x**4 / 4,
        x**3 / 3,
        (2.0 / 3.0) * xp.pow(1.5),
        0.75 * xp.pow(4.0 / 3.0),
        (xp + _LOG_DELTA) * torch.log(xp + _LOG_DELTA) - xp + math.log(_LOG_DELTA) * xn,
        x.exp(),
    )[kind]


def _act_slope(kind: int, x: Tensor) -> Tensor:
    """act'(x), used only for the w -> 0 Taylor branch."""
    xp = x.clamp_min(1e-12)
    pos = (x > 0).to(x.dtype)
    return (
        3 * x**2,
        2 * x,
        pos * 0.5 / xp.sqrt(),
        pos * (1.0 / 3.0) * xp.pow(-2.0 / 3.0),
        pos / (x.clamp_min(0.0) + _LOG_DELTA),
        x.exp(),
    )[kind]


@DIVERGENCES.register("neural_mirror")
class NeuralMirror:
    """Bregman divergence of GBMPO's neural mirror map, in closed form.

    For unit j with x = w y + b and x0 = w y0 + b, its contribution to
    D_h(y, y0) = h(y) - h(y0) - h'(y0)(y - y0) is
    (v / w) [F(x) - F(x0) - act(x0)(x - x0)] (a Bregman divergence of F in x,
    rescaled), which tends to v w act'(x0) (y - y0)^2 / 2 as w -> 0; we use that
    Taylor form for |w| < 1e-6. Plus (a/2)(y - y0)^2 and
    c (y log(y/y0) - y + y0). Computed in float64, returned in the input dtype.
    With ``project_nonneg`` (convex h) D >= 0 holds exactly: each unit's
    Bregman term, which is >= 0 in exact arithmetic, is clamped at 0 where
    cancellation next to the diagonal would make it a rounding-level negative.

    Args:
        params: flat (380,) vector [v (126), w (126), b (126), a, c]; if None,
            drawn U(0, ``init_scale``) from ``seed`` (paper: U(0, 0.01)).
        params_path: load the vector from a file written by :meth:`save`.
        project_nonneg: clamp parameters to >= 0 (default). Every activation is
            non-decreasing, so v, w, a, c >= 0 make h' non-decreasing, h convex
            and D >= 0. The released code does not keep parameters
            non-negative during ES, so convexity (and D >= 0) can break;
            ``project_nonneg=False`` reproduces that.
    """

    needs_reference = True
    num_params = NUM_PARAMS

    def __init__(
        self,
        params: Tensor | None = None,
        *,
        params_path: str | Path | None = None,
        seed: int = 0,
        init_scale: float = 0.01,
        project_nonneg: bool = True,
    ) -> None:
        if params is not None and params_path is not None:
            raise ValueError("give neural_mirror either params or params_path, not both")
        if params_path is not None:
            params = self._read(Path(params_path))
        if params is None:
            gen = torch.Generator().manual_seed(seed)
            params = torch.rand(NUM_PARAMS, generator=gen, dtype=torch.float64) * init_scale
        params = torch.as_tensor(params, dtype=torch.float64).detach().reshape(-1).clone()
        if params.numel() != NUM_PARAMS:
            raise ValueError(f"neural_mirror needs {NUM_PARAMS} parameters, got {params.numel()}")
        if not bool(torch.isfinite(params).all()):
            raise ValueError("neural_mirror parameters must be finite")
        self.project_nonneg = project_nonneg
        self._params = params.clamp_min(0.0) if project_nonneg else params

    @property
    def flat_params(self) -> Tensor:
        return self._params.clone()

    def with_params(self, params: Tensor) -> NeuralMirror:
        return NeuralMirror(params, project_nonneg=self.project_nonneg)

    def _split(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        p = self._params
        n = NUM_UNITS
        return p[:n], p[n : 2 * n], p[2 * n : 3 * n], p[3 * n], p[3 * n + 1]

    def h_prime(self, y: Tensor) -> Tensor:
        """h'(y) elementwise (float64)."""
        v, w, b, a, c = self._split()
        y = y.to(torch.float64)
        x = y.unsqueeze(-1) * w + b  # (..., 126)
        acts = torch.cat([_act(k, x[..., k * 21 : (k + 1) * 21]) for k in range(len(ACTIVATIONS))], dim=-1)
        return (acts * v).sum(-1) + a * y + c * torch.log(y)

    def __call__(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        _check(logprobs, ref_logprobs)
        v, w, b, a, c = self._split()
        lp, ref = logprobs.to(torch.float64), ref_logprobs.to(torch.float64)
        y, y0 = lp.exp().unsqueeze(-1), ref.exp().unsqueeze(-1)  # (..., 1)
        x, x0 = y * w + b, y0 * w + b  # (..., 126)
        small = w.abs() < 1e-6  # (126,)
        w_safe = torch.where(small, torch.ones_like(w), w)
        parts = []
        for k in range(len(ACTIVATIONS)):  # six activation groups, each vectorised over tokens x 21 units
            sl = slice(k * UNITS_PER_ACTIVATION, (k + 1) * UNITS_PER_ACTIVATION)
            xk, x0k = x[..., sl], x0[..., sl]
            bregman = _antiderivative(k, xk) - _antiderivative(k, x0k) - _act(k, x0k) * (xk - x0k)
            if self.project_nonneg:
                # F is convex (act non-decreasing), so its Bregman divergence is >= 0; next to the
                # diagonal the three terms cancel and rounding leaves values down to -1e-13.
                # The true value there is below that rounding level, so 0 is the nearest representable answer.
                bregman = bregman.clamp_min(0.0)
            taylor = 0.5 * w[sl] * _act_slope(k, x0k) * (y - y0) ** 2
            parts.append(torch.where(small[sl], taylor, bregman / w_safe[sl]))
        units = (torch.cat(parts, dim=-1) * v).sum(-1)  # (...)
        y, y0 = y.squeeze(-1), y0.squeeze(-1)
        quadratic = 0.5 * a * (y - y0) ** 2
        # c * (y log(y / y0) - y + y0) = c * y0 * (d e^d - (e^d - 1)), d = log y - log y0: written with
        # expm1 so that it does not cancel catastrophically next to the diagonal.
        d = lp - ref
        entropy_core = d * d.exp() - torch.expm1(d)
        if self.project_nonneg:
            entropy_core = entropy_core.clamp_min(0.0)  # t log t - t + 1 >= 0; rounding only below that
        entropy = c * y0 * entropy_core
        return (units + quadratic + entropy).to(logprobs.dtype)

    def save(self, path: str | Path) -> None:
        """Write the parameters as JSON (readable, diff-able, exact float64 round trip)."""
        Path(path).write_text(
            json.dumps({"kind": "ebpo.neural_mirror", "num_params": NUM_PARAMS, "params": self._params.tolist()})
        )

    @classmethod
    def load(cls, path: str | Path, *, project_nonneg: bool = True) -> NeuralMirror:
        return cls(params_path=path, project_nonneg=project_nonneg)

    @staticmethod
    def _read(path: Path) -> Tensor:
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read neural_mirror parameters from {str(path)!r}: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("kind") != "ebpo.neural_mirror":
            raise ValueError(f"{str(path)!r} is not a neural_mirror parameter file (written by NeuralMirror.save)")
        return torch.tensor(payload["params"], dtype=torch.float64)


def build_divergence(name: str, **options: object) -> Divergence:
    """Build a divergence by registry name or ``module:attr`` path."""
    return DIVERGENCES.build(name, **options)


def list_divergences() -> list[str]:
    return DIVERGENCES.names()
