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
``jspo``           JSPO, James-Stein shrinkage baseline (stateless)
``spo``            SPO, a Beta success tracker per prompt across steps (needs the prompt key)
``krpo``           KRPO, a fresh Kalman filter per group (the released code; stateless)
``krpo_carry``     KRPO, each prompt's filter carried across steps (``carry=True``; needs the prompt key)
=================  =====================================================

Options (``algorithm.ebpo``, a mapping in verl's algorithm config; :class:`VerlOptions`): each name above is
a fixed estimator, and ``algorithm.ebpo`` sets the rest of its options, e.g. on verl's command line::

    +algorithm.ebpo.estimator_options.decay=0.95       # ebpo_ema's decay
    +algorithm.ebpo.weighting_options.lam=1.5          # HA-DW's lambda (ha_dw, ebpo_ha_dw)
    +algorithm.ebpo.correctness_threshold=0.5          # HA-DW's correctness: score >= 0.5
    +algorithm.ebpo.topic_key=subject                  # the hierarchical prior's topics
    +algorithm.ebpo.prompt_key=problem_id              # the prompt key of spo / krpo_carry

(``+`` because verl's config does not declare the key; verl 0.9.1 passes ``config.algorithm`` to the
estimator as it is, never through its ``AlgoConfig`` dataclass.) Unknown options, and options the name
already fixes (``prior``, ``hierarchical``, the weighting, and the std division that
``norm_adv_by_std_in_grpo`` sets), are refused at the first advantage call with a message.

Topics (for the hierarchical prior): each sample's label in the non-tensor field ``topic_key`` (default
``data_source``, verl's dataset-name field, or ``$EBPO_VERL_TOPIC_KEY``), hashed to stable integer ids
(:func:`ebpo.grouping.stable_topic_ids`). Correctness (for HA-DW, whose accuracy and anchor are success
rates, so rewards such as a -1/1 score cannot stand in for it): without ``correctness_threshold``, each
response's ``acc`` (or ``correctness_key``) from verl's reward extra info (a reward function returning
``{"score": s, "acc": 0 or 1}``), which must lie in [0, 1]; with it, ``score >= correctness_threshold``,
the score being verl's sequence score before ``use_kl_in_reward``'s penalty (or the ``correctness_key``
value, when that is set too). A hierarchical name without topics, or HA-DW without a correctness, raises
at the first advantage call, naming what to set: never a silent flat prior or a crash hours later.

Prompt keys (for ``spo`` and ``krpo_carry``, which keep state per prompt across steps): verl's ``uid`` is
drawn afresh for every prompt at every step, so it cannot name a prompt across steps and is never used as
one. Each sample's key is the non-tensor field ``prompt_key`` (default ``index``, which verl's dataset copies
from each row's ``extra_info["index"]``), or else that entry of the sample's ``extra_info``, hashed with
:func:`ebpo.estimators.stable_prompt_ids`. verl's dataset gives a row without ``extra_info["index"]`` the
index 0, so a batch whose distinct uids all carry one key is refused, as is a batch with no key at all.

verl's ``compute_advantage`` passes an estimator only ``index`` (the uids) and ``config``; the batch's
other fields reach ebpo's functions through :func:`install_batch_forwarding` (run by the plugin), for the
duration of one call: the legacy trainer's ``non_tensor_batch`` holds the dataset's fields and the reward
extra info; verl's v1 trainer (the default) hands its advantage step only the uids, response masks and
scores, so the wrapper reads the topic and ``extra_fields["reward_extra_info"]`` of the same samples from
verl's TransferQueue. The rows are matched by uid, and a mismatch raises. A ``topic_labels=`` or ``prompt_labels=``
keyword, or keywords named ``topic_key`` / ``correctness_key`` / ``prompt_key`` (verl variants that forward
the fields; not ``index``, which is verl's uid argument), are used as they are.

The sequence reward is ``token_level_rewards.sum(-1)``; the advantage is
broadcast over the response mask; returns equal advantages (as verl's GRPO).
verl's ``algorithm.norm_adv_by_std_in_grpo`` (default true) reaches every name
through the ``config`` verl passes: false removes the estimator's one std
division, GRPO's per-group std for ``ha_dw`` (``scale="none"``, Dr. GRPO +
HA-DW) and EBPO's batch-level standardisation for the ``ebpo*`` names
(``std_normalize=False``), as it does for verl's own GRPO family
(:func:`estimator_spec`).

verl computes advantages in the trainer's process (the driver's ``TaskRunner``
Ray actor, which also saves and loads checkpoints), so stateful estimators live
in this module (:data:`ESTIMATORS`, one per name) and keep their state across
steps. :func:`install_checkpointing` (run by the plugin) saves that state with
every verl checkpoint, as ``global_step_N/ebpo_estimator_states.pt`` beside
verl's ``data.pt``, and restores it when verl resumes (``trainer.resume_mode``
``auto`` or ``resume_path``); :func:`save_estimator_states` /
:func:`load_estimator_states` do the same by hand.

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
:func:`register`, :func:`install_divergences`, :func:`install_batch_forwarding`
and :func:`install_checkpointing`. The functions here need only torch and
numpy; the ``register`` and ``install_*`` functions import verl.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import json
import math
import os
from collections import ChainMap
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ebpo.divergences import Divergence, build_divergence
from ebpo.estimators import AdvantagePipeline, build_estimator, stable_prompt_ids
from ebpo.grouping import stable_topic_ids

__all__ = [
    "ESTIMATORS",
    "SPECS",
    "STATE_FILE",
    "OPTIONS_KEY",
    "VerlOptions",
    "verl_options",
    "compute_advantage",
    "estimator_spec",
    "register",
    "save_estimator_states",
    "load_estimator_states",
    "install_checkpointing",
    "divergence_penalty",
    "install_divergences",
    "DIVERGENCE_PREFIX",
    "install_batch_forwarding",
    "TOPIC_KEY",
    "PROMPT_KEY",
    "CORRECTNESS_KEY",
]

