"""``--method`` presets, named after the papers; each sets components only.

A preset is a dict of :class:`~ebpo.train.config.TrainConfig` field values
applied over the defaults and under the YAML file and command-line flags, so
any of them can be overridden (``--method grpo --loss-agg token-mean``).
Sources: docs/methods.md#method-presets. Departures:

* ``grpo`` trains without a KL term (as DAPO and Dr. GRPO argue, and as the
  HA-DW runs do); add ``--divergence kl --div-coef 0.04`` for DeepSeekMath's.
* ``ebpo`` uses the authors' settings: token-mean aggregation and a k3 KL
  with coefficient 0.001; the prior defaults to the released code's
  per-batch statistics (``--estimator-options '{prior: running}'`` for the
  paper's Algorithm 1).
* ``gbmpo-*``: Dr. GRPO base objective; the papers do not publish the
  divergence coefficient for the tiny setting, we use 0.1 (ProbL2) and
  0.1 (neural mirror, parameters initialised with seed 0).
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "list_methods"]

_GRPO: dict[str, Any] = {
    "estimator": "grpo",
    "loss": "clip",
    "loss_agg": "seq-mean-token-mean",
    "eps_low": 0.2,
    "eps_high": 0.2,
}
_EBPO: dict[str, Any] = {
    "estimator": "ebpo",
    "loss": "clip",
    "loss_agg": "token-mean",
    "divergence": "kl",
    "divergence_options": {"estimator": "k3"},
    "div_coef": 0.001,
}
_DR_GRPO: dict[str, Any] = {**_GRPO, "estimator": "dr_grpo", "loss_agg": "seq-mean-token-sum-norm"}

PRESETS: dict[str, dict[str, Any]] = {
    "grpo": _GRPO,
    "dr_grpo": _DR_GRPO,
    "dapo": {
        **_GRPO,
        "loss_agg": "token-mean",
        "eps_high": 0.28,
        "dynamic_sampling": True,
        "overlong_buffer": 4,
        "overlong_penalty": 1.0,
    },
    "rloo": {**_GRPO, "estimator": "rloo"},
    "entropymech": {**_GRPO, "loss": "clip_cov", "loss_agg": "token-mean"},
    "ebpo": _EBPO,
    "ebpo-topic": {**_EBPO, "curriculum": "topic"},
    "ebpo-diff": {**_EBPO, "curriculum": "difficulty"},
    "ha_dw": {**_GRPO, "weighting": "ha_dw"},
    "ebpo+ha_dw": {**_EBPO, "weighting": "ha_dw"},
    "gbmpo-probl2": {**_DR_GRPO, "divergence": "prob_l2", "divergence_options": {}, "div_coef": 0.1},
    "gbmpo-mirror": {**_DR_GRPO, "divergence": "neural_mirror", "divergence_options": {"seed": 0}, "div_coef": 0.1},
}

# Fields every preset resets, so that switching methods never inherits a
# component from the defaults (e.g. ebpo's KL leaking into grpo).
_RESET: dict[str, Any] = {
    "weighting": None,
    "weighting_options": {},
    "estimator_options": {},
    "divergence": None,
    "divergence_options": {},
    "div_coef": 0.0,
    "curriculum": "shuffle",
    "dynamic_sampling": False,
    "overlong_buffer": 0,
    "loss_options": {},
}


def preset(method: str) -> dict[str, Any]:
    """Field values of ``method`` (ValueError naming the choices when unknown)."""
    if method not in PRESETS:
        raise ValueError(f"unknown method {method!r}; choose one of {list_methods()}")
    return {**_RESET, **PRESETS[method]}


def list_methods() -> list[str]:
    return list(PRESETS)
