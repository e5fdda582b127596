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
* ``dapo``'s overlong buffer is derived from ``max_new_tokens`` (a fifth of
  it, :func:`dapo_overlong_buffer`), as in the paper's 4096 of 20480 tokens,
  wherever ``max_new_tokens`` is set (flag, YAML, the task's recommendation);
  ``--overlong-buffer N`` (flag or YAML) sets it instead.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, NamedTuple

__all__ = ["PRESETS", "DERIVED", "Derived", "list_methods", "derived", "describe", "dapo_overlong_buffer"]


def dapo_overlong_buffer(max_new_tokens: int) -> int:
    """DAPO's soft overlong buffer for ``max_new_tokens``: a fifth of it, at least 1, below ``max_new_tokens``.

    DAPO (arXiv 2503.14476, section 3.4 and its experiments) ramps the penalty
    over the last 4096 of 20480 tokens: 20%. 44 tokens (the stepwise task) -> 8,
    1024 -> 204. For ``max_new_tokens`` = 1 there is no room for a buffer: 0 (shaping off).
    """
    return min(max(1, max_new_tokens // 5), max_new_tokens - 1)


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
        "overlong_penalty": 1.0,  # overlong_buffer: DERIVED from max_new_tokens
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


class Derived(NamedTuple):
    """A field a preset derives from the resolved config instead of fixing it."""

    rule: Callable[[dict[str, Any]], Any]  # the resolved values -> the field's value
    text: str  # the rule in words (``--list-methods``)


# A fixed overlong buffer of 4 tokens was all of a 4-token completion and nothing of a 1k-token one.
DERIVED: dict[str, dict[str, Derived]] = {
    "dapo": {
        "overlong_buffer": Derived(lambda values: dapo_overlong_buffer(values["max_new_tokens"]), "max_new_tokens // 5")
    },
}


def preset(method: str) -> dict[str, Any]:
    """Field values of ``method`` (ValueError naming the choices when unknown); :func:`derived` adds the rest."""
    if method not in PRESETS:
        raise ValueError(f"unknown method {method!r}; choose one of {list_methods()}")
    return {k: v for k, v in {**_RESET, **PRESETS[method]}.items() if k not in DERIVED.get(method, {})}


def derived(method: str, values: dict[str, Any], given: Collection[str]) -> dict[str, Any]:
    """The fields ``method`` derives from the resolved ``values`` (after the task, the preset, the YAML file and
    the flags), except those in ``given`` (set by the YAML file or a flag, which win)."""
    return {name: field.rule(values) for name, field in DERIVED.get(method, {}).items() if name not in given}


def describe(method: str) -> str:
    """One line for ``ebpo train --list-methods``: the preset's values and the fields it derives."""
    fields = ", ".join(f"{name} = {field.text}" for name, field in DERIVED.get(method, {}).items())
    return str(preset(method)) + (f" (derived: {fields})" if fields else "")


def list_methods() -> list[str]:
    return list(PRESETS)