SPECS: dict[str, dict[str, Any]] = {
    "ebpo": {"name": "ebpo", "prior": "batch"},
    "ebpo_running": {"name": "ebpo", "prior": "running"},
    "ebpo_ema": {"name": "ebpo", "prior": "ema"},
    "ha_dw": {"name": "grpo", "weighting": "ha_dw"},
    "ebpo_ha_dw": {"name": "ebpo", "weighting": "ha_dw"},
    "ebpo_hier": {"name": "ebpo", "prior": "batch", "hierarchical": True},
    "ebpo_hier_running": {"name": "ebpo", "prior": "running", "hierarchical": True},
    "jspo": {"name": "jspo"},
    "spo": {"name": "spo"},
    "krpo": {"name": "krpo"},
    "krpo_carry": {"name": "krpo", "carry": True},
}
# What the names fix (and so algorithm.ebpo.estimator_options may not set): the prior, the topics, the weighting.
_NAMED_OPTIONS = frozenset(option for spec in SPECS.values() for option in spec) | {"weighting_options"}
TOPIC_KEY = os.environ.get("EBPO_VERL_TOPIC_KEY", "data_source")  # the default of algorithm.ebpo.topic_key
PROMPT_KEY = "index"  # the default of algorithm.ebpo.prompt_key: verl's dataset copies extra_info["index"] there
CORRECTNESS_KEY = "acc"  # the default of algorithm.ebpo.correctness_key: verl's DAPO-style scorers return it
OPTIONS_KEY = "ebpo"  # algorithm.ebpo
ESTIMATORS: dict[str, AdvantagePipeline] = {}
STATE_FILE = "ebpo_estimator_states.pt"
# The option that removes each base estimator's std division (verl's norm_adv_by_std_in_grpo=False).
# jspo (no std division, as its code) and krpo (its scale is the filter's 1/sqrt(P), not a std) have none.
_STD_OFF: dict[str, dict[str, Any]] = {
    "grpo": {"scale": "none"},
    "ebpo": {"std_normalize": False},
    "spo": {"std_normalize": False},
    "jspo": {},
    "krpo": {},
}
_BUILT_WITH: dict[str, str] = {}  # the full spec (JSON) each of ESTIMATORS was built with


@dataclasses.dataclass(frozen=True)
class VerlOptions:
    """ebpo's options in verl's config, ``algorithm.ebpo`` (read by :func:`verl_options`)."""

    estimator_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Options of the name's base estimator (``ebpo``: ``decay`` for ``ebpo_ema``, ``center``, ``eps``,
    ``pooling``, ``topic_prior_groups``; ``grpo`` for ``ha_dw``: ``unbiased_std``, ``eps``); what the name
    fixes (``prior``, ``hierarchical``) and the std division (``norm_adv_by_std_in_grpo``) are refused."""
    weighting_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """HA-DW's options for ``ha_dw`` and ``ebpo_ha_dw``: ``lam``, ``anchor``, ``eta``, ``m``, ``k``, ``c0``."""
    correctness_threshold: float | None = None
    """HA-DW's correctness is ``score >= correctness_threshold`` (verl's sequence score before
    ``use_kl_in_reward``; the ``correctness_key`` value instead, when that is set). Unset: the correctness is
    the reward extra info's ``correctness_key`` itself, which must lie in [0, 1]."""
    correctness_key: str | None = None
    """The reward extra info field that holds each response's correctness (default ``acc``, what a reward
    function returning ``{"score": s, "acc": ...}`` gives)."""
    topic_key: str = TOPIC_KEY
    """The non-tensor field with each sample's topic, for ``ebpo_hier*`` (default ``data_source``, or
    ``$EBPO_VERL_TOPIC_KEY``)."""
    prompt_key: str = PROMPT_KEY
    """The non-tensor field (or else the ``extra_info`` entry) naming each sample's prompt the same way at every
    step, for ``spo`` and ``krpo_carry`` (default ``index``, verl's copy of ``extra_info["index"]``); never the uid."""


_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(VerlOptions))


def _plain(value: Any) -> Any:
    """verl's OmegaConf nodes (DictConfig, ListConfig) or plain containers -> dicts, lists and scalars."""
    items = getattr(value, "items", None)
    if callable(items):
        return {str(k): _plain(v) for k, v in items()}
    if isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return value
    if hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    return value


def verl_options(config: Any) -> VerlOptions:
    """``config.ebpo`` (verl's algorithm config, a DictConfig or a dict) as :class:`VerlOptions`, validated.

    >>> verl_options({"ebpo": {"weighting_options": {"lam": 1.5}}}).weighting_options
    {'lam': 1.5}
    >>> verl_options({"ebpo": {"lamda": 1.5}})
    Traceback (most recent call last):
    ...
    ValueError: algorithm.ebpo.lamda is not an ebpo option; the options are estimator_options, weighting_options, correctness_threshold, correctness_key, topic_key, prompt_key
    """
    raw = _plain(_config_value(config, OPTIONS_KEY, None))
    if raw is None:
        return VerlOptions()
    where = f"algorithm.{OPTIONS_KEY}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping of ebpo options ({', '.join(_OPTION_NAMES)}), got {raw!r}")
    for name in raw:
        if name not in _OPTION_NAMES:
            raise ValueError(f"{where}.{name} is not an ebpo option; the options are {', '.join(_OPTION_NAMES)}")
    for name in ("estimator_options", "weighting_options"):
        if not isinstance(raw.get(name, {}), dict):
            raise ValueError(f"{where}.{name} must be a mapping of option names to values, got {raw[name]!r}")
    for name in ("correctness_key", "topic_key", "prompt_key"):
        if name in raw and not (isinstance(raw[name], str) and raw[name]):
            raise ValueError(f"{where}.{name} must name a field of verl's batch, got {raw[name]!r}")
    threshold = raw.get("correctness_threshold")
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold)
    ):
        raise ValueError(f"{where}.correctness_threshold must be a finite number, got {threshold!r}")
    return VerlOptions(**raw)


