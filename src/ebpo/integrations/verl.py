"""verl: ebpo's estimators as verl advantage estimators (``algorithm.adv_estimator=ebpo``).

verl looks advantage estimators up by name in
``verl.trainer.ppo.core_algos.ADV_ESTIMATOR_REGISTRY`` and calls them as
``fn(token_level_rewards, response_mask, index, config=None, **kwargs) ->
(advantages, returns)``, all tensors (bs, response_length), ``index`` the
numpy array of prompt uids. :func:`register` adds, under new names:

=================  =====================================================
``ebpo``           EBPO, per-batch prior (the authors' released code)
``ebpo_running``   EBPO, Welford prior across steps (the paper's Algorithm 1)
``ebpo_ema``       EBPO, exponentially forgetting prior
``ha_dw``          GRPO + HA-DW
``ebpo_ha_dw``     EBPO (per-batch prior) + HA-DW
``ebpo_hier``      hierarchical EBPO (per-topic prior), per-batch
``ebpo_hier_running``  hierarchical EBPO, Welford prior across steps
=================  =====================================================

Topics (for the hierarchical prior; every estimator accepts and validates
them): each sample's label in ``non_tensor_batch[TOPIC_KEY]`` (default
``data_source``, verl's dataset-name field; set ``EBPO_VERL_TOPIC_KEY`` to
use another key), hashed to stable integer ids
(:func:`ebpo.grouping.stable_topic_ids`). verl's ``compute_advantage``
passes an estimator only ``index`` (the uids) and ``config``, so
:func:`install_topic_forwarding` (run by the plugin) wraps it to hand the
batch's labels to ebpo's functions for the duration of the call; a
``topic_labels=`` keyword or a ``TOPIC_KEY`` keyword (verl variants that
forward ``data_source``) is used as is. Without labels every sample is one
topic: flat EBPO.

The sequence reward is ``token_level_rewards.sum(-1)``; the advantage is
broadcast over the response mask; returns equal advantages (as verl's GRPO).
verl computes advantages in the driver process, so stateful estimators live
in this module (:data:`ESTIMATORS`, one per name) and keep their state across
steps; :func:`save_estimator_states` / :func:`load_estimator_states` write and
read it next to a verl checkpoint (call them where you save and resume).

GBMPO divergences for verl's actor loss: verl's workers (the legacy FSDP and
Megatron actors and the new engine workers' ``ppo_loss``) all compute the KL
loss as ``core_algos.kl_penalty(logprob, ref_logprob, kl_penalty=
actor.kl_loss_type)`` and aggregate it with the policy loss's
``loss_agg_mode``. :func:`install_divergences` wraps that function so that
``kl_loss_type`` values ``ebpo:NAME`` (``ebpo:prob_l2``, ``ebpo:log_l2``,
``ebpo:kl_k1``/``_k2``/``_k3``, ``ebpo:neural_mirror`` or
``ebpo:neural_mirror=PATH`` for parameters from ``ebpo meta``) give ebpo's
per-token divergence; every other value goes to verl's own function. The
coefficient is verl's ``kl_loss_coef``.

Loading, with verl's external-modules mechanism (every verl process imports
the module when it imports verl, before the workers import the loss code):
``VERL_USE_EXTERNAL_MODULES=ebpo.integrations.verl_plugin`` runs
:func:`register` and :func:`install_divergences`. The functions here need
only torch and numpy; :func:`register` and :func:`install_divergences`
import verl.
"""

from __future__ import annotations

import contextvars
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ebpo.divergences import Divergence, build_divergence
from ebpo.estimators import AdvantagePipeline, build_estimator
from ebpo.grouping import stable_topic_ids

__all__ = [
    "ESTIMATORS",
    "SPECS",
    "compute_advantage",
    "register",
    "save_estimator_states",
    "load_estimator_states",
    "divergence_penalty",
    "install_divergences",
    "DIVERGENCE_PREFIX",
    "install_topic_forwarding",
    "TOPIC_KEY",
]

