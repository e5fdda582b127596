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
:func:`register`, :func:`install_divergences`, :func:`install_topic_forwarding`
and :func:`install_checkpointing`. The functions here need only torch and
numpy; the ``register`` and ``install_*`` functions import verl.
"""

from __future__ import annotations

import contextvars
import functools
import os
from collections.abc import Callable
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
    "STATE_FILE",
    "compute_advantage",
    "estimator_spec",
    "register",
    "save_estimator_states",
    "load_estimator_states",
    "install_checkpointing",
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
# The option that removes each base estimator's std division (verl's norm_adv_by_std_in_grpo=False).
_STD_OFF: dict[str, dict[str, Any]] = {"grpo": {"scale": "none"}, "ebpo": {"std_normalize": False}}
_BUILT_WITH_STD: dict[str, bool] = {}  # the norm_adv_by_std_in_grpo each of ESTIMATORS was built with


def estimator_spec(key: str, norm_adv_by_std_in_grpo: bool = True) -> dict[str, Any]:
    """The ``build_estimator`` spec of a verl name: ``SPECS[key]``, its std division removed when the flag is False.

    >>> estimator_spec("ha_dw", norm_adv_by_std_in_grpo=False)
    {'name': 'grpo', 'weighting': 'ha_dw', 'scale': 'none'}
    """
    if key not in SPECS:
        raise ValueError(f"unknown ebpo verl estimator {key!r}; choose one of {sorted(SPECS)}")
    spec = dict(SPECS[key])
    if not norm_adv_by_std_in_grpo:
        spec.update(_STD_OFF[spec["name"]])
    return spec


def _estimator(key: str, norm_adv_by_std_in_grpo: bool = True) -> AdvantagePipeline:
    """The estimator of ``key``, built once; a different flag rebuilds it with the same state.

    The state (prior, HA-DW anchor and history) does not depend on the std division, so it is carried
    over: verl passes one config for a whole run, but a resume may restore the state before the first
    call has told us the flag.
    """
    current = ESTIMATORS.get(key)
    if current is None or _BUILT_WITH_STD[key] != norm_adv_by_std_in_grpo:
        spec = estimator_spec(key, norm_adv_by_std_in_grpo)
        rebuilt = build_estimator(spec.pop("name"), **spec)
        if current is not None:
            rebuilt.load_state_dict(current.state_dict())
        ESTIMATORS[key], _BUILT_WITH_STD[key] = rebuilt, norm_adv_by_std_in_grpo
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


def compute_advantage(
    key: str,
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: Any,
    training: bool = True,
    topic_labels: Any = None,
    norm_adv_by_std_in_grpo: bool = True,
) -> tuple[Tensor, Tensor]:
    """Advantages (bs, T) and returns (bs, T) with verl's conventions; ``topic_labels`` (bs,) any labels, optional.

    ``norm_adv_by_std_in_grpo``: verl's flag; False removes the estimator's std division (:func:`estimator_spec`).
    """
    if token_level_rewards.shape != response_mask.shape:
        raise ValueError(
            f"token_level_rewards {tuple(token_level_rewards.shape)} and response_mask {tuple(response_mask.shape)} differ"
        )
    scores = token_level_rewards.sum(dim=-1)  # (bs,)
    topic_ids = (
        None if topic_labels is None else stable_topic_ids(list(np.asarray(topic_labels, dtype=object).reshape(-1)))
    )
    advantages, _ = _estimator(key, norm_adv_by_std_in_grpo)(
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
        return compute_advantage(
            key,
            token_level_rewards,
            response_mask,
            index,
            topic_labels=labels,
            norm_adv_by_std_in_grpo=_norm_adv_by_std(config),
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


def load_estimator_states(directory: str, norm_adv_by_std_in_grpo: bool = True) -> list[str]:
    """Restore the estimators saved in ``directory/STATE_FILE``; returns their names.

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
        _estimator(key, norm_adv_by_std_in_grpo).load_state_dict(state)
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
    """Whether anything of the estimator outlives a step (a running/EMA prior, HA-DW's anchor and history)."""
    spec = SPECS[key]
    return spec.get("prior", "batch") != "batch" or "weighting" in spec


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
        restored = load_estimator_states(folder, _norm_adv_by_std(self.config.algorithm)) if saved else []
        if key not in restored and _is_stateful(key) and os.environ.get(FRESH_STATE_ENV) != "1":
            why = (
                f"its {STATE_FILE} holds only {restored}: it was saved by a run of another estimator"
                if saved
                else f"it has no {STATE_FILE}: it was saved without ebpo's verl plugin"
            )
            raise ValueError(
                f"verl is resuming {folder}, but {why}, so the {key} estimator's state (its running prior or "
                f"HA-DW anchor) would restart from nothing. Resume a checkpoint saved by this estimator with the "
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