def estimator_spec(
    key: str, norm_adv_by_std_in_grpo: bool = True, options: VerlOptions | None = None
) -> dict[str, Any]:
    """The ``build_estimator`` spec of a verl name: ``SPECS[key]``, its std division removed when the flag is False,
    and the options of ``algorithm.ebpo``.

    >>> estimator_spec("ha_dw", norm_adv_by_std_in_grpo=False)
    {'name': 'grpo', 'weighting': 'ha_dw', 'scale': 'none'}
    >>> estimator_spec("ebpo_ema", options=VerlOptions(estimator_options={"decay": 0.95}))
    {'name': 'ebpo', 'prior': 'ema', 'decay': 0.95}
    """
    if key not in SPECS:
        raise ValueError(f"unknown ebpo verl estimator {key!r}; choose one of {sorted(SPECS)}")
    spec = dict(SPECS[key])
    std_off = _STD_OFF[spec["name"]]
    if not norm_adv_by_std_in_grpo:
        spec.update(std_off)
    if options is None:
        return spec
    where = f"algorithm.{OPTIONS_KEY}"
    for name in options.estimator_options:
        if name in _NAMED_OPTIONS:
            raise ValueError(
                f"{where}.estimator_options.{name}: algorithm.adv_estimator={key} fixes it ({SPECS[key]}); choose "
                f"the name that has the {name} you want, one of {sorted(SPECS)}"
            )
        if name in std_off:
            raise ValueError(
                f"{where}.estimator_options.{name}: set by algorithm.norm_adv_by_std_in_grpo (false removes the std "
                f"division); set that instead"
            )
    spec.update(options.estimator_options)
    if options.weighting_options:
        if "weighting" not in spec:
            with_weighting = sorted(k for k, v in SPECS.items() if "weighting" in v)
            raise ValueError(
                f"{where}.weighting_options: algorithm.adv_estimator={key} has no weighting (only {with_weighting} do)"
            )
        spec["weighting_options"] = dict(options.weighting_options)
    return spec


def _resolve(key: str, config: Any) -> tuple[bool, VerlOptions]:
    """verl's std flag and ebpo's options for ``key``; the options apply to the run's own estimator only (a
    config naming another ``adv_estimator``, e.g. when a checkpoint holds several names, gives the defaults)."""
    named = _config_value(config, "adv_estimator", None)
    named = getattr(named, "value", named)  # a str or verl's AdvantageEstimator enum
    return _norm_adv_by_std(config), verl_options(config) if named in (None, key) else VerlOptions()


def _estimator(key: str, norm_adv_by_std_in_grpo: bool = True, options: VerlOptions | None = None) -> AdvantagePipeline:
    """The estimator of ``key``, built once; a different flag or option rebuilds it with the same state.

    The state (prior, HA-DW anchor and history) does not depend on the std division, so it is carried
    over: verl passes one config for a whole run, but a resume may restore the state before the first
    call has told us the flag. An option the state records (EBPO's ``decay``) cannot change under a state:
    the rebuilt estimator refuses it.
    """
    spec = estimator_spec(key, norm_adv_by_std_in_grpo, options)
    signature = json.dumps(spec, sort_keys=True, default=repr)
    current = ESTIMATORS.get(key)
    if current is None or _BUILT_WITH[key] != signature:
        name = spec.pop("name")
        try:
            rebuilt = build_estimator(name, **spec)
        except ValueError as exc:
            raise ValueError(f"algorithm.adv_estimator={key} with algorithm.{OPTIONS_KEY}: {exc}") from exc
        if current is not None:
            rebuilt.load_state_dict(current.state_dict())
        ESTIMATORS[key], _BUILT_WITH[key] = rebuilt, signature
    return ESTIMATORS[key]


def _config_value(config: Any, key: str, default: Any) -> Any:
    """``config[key]`` for verl's config objects (AlgoConfig, DictConfig, a dict: ``.get``) or attributes; None: default."""
    if config is None:
        return default
    getter = getattr(config, "get", None)
    return getter(key, default) if callable(getter) else getattr(config, key, default)


def _norm_adv_by_std(config: Any) -> bool:
    value = _config_value(config, "norm_adv_by_std_in_grpo", True)
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"algorithm.norm_adv_by_std_in_grpo must be true or false, got {value!r}")
    return bool(value)


def _group_ids(index: Any) -> Tensor:
    """verl's uid array (strings or ints) -> integer group ids (N,)."""
    _, inverse = np.unique(np.asarray(index, dtype=object).astype(str), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.long)


def _is_hierarchical(pipeline: AdvantagePipeline) -> bool:
    return bool(getattr(pipeline.estimator, "hierarchical", False))


def _reads_correctness(pipeline: AdvantagePipeline) -> bool:
    """Whether the weighting reads each response's correctness (HA-DW): see ebpo.weighting.Weighting."""
    return bool(getattr(pipeline.weighting, "reads_correctness", False))


def _reads_prompts(key: str) -> bool:
    """Whether the estimator of ``key`` keeps state per prompt across steps and so needs each sample's prompt key."""
    spec = SPECS[key]
    return spec["name"] == "spo" or bool(spec.get("carry", False))