SPECS: dict[str, dict[str, Any]] = {
    "ebpo": {"name": "ebpo", "prior": "batch"},
    "ebpo_running": {"name": "ebpo", "prior": "running"},
    "ebpo_ema": {"name": "ebpo", "prior": "ema"},
    "ha_dw": {"name": "grpo", "weighting": "ha_dw"},
    "ebpo_ha_dw": {"name": "ebpo", "weighting": "ha_dw"},
    "ebpo_hier": {"name": "ebpo", "prior": "batch", "hierarchical": True},
    "ebpo_hier_running": {"name": "ebpo", "prior": "running", "hierarchical": True},
}
TOPIC_KEY = os.environ.get("EBPO_VERL_TOPIC_KEY", "data_source")
# The labels of the batch whose advantages verl is computing, set by install_topic_forwarding's wrapper
# for the duration of one compute_advantage call (a context variable: no state outlives the call).
_BATCH_TOPICS: contextvars.ContextVar[Any] = contextvars.ContextVar("ebpo_verl_batch_topics", default=None)
ESTIMATORS: dict[str, AdvantagePipeline] = {}
STATE_FILE = "ebpo_estimator_states.pt"


def _estimator(key: str) -> AdvantagePipeline:
    if key not in ESTIMATORS:
        if key not in SPECS:
            raise ValueError(f"unknown ebpo verl estimator {key!r}; choose one of {sorted(SPECS)}")
        spec = dict(SPECS[key])
        ESTIMATORS[key] = build_estimator(spec.pop("name"), **spec)
    return ESTIMATORS[key]


def _group_ids(index: Any) -> Tensor:
    """verl's uid array (strings or ints) -> integer group ids (N,)."""
    _, inverse = np.unique(np.asarray(index, dtype=object).astype(str), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.long)


def compute_advantage(
    key: str,
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: Any,
    training: bool = True,
    topic_labels: Any = None,
) -> tuple[Tensor, Tensor]:
    """Advantages (bs, T) and returns (bs, T) with verl's conventions; ``topic_labels`` (bs,) any labels, optional."""
    if token_level_rewards.shape != response_mask.shape:
        raise ValueError(
            f"token_level_rewards {tuple(token_level_rewards.shape)} and response_mask {tuple(response_mask.shape)} differ"
        )
    scores = token_level_rewards.sum(dim=-1)  # (bs,)
    topic_ids = (
        None if topic_labels is None else stable_topic_ids(list(np.asarray(topic_labels, dtype=object).reshape(-1)))
    )
    advantages, _ = _estimator(key)(
        scores.detach().float().cpu(), _group_ids(index), topic_ids=topic_ids, training=training
    )
    advantages = advantages.to(token_level_rewards.device, token_level_rewards.dtype).unsqueeze(-1) * response_mask
    return advantages, advantages