def _prompt_labels(values: Mapping[str, Any], prompt_key: str) -> np.ndarray | None:
    """(bs,) each sample's prompt key: the field ``prompt_key``, or else ``extra_info[prompt_key]``; None if neither.

    Tensor and numpy scalars become Python values, so a key's text (what is hashed) is the same whatever container
    verl's batch or TransferQueue hands over."""
    if prompt_key in values:
        items = list(np.asarray(_column(values[prompt_key]), dtype=object).reshape(-1))
    elif "extra_info" in values:
        items = [
            info.get(prompt_key) if isinstance(info, Mapping) else None
            for info in np.asarray(_column(values["extra_info"]), dtype=object).reshape(-1)
        ]
        if all(v is None for v in items):
            return None
    else:
        return None
    out = np.empty(len(items), dtype=object)
    out[:] = [v.item() if getattr(v, "ndim", None) == 0 and hasattr(v, "item") else v for v in items]
    return out


def _prompt_ids(key: str, options: VerlOptions, labels: Any, index: Any) -> Tensor:
    """Stable prompt ids (bs,) from each sample's prompt key, refusing keys that cannot name prompts across steps."""
    where = f"+algorithm.{OPTIONS_KEY}.prompt_key"
    field = options.prompt_key
    how = (
        f"verl's dataset copies each row's extra_info['{PROMPT_KEY}'] into '{PROMPT_KEY}' (0 when a row has none): "
        f"give every row a distinct extra_info['{PROMPT_KEY}'] (verl's data preprocessing scripts do), or name "
        f"another non-tensor field that identifies the prompt with {where}=FIELD. verl's uid is drawn afresh at "
        "every step and cannot stand in"
    )
    needs = f"algorithm.adv_estimator={key} keeps state per prompt across steps and needs each sample's prompt key"
    if labels is None:
        raise ValueError(
            f"{needs}, but verl's batch has no '{field}' field (nor extra_info['{field}']); {how}. Load ebpo's plugin "
            "(VERL_USE_EXTERNAL_MODULES=ebpo.integrations.verl_plugin), which hands the batch's fields to the estimator"
        )
    items = list(np.asarray(labels, dtype=object).reshape(-1))
    missing = sum(v is None for v in items)
    if missing:
        raise ValueError(f"{needs}, but {missing} of {len(items)} samples have no '{field}'; {how}")
    uids = np.unique(np.asarray(index, dtype=object).astype(str))
    keys = np.unique(np.asarray(items, dtype=object).astype(str))
    if uids.size > 1 and keys.size == 1:
        raise ValueError(
            f"{needs}, but all {uids.size} prompts (distinct uids) of this batch have the same '{field}', "
            f"{items[0]!r}: they would share one prompt's state; {how}"
        )
    return stable_prompt_ids(items)


def _needs_fields(key: str, norm_adv_by_std_in_grpo: bool, options: VerlOptions) -> tuple[bool, bool]:
    """(needs topics, needs correctness) of the estimator ``key`` built with these settings."""
    pipeline = _estimator(key, norm_adv_by_std_in_grpo, options)
    return _is_hierarchical(pipeline), _reads_correctness(pipeline)


def _as_float64(values: Any, what: str, fix: str) -> Tensor:
    """Per-response values (bs,) of a non-tensor field (bools, numbers, None where a response lacks it) -> float64."""
    items = list(np.asarray(values, dtype=object).reshape(-1))
    missing = sum(v is None for v in items)
    if missing:
        raise ValueError(f"{missing} of {len(items)} responses have no {what}; {fix}")
    try:
        out = torch.tensor([float(v) for v in items], dtype=torch.float64)  # (bs,)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be numbers or booleans, got {items[:3]}...; {fix}") from exc
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{what} holds NaN or infinite values; {fix}")
    return out


def _correctness(key: str, options: VerlOptions, values: Any, scores: Tensor) -> Tensor:
    """Each response's correctness (bs,) float64 in [0, 1] for a weighting that reads it; see the module docstring.

    ``values``: the ``correctness_key`` field of the batch (None when absent); ``scores``: (bs,) the sequence
    scores the threshold applies to.
    """
    field = options.correctness_key or CORRECTNESS_KEY
    where = f"algorithm.{OPTIONS_KEY}"
    threshold = options.correctness_threshold
    how = (
        f"return it from your reward function (a dict {{'score': s, '{field}': 0 or 1}}; verl puts the extra "
        f"keys in its reward extra info), or set +{where}.correctness_threshold=T to count a response as correct "
        "when its score is >= T (e.g. 0.5 for 0/1 scores, 0 for -1/1 scores)"
    )
    if threshold is not None and options.correctness_key is None:
        return (scores.detach().to(torch.float64).cpu() >= threshold).to(torch.float64)
    if values is None:
        raise ValueError(
            f"algorithm.adv_estimator={key} weights each response by its correctness (HA-DW: the batch accuracy, "
            f"each group's accuracy and the anchor are success rates, which a reward of another scale is not), "
            f"but verl's batch has no '{field}' in its reward extra info. Either {how}"
        )
    correct = _as_float64(values, f"'{field}' in verl's reward extra info", how)
    if threshold is not None:
        return (correct >= threshold).to(torch.float64)
    low, high = correct.min().item(), correct.max().item()
    if low < 0 or high > 1:
        raise ValueError(
            f"'{field}' in verl's reward extra info is the correctness HA-DW weights by, a success in [0, 1], but it "
            f"holds values in [{low}, {high}]; return a 0/1 (or boolean) '{field}', or set "
            f"+{where}.correctness_threshold=T to count a response as correct when its '{field}' is >= T"
        )
    return correct


def compute_advantage(
    key: str,
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: Any,
    training: bool = True,
    topic_labels: Any = None,
    norm_adv_by_std_in_grpo: bool = True,
    correctness: Tensor | None = None,
    options: VerlOptions | None = None,
    prompt_labels: Any = None,
) -> tuple[Tensor, Tensor]:
    """Advantages (bs, T) and returns (bs, T) with verl's conventions; ``topic_labels`` (bs,) any labels.

    ``norm_adv_by_std_in_grpo``: verl's flag; False removes the estimator's std division (:func:`estimator_spec`).
    ``correctness``: (bs,) each response's success in [0, 1], required by the HA-DW names; ``topic_labels``:
    required by the hierarchical names. ``options``: ``algorithm.ebpo`` (:class:`VerlOptions`).
    ``prompt_labels``: (bs,) each sample's prompt key (any labels naming a prompt across steps), required by
    ``spo`` and ``krpo_carry`` and ignored by the others.
    """
    if token_level_rewards.shape != response_mask.shape:
        raise ValueError(
            f"token_level_rewards {tuple(token_level_rewards.shape)} and response_mask {tuple(response_mask.shape)} differ"
        )
    options = VerlOptions() if options is None else options
    pipeline = _estimator(key, norm_adv_by_std_in_grpo, options)
    if topic_labels is None and _is_hierarchical(pipeline):
        # Never a flat prior in its place: that is ebpo / ebpo_running, which the user did not ask for.
        raise ValueError(
            f"algorithm.adv_estimator={key} keeps a prior per topic and needs each sample's topic, but verl's batch "
            f"has no '{options.topic_key}' field. Put each prompt's topic in your dataset's '{options.topic_key}' "
            f"column or name another column with "
            f"+algorithm.{OPTIONS_KEY}.topic_key=COLUMN, and load ebpo's plugin "
            "(VERL_USE_EXTERNAL_MODULES=ebpo.integrations.verl_plugin), which hands the batch's fields to the "
            "estimator. For one prior over all prompts use ebpo or ebpo_running"
        )
    if not _reads_correctness(pipeline) and (
        options.correctness_threshold is not None or options.correctness_key is not None
    ):
        raise ValueError(
            f"algorithm.{OPTIONS_KEY}.correctness_threshold / correctness_key say where HA-DW's correctness comes "
            f"from, but algorithm.adv_estimator={key} has no weighting that reads it (ha_dw and ebpo_ha_dw do): "
            "it would be ignored; drop it"
        )
    if correctness is None and _reads_correctness(pipeline):
        raise ValueError(
            f"algorithm.adv_estimator={key} weights each response by its correctness (a success in [0, 1]); pass "
            "correctness= (verl's estimator functions derive it: see ebpo.integrations.verl)"
        )
    scores = token_level_rewards.sum(dim=-1)  # (bs,)
    topic_ids = (
        None if topic_labels is None else stable_topic_ids(list(np.asarray(topic_labels, dtype=object).reshape(-1)))
    )
    prompt_ids = _prompt_ids(key, options, prompt_labels, index) if _reads_prompts(key) else None
    advantages, _ = pipeline(
        scores.detach().float().cpu(),
        _group_ids(index),
        topic_ids=topic_ids,
        correctness=correctness,
        prompt_ids=prompt_ids,
        training=training,
    )
    advantages = advantages.to(token_level_rewards.device, token_level_rewards.dtype).unsqueeze(-1) * response_mask
    return advantages, advantages


# ------------------------------------------------------------------ the batch's other fields
@dataclasses.dataclass(frozen=True)
class _BatchFields:
    """The fields of the batch whose advantages verl is computing, beyond what it passes the estimator."""

    uids: Any  # (bs,) verl's uid of each row these fields describe (the estimator checks its index against it)
    values: Mapping[str, Any]  # non-tensor fields by name, (bs,) each: the topic, the reward extra info
    scores: Tensor | None  # (bs,) verl's sequence score (token_level_scores summed), before KL-in-reward


# Set by install_batch_forwarding's wrappers for the duration of one advantage computation (a context
# variable: nothing outlives the call).
_BATCH_FIELDS: contextvars.ContextVar[_BatchFields | None] = contextvars.ContextVar("ebpo_verl_batch", default=None)


def _same_rows(uids: Any, index: Any, where: str) -> None:
    ours = np.asarray(uids, dtype=object).astype(str).reshape(-1)
    theirs = np.asarray(index, dtype=object).astype(str).reshape(-1)
    if ours.shape != theirs.shape or not bool((ours == theirs).all()):
        raise RuntimeError(
            f"ebpo read the batch's fields ({where}) for uids that do not match, row for row, the uids verl passed "
            "the estimator: this verl orders its advantage batch differently from verl 0.9.1, which ebpo's hooks follow"
        )