def _make(key: str):
    def fn(
        token_level_rewards: Tensor, response_mask: Tensor, index: Any = None, config: Any = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if index is None:
            raise ValueError(f"{key} is group-relative: verl must pass the uid index")
        labels = kwargs.get("topic_labels", kwargs.get(TOPIC_KEY))
        if labels is None:
            labels = _BATCH_TOPICS.get()
        return compute_advantage(key, token_level_rewards, response_mask, index, topic_labels=labels)

    fn.__name__ = f"ebpo_{key}_advantage"
    return fn


FUNCTIONS = {key: _make(key) for key in SPECS}


def register() -> list[str]:
    """Register every estimator in verl's registry; returns the names."""
    try:
        from verl.trainer.ppo.core_algos import register_adv_est
    except ImportError as exc:
        raise ImportError("ebpo.integrations.verl.register() needs verl installed (pip install verl)") from exc
    for key, fn in FUNCTIONS.items():
        register_adv_est(key)(fn)
    return sorted(FUNCTIONS)


def save_estimator_states(directory: str) -> str:
    path = os.path.join(directory, STATE_FILE)
    torch.save({key: est.state_dict() for key, est in ESTIMATORS.items()}, path)
    return path


def load_estimator_states(directory: str) -> None:
    path = os.path.join(directory, STATE_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{directory} has no {STATE_FILE}")
    from ebpo.fileio import load_tensors  # weights_only: a checkpoint folder is never unpickled

    states = load_tensors(path, what="ebpo estimator states")
    if not isinstance(states, dict):
        raise ValueError(f"{path} does not hold ebpo estimator states (a mapping of estimator name to state)")
    for key, state in states.items():
        _estimator(key).load_state_dict(state)


def install_topic_forwarding(ray_trainer: Any = None) -> None:
    """Wrap verl's ``ray_trainer.compute_advantage(data, adv_estimator, ...)`` so ebpo's functions see the topics.

    For ebpo's estimator names the wrapper reads ``data.non_tensor_batch[TOPIC_KEY]``
    (when present) and makes it visible to the estimator function for that
    one call; everything else goes to verl's function unchanged. Idempotent.
    ``ray_trainer``: the module to patch (default: verl's; a stand-in in tests).
    """
    if ray_trainer is None:
        try:
            from verl.trainer.ppo import ray_trainer
        except ImportError as exc:
            raise ImportError(
                "ebpo.integrations.verl.install_topic_forwarding() needs verl installed (pip install verl)"
            ) from exc
    original = ray_trainer.compute_advantage
    if getattr(original, "_ebpo_wrapped", None) is not None:
        return

    def compute_advantage(data: Any, adv_estimator: Any, *args: Any, **kwargs: Any) -> Any:
        name = getattr(adv_estimator, "value", adv_estimator)  # verl passes a str or its AdvantageEstimator enum
        non_tensor = getattr(data, "non_tensor_batch", None) or {}
        if name not in FUNCTIONS or TOPIC_KEY not in non_tensor:
            return original(data, adv_estimator, *args, **kwargs)
        token = _BATCH_TOPICS.set(non_tensor[TOPIC_KEY])
        try:
            return original(data, adv_estimator, *args, **kwargs)
        finally:
            _BATCH_TOPICS.reset(token)

    compute_advantage.__doc__ = original.__doc__
    compute_advantage._ebpo_wrapped = original  # type: ignore[attr-defined]
    ray_trainer.compute_advantage = compute_advantage


# ------------------------------------------------------------------ divergences
DIVERGENCE_PREFIX = "ebpo:"
_DIVERGENCES: dict[str, Divergence] = {}


def _divergence(kind: str) -> Divergence:
    """``ebpo:prob_l2``, ``ebpo:kl_k2``, ``ebpo:neural_mirror=PATH`` -> the divergence (built once per name)."""
    if kind not in _DIVERGENCES:
        spec = kind[len(DIVERGENCE_PREFIX) :]
        name, _, path = spec.partition("=")
        options: dict[str, Any] = {}
        if name.startswith("kl_"):
            name, options["estimator"] = "kl", name[3:]
        if path:
            if name != "neural_mirror":
                raise ValueError(f"kl_loss_type {kind!r}: only ebpo:neural_mirror takes a parameter file (=PATH)")
            options["params_path"] = path
        _DIVERGENCES[kind] = build_divergence(name, **options)
    return _DIVERGENCES[kind]


def divergence_penalty(logprob: Tensor, ref_logprob: Tensor, kl_penalty: str) -> Tensor:
    """Per-token ebpo divergence (bs, T) for an ``ebpo:...`` ``kl_loss_type``; verl's signature."""
    if not kl_penalty.startswith(DIVERGENCE_PREFIX):
        raise ValueError(f"not an ebpo divergence: {kl_penalty!r} (expected {DIVERGENCE_PREFIX}NAME)")
    return _divergence(kl_penalty)(logprob, ref_logprob.to(logprob.dtype))


def install_divergences() -> None:
    """Route ``ebpo:...`` values of verl's ``kl_penalty`` to :func:`divergence_penalty` (idempotent).

    Replaces ``verl.trainer.ppo.core_algos.kl_penalty`` with a wrapper that
    keeps verl's behaviour for every other value. Modules that bind the name
    at import (verl's actors and ``workers/utils/losses.py``) see the wrapper
    only if they are imported after this call, which the external-modules
    mechanism guarantees (see :mod:`ebpo.integrations.verl_plugin`).
    """
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as exc:
        raise ImportError(
            "ebpo.integrations.verl.install_divergences() needs verl installed (pip install verl)"
        ) from exc
    original = core_algos.kl_penalty
    if getattr(original, "_ebpo_wrapped", None) is not None:
        return

    def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kl_penalty: str) -> Tensor:
        if isinstance(kl_penalty, str) and kl_penalty.startswith(DIVERGENCE_PREFIX):
            return divergence_penalty(logprob, ref_logprob, kl_penalty)
        return original(logprob, ref_logprob, kl_penalty)

    kl_penalty.__doc__ = original.__doc__
    kl_penalty._ebpo_wrapped = original  # type: ignore[attr-defined]
    core_algos.kl_penalty = kl_penalty