def _make(key: str):
    def fn(
        token_level_rewards: Tensor, response_mask: Tensor, index: Any = None, config: Any = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if index is None:
            raise ValueError(f"{key} is group-relative: verl must pass the uid index")
        norm, options = _resolve(key, config)
        fields = _BATCH_FIELDS.get()
        if fields is not None and fields.uids is not None:
            _same_rows(fields.uids, index, "install_batch_forwarding")
        values = ChainMap(kwargs, fields.values if fields is not None else {})
        labels = kwargs.get("topic_labels", values.get(options.topic_key))
        prompts = kwargs.get("prompt_labels")
        if prompts is None and _reads_prompts(key):
            prompts = _prompt_labels(values, options.prompt_key)
        correctness = None
        if _needs_fields(key, norm, options)[1]:
            scores = fields.scores if fields is not None and fields.scores is not None else None
            correctness = _correctness(
                key,
                options,
                values.get(options.correctness_key or CORRECTNESS_KEY),
                token_level_rewards.sum(dim=-1) if scores is None else scores,
            )
        return compute_advantage(
            key,
            token_level_rewards,
            response_mask,
            index,
            topic_labels=labels,
            norm_adv_by_std_in_grpo=norm,
            correctness=correctness,
            options=options,
            prompt_labels=prompts,
        )

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
    """Write every estimator's state to ``directory/STATE_FILE`` (plain tensors and values); returns the path.

    Written to a temporary name and renamed, so the file is either whole or absent.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, STATE_FILE)
    partial = path + ".partial"
    torch.save({key: est.state_dict() for key, est in ESTIMATORS.items()}, partial)
    os.replace(partial, path)
    return path


def load_estimator_states(directory: str, config: Any = None) -> list[str]:
    """Restore the estimators saved in ``directory/STATE_FILE``; returns their names.

    ``config``: verl's algorithm config of the resumed run (its ``norm_adv_by_std_in_grpo`` and
    ``algorithm.ebpo`` options build the estimators); None: the defaults.
    Loaded with ``weights_only=True``: a file holding pickled objects is refused, never unpickled.
    """
    path = os.path.join(directory, STATE_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{directory} has no {STATE_FILE}")
    from ebpo.fileio import load_tensors  # weights_only: a checkpoint folder is never unpickled

    states = load_tensors(path, what="ebpo estimator states")
    if not isinstance(states, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in states.items()):
        raise ValueError(f"{path} does not hold ebpo estimator states (a mapping of estimator name to state)")
    for key, state in states.items():
        if key not in SPECS:
            raise ValueError(f"{path} holds a state for {key!r}, which is not one of ebpo's verl names {sorted(SPECS)}")
        _estimator(key, *_resolve(key, config)).load_state_dict(state)
    return sorted(states)


# ------------------------------------------------------------------ checkpoints
# verl 0.9.1's two trainers, each with _save_checkpoint / _load_checkpoint on the driver: the v1 trainer
# (trainer.use_v1=true, the default; PPOTrainerSync and the async trainers inherit both methods) and the
# legacy RayPPOTrainer (use_v1=false; also the base of the experimental separation and one-step-off trainers).
_TRAINERS = (
    ("verl.trainer.ppo.v1.trainer_base", "PPOTrainer"),
    ("verl.trainer.ppo.ray_trainer", "RayPPOTrainer"),
)
FRESH_STATE_ENV = "EBPO_VERL_FRESH_ESTIMATOR_STATE"


def _latest_checkpoint(directory: str) -> str | None:
    """verl's own answer to "which global_step_N folder does resume_mode=auto resume": its tracker file."""
    from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

    return find_latest_ckpt_path(directory)


def _resume_folder(trainer_config: Any) -> str | None:
    """The ``global_step_N`` folder verl 0.9.1's ``_load_checkpoint`` resumes from, or None when it starts afresh.

    Read from both trainers' ``_load_checkpoint``: ``resume_mode="disable"`` never resumes; ``"resume_path"``
    resumes ``resume_from_path``; otherwise (``"auto"``) the folder named by the tracker in
    ``default_local_dir``, if any. Relative paths are relative to the working directory.
    """
    mode = trainer_config.resume_mode
    if mode == "disable":
        return None
    if mode == "resume_path":
        folder = trainer_config.resume_from_path
    else:
        folder = _latest_checkpoint(os.path.abspath(trainer_config.default_local_dir))
    return None if folder is None else os.path.abspath(folder)


def _is_stateful(key: str) -> bool:
    """Whether anything of the estimator outlives a step (a running/EMA prior, HA-DW's anchor and history, SPO's
    tracker, KRPO's carried filters)."""
    spec = SPECS[key]
    return spec.get("prior", "batch") != "batch" or "weighting" in spec or _reads_prompts(key)


def _adv_estimator(trainer: Any) -> str:
    name = _config_value(trainer.config.algorithm, "adv_estimator", None)
    return str(getattr(name, "value", name))  # a str or verl's AdvantageEstimator enum


def _save_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _save_checkpoint(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _adv_estimator(self) in SPECS:
            # Before verl's own save, whose last act is the tracker file that resume_mode=auto reads: a tracker
            # never names a folder without the estimator state. The folder is the one verl writes.
            folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
            save_estimator_states(folder)
        return original(self, *args, **kwargs)

    return _save_checkpoint


def _load_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _load_checkpoint(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        key = _adv_estimator(self)
        folder = _resume_folder(self.config.trainer)
        if folder is None or key not in SPECS:
            return result
        # verl has just set global_steps from the folder it resumed; if ours names another step, verl's
        # resume logic is not the one read above and the state would come from the wrong checkpoint.
        if os.path.basename(folder) != f"global_step_{self.global_steps}":
            raise RuntimeError(
                f"verl resumed at step {self.global_steps} but ebpo found {folder}: this verl chooses its resume "
                "folder differently from verl 0.9.1, which ebpo's checkpoint hook follows"
            )
        saved = os.path.exists(os.path.join(folder, STATE_FILE))
        restored = load_estimator_states(folder, self.config.algorithm) if saved else []
        if key not in restored and _is_stateful(key) and os.environ.get(FRESH_STATE_ENV) != "1":
            why = (
                f"its {STATE_FILE} holds only {restored}: it was saved by a run of another estimator"
                if saved
                else f"it has no {STATE_FILE}: it was saved without ebpo's verl plugin"
            )
            raise ValueError(
                f"verl is resuming {folder}, but {why}, so the {key} estimator's state (its running prior, "
                f"HA-DW anchor or per-prompt tracker) would restart from nothing. Resume a checkpoint saved by this estimator with the "
                f"plugin loaded, or set {FRESH_STATE_ENV}=1 to start that state afresh on purpose"
            )
        return result

    return _load_checkpoint


def install_checkpointing(*trainer_classes: type) -> list[str]:
    """Save and restore the estimator state with verl's checkpoints (idempotent); returns the classes hooked.

    Wraps each class's ``_save_checkpoint`` (the state is written to ``global_step_N/STATE_FILE`` first, then
    verl saves) and ``_load_checkpoint`` (after verl has resumed, the state is read back from the same
    folder). Only runs whose ``algorithm.adv_estimator`` is one of ebpo's names write or read the file;
    resuming such a run from a checkpoint without it raises, unless the estimator keeps no state across
    steps (``ebpo``, ``ebpo_hier``) or ``EBPO_VERL_FRESH_ESTIMATOR_STATE=1``.

    These are private methods: verl 0.9.1 offers no public hook on the load side, and its public save hook
    (``trainer.checkpoint_callback_class``) is the v1 trainer's only, a single slot of the user's config,
    and runs after the tracker is written. Both trainers' methods were read in 0.9.1, and their presence
    is checked here. Their subclasses in 0.9.1 inherit both methods, except the experimental fully-async
    trainer (``verl/experimental/fully_async_policy``), which has its own ``_save_checkpoint`` and
    ``load_checkpoint`` and is not hooked: save and load the state by hand there. ``trainer_classes``: the classes to hook (default: verl's trainers that
    this process can import; a stand-in in tests).
    """
    if not trainer_classes:
        classes = []
        for module_name, class_name in _TRAINERS:
            try:
                module = __import__(module_name, fromlist=[class_name])
            except ImportError:  # this process cannot run that trainer either (e.g. v1 without transfer_queue)
                continue
            classes.append(getattr(module, class_name))
        trainer_classes = tuple(classes)
    hooked = []
    for cls in trainer_classes:
        for name, hook in (("_save_checkpoint", _save_hook), ("_load_checkpoint", _load_hook)):
            method = getattr(cls, name, None)
            if not callable(method):
                raise RuntimeError(
                    f"ebpo's verl plugin saves the estimator state with verl's checkpoints by wrapping "
                    f"{cls.__qualname__}.{name}, which this verl does not have; ebpo supports verl 0.9 "
                    "(tested with 0.9.1): install verl 0.9.x, or leave ebpo.integrations.verl_plugin out of "
                    "VERL_USE_EXTERNAL_MODULES and save and load the state by hand (save_estimator_states)"
                )
            if getattr(method, "_ebpo_wrapped", None) is None:
                wrapped = hook(method)
                wrapped._ebpo_wrapped = method  # type: ignore[attr-defined]
                setattr(cls, name, wrapped)
        hooked.append(cls.__qualname__)
    return hooked


# verl 0.9.1 modules that bind ray_trainer.compute_advantage by name when imported (read in 0.9.1): v1's utils
# (compute_advantage_for_multi_trajectories, the v1 trainer's advantage step) and the experimental separation
# trainer. Those imported before install_batch_forwarding are patched; those imported after bind the wrapper.
_COMPUTE_ADVANTAGE_USERS = ("verl.trainer.ppo.v1.utils", "verl.experimental.separation.ray_trainer")
# verl 0.9.1's v1 trainer (trainer.use_v1=true, the default): its _compute_advantage (inherited by the sync and
# async trainers) reads only uid, response_mask, rm_scores, log-probs and values from its TransferQueue.
_V1_TRAINER = ("verl.trainer.ppo.v1.trainer_base", "PPOTrainer")


def _tq_get(keys: list[str], partition_id: str, fields: list[str]) -> Any:
    """verl's TransferQueue read of ``fields`` for ``keys``: a TensorDict, rows in the order of ``keys``."""
    import transfer_queue as tq

    return tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=fields)


def _unwrap(value: Any) -> Any:
    """A value TransferQueue or verl's batch hands over, out of tensordict's NonTensorData (``.data``), as verl
    unwraps it; a numpy scalar's ``.data`` is its buffer (a memoryview), so numpy scalars stay as they are."""
    inner = getattr(value, "data", value)
    return value if isinstance(inner, memoryview) else inner


def _column(values: Any) -> np.ndarray:
    """A non-tensor field as TransferQueue returns it (a list, NonTensorStack, numpy array) -> (bs,) object array."""
    items = [_unwrap(v) for v in list(values)]
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _reward_extra_info(extra_fields: Any, field: str) -> np.ndarray | None:
    """(bs,) ``extra_fields[i]["reward_extra_info"][field]`` (None where a sample lacks it); None if none has it.

    Where verl's agent loop keeps what a reward function returns beside the score (read as verl 0.9.1's replay
    buffer reads it for DAPO's group filter)."""
    values = []
    for item in _column(extra_fields):
        info = item.get("reward_extra_info", {}) if isinstance(item, Mapping) else {}
        values.append(info.get(field) if isinstance(info, Mapping) else None)
    if all(v is None for v in values):
        return None
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _forward_compute_advantage(original: Callable[..., Any]) -> Callable[..., Any]:
    """verl's ``compute_advantage(data, adv_estimator, ...)``, with ``data``'s fields visible to ebpo's functions."""

    @functools.wraps(original)
    def compute_advantage(data: Any, adv_estimator: Any, *args: Any, **kwargs: Any) -> Any:
        name = getattr(adv_estimator, "value", adv_estimator)  # verl passes a str or its AdvantageEstimator enum
        if name not in FUNCTIONS:
            return original(data, adv_estimator, *args, **kwargs)
        non_tensor = getattr(data, "non_tensor_batch", None) or {}
        tensors = getattr(data, "batch", None)
        outer = _BATCH_FIELDS.get()  # v1: what the trainer's advantage step read from TransferQueue
        uids = non_tensor.get("uid")
        if outer is not None and outer.uids is not None and uids is not None:
            _same_rows(outer.uids, uids, "verl's TransferQueue")
        scores = None
        if tensors is not None and "token_level_scores" in tensors.keys():
            scores = tensors["token_level_scores"].sum(dim=-1)  # (bs,) the reward step's score, before KL-in-reward
        fields = _BatchFields(
            uids=uids if uids is not None or outer is None else outer.uids,
            values=ChainMap(non_tensor, outer.values if outer is not None else {}),
            scores=scores if scores is not None or outer is None else outer.scores,
        )
        token = _BATCH_FIELDS.set(fields)
        try:
            return original(data, adv_estimator, *args, **kwargs)
        finally:
            _BATCH_FIELDS.reset(token)

    compute_advantage._ebpo_wrapped = original  # type: ignore[attr-defined]
    return compute_advantage


def _v1_advantage_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The v1 trainer's ``_compute_advantage(batch, metrics)``, with the topic and reward extra info of the batch's
    samples (read from verl's TransferQueue, which the step itself does not read) visible to ebpo's functions."""

    @functools.wraps(original)
    def _compute_advantage(self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        key = _adv_estimator(self)
        if key not in SPECS:
            return original(self, batch, *args, **kwargs)
        norm, options = _resolve(key, self.config.algorithm)
        needs_topics, needs_correctness = _needs_fields(key, norm, options)
        # Correctness from the score (a threshold alone) comes with the data verl's step builds: nothing to read.
        needs_info = needs_correctness and (
            options.correctness_threshold is None or options.correctness_key is not None
        )
        needs_prompts = _reads_prompts(key)
        wanted = [options.topic_key] * needs_topics + ["extra_fields"] * needs_info
        wanted += [options.prompt_key, "extra_info"] * needs_prompts
        if not wanted:
            return original(self, batch, *args, **kwargs)
        data = _tq_get(list(batch.keys), batch.partition_id, ["uid", *wanted])
        present = set(data.keys())  # TransferQueue leaves out a field its samples do not have, silently
        if needs_topics and options.topic_key not in present:
            raise ValueError(
                f"algorithm.adv_estimator={key} keeps a prior per topic, but the samples in verl's TransferQueue have "
                f"no '{options.topic_key}' field. Put each prompt's topic in your dataset's '{options.topic_key}' "
                f"column or name another column with "
                f"+algorithm.{OPTIONS_KEY}.topic_key=COLUMN"
            )
        values: dict[str, Any] = {}
        if needs_topics:
            values[options.topic_key] = _column(data[options.topic_key])
        if needs_info:
            field = options.correctness_key or CORRECTNESS_KEY
            info = _reward_extra_info(data["extra_fields"], field) if "extra_fields" in present else None
            if info is not None:
                values[field] = info
        if needs_prompts:  # what is absent is refused, naming the key, by the estimator function
            for field in (options.prompt_key, "extra_info"):
                if field in present:
                    values[field] = _column(data[field])
        token = _BATCH_FIELDS.set(_BatchFields(uids=_column(data["uid"]), values=values, scores=None))
        try:
            return original(self, batch, *args, **kwargs)
        finally:
            _BATCH_FIELDS.reset(token)

    return _compute_advantage


def install_batch_forwarding(ray_trainer: Any = None, v1_trainers: tuple[type, ...] | None = None) -> list[str]:
    """Make the batch's topic, reward extra info and scores visible to ebpo's functions (idempotent).

    verl passes a registered estimator only the uids and ``config.algorithm``. Wraps verl's
    ``ray_trainer.compute_advantage(data, adv_estimator, ...)`` (the legacy trainer's call, and the v1
    trainer's through ``compute_advantage_for_multi_trajectories``), which hands ebpo's functions
    ``data.non_tensor_batch`` and ``data.batch["token_level_scores"]`` for that one call, and the v1 trainer's
    ``PPOTrainer._compute_advantage(batch, metrics)``, whose batch holds only TransferQueue keys: for a
    hierarchical name it reads each sample's topic, for an HA-DW name ``extra_fields`` (the reward extra
    info), for ``spo`` / ``krpo_carry`` the prompt key (``prompt_key`` and ``extra_info``), of the same keys. Other estimators go to verl's code unchanged; ebpo's names read nothing they
    do not use. Returns what was hooked.

    ``ray_trainer``: the module to patch (default: verl's); ``v1_trainers``: the v1 trainer classes (default:
    verl's ``PPOTrainer`` when this process can import it); stand-ins in tests.
    """
    if ray_trainer is None:
        try:
            from verl.trainer.ppo import ray_trainer
        except ImportError as exc:
            raise ImportError(
                "ebpo.integrations.verl.install_batch_forwarding() needs verl installed (pip install verl)"
            ) from exc
    import sys

    hooked = []
    original = ray_trainer.compute_advantage
    if getattr(original, "_ebpo_wrapped", None) is None:
        ray_trainer.compute_advantage = _forward_compute_advantage(original)
    hooked.append(f"{ray_trainer.__name__}.compute_advantage")
    for module_name in _COMPUTE_ADVANTAGE_USERS:  # imported earlier: they bound verl's own function
        module = sys.modules.get(module_name)
        if module is not None and getattr(module, "compute_advantage", None) is original:
            module.compute_advantage = ray_trainer.compute_advantage
            hooked.append(f"{module_name}.compute_advantage")
    if v1_trainers is None:
        module_name, class_name = _V1_TRAINER
        try:  # after ray_trainer is patched: importing it imports v1's utils, which binds compute_advantage
            v1_trainers = (getattr(__import__(module_name, fromlist=[class_name]), class_name),)
        except ImportError:  # this process cannot run the v1 trainer either (e.g. without transfer_queue)
            v1_trainers = ()
    for cls in v1_trainers:
        method = getattr(cls, "_compute_advantage", None)
        if not callable(method):
            raise RuntimeError(
                f"ebpo's verl plugin hands the batch's topics and reward extra info to its estimators by wrapping "
                f"{cls.__qualname__}._compute_advantage, which this verl does not have; ebpo supports verl 0.9 "
                "(tested with 0.9.1): install verl 0.9.x"
            )
        if getattr(method, "_ebpo_wrapped", None) is None:
            wrapped = _v1_advantage_hook(method)
            wrapped._ebpo_wrapped = method  # type: ignore[attr-defined]
            cls._compute_advantage = wrapped
        hooked.append(f"{cls.__qualname__}._compute_advantage")
    return hooked


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
