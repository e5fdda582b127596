"""Typed configuration of ``ebpo train``: one dataclass, documented once.

Every field's docstring (the string literal under it) is its ``--help`` text
and its documentation; :func:`field_docs` reads them from the class source
with ``ast``, so help is never written twice. Values are resolved in this
order, later ones winning: dataclass defaults < the task's ``recommended``
settings (:class:`~ebpo.tasks.base.Task`) < the ``--method`` preset
(:mod:`ebpo.train.presets`) < the YAML file of ``--config`` < command-line
flags. :func:`validate` checks everything that can be checked without a
model, with errors that say what to change.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import json
import math
import os
import re
import textwrap
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ebpo.fileio import short
from ebpo.tasks.build import DEFAULT_TASK

__all__ = ["TrainConfig", "field_docs", "validate", "coerce_fields", "check_known_fields"]


@dataclass
class TrainConfig:
    """Configuration of one ``ebpo train`` run (RL with verifiable rewards)."""

    # --- run ---
    method: str = "ebpo"
    """Preset named after a paper (sets estimator, weighting, loss, divergence, ...); any field can still be overridden."""
    task: str = DEFAULT_TASK
    """Task: a registered name, 'name:arg' for a task factory that takes an argument (reasoning_gym:chain_sum), or 'module:attr'."""
    task_options: dict = field(default_factory=dict)
    """Options for the task factory, as YAML ('{num_train: 5000}')."""
    verifier: str | None = None
    """Verifier name or 'module:attr'; none = the task's own verifier."""
    model: str = "builtin:tiny"
    """Policy: 'builtin:tiny' (a tiny Llama with a character tokenizer, built in code), a Hugging Face id or a local directory."""
    ref_model: str = "init"
    """Reference policy for the divergence: 'init' (a frozen copy of the starting policy) or 'none'."""
    steps: int = 200
    """Number of RL steps (optimiser updates are steps * ppo_epochs * mini_batches)."""
    seed: int = 0
    """Seed of sampling, data order and initialisation."""
    out: str | None = None
    """Run directory; none = runs/<timestamp>-<method>."""
    device: str = "auto"
    """Device: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N."""
    dtype: str = "auto"
    """Compute precision of the forward passes: auto (bf16 on CUDA, else fp32), float32, bfloat16, float16. Trained weights stay fp32 (mixed precision through accelerate: autocast, fp32 master weights and optimiser; a GradScaler for float16); under LoRA the frozen base is stored in this dtype."""
    threads: int = 0
    """CPU threads for torch; 0 = all cores (at most 8)."""
    lora_rank: int = 0
    """LoRA rank through peft (0 = train all parameters)."""
    chat_template: str = "auto"
    """Wrap prompts in the tokenizer's chat template: auto (when it has one), always, never."""

    # --- warm start (built-in model only) ---
    warmstart_steps: int = 300
    """Supervised steps on the task's training answers before RL (built-in model only; 0 = none). Cached and reused."""
    warmstart_lr: float = 3e-3
    """Learning rate of the warm start."""
    warmstart_batch_size: int = 128
    """Problems per warm-start step."""
    warmstart_seed: int = 0
    """Seed of the warm start (fixed, so every RL seed starts from the same cached model)."""

    # --- rollout ---
    prompts_per_step: int = 32
    """Prompts per RL step (over all processes)."""
    group_size: int = 8
    """Responses sampled per prompt (G)."""
    max_new_tokens: int = 12
    """Longest completion, in tokens."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    top_p: float = 1.0
    """Nucleus sampling mass of the rollouts."""
    generation_batch_size: int = 0
    """Sequences per generate call, rounded down to whole groups (at least one); 0 = all at once."""
    share_prompt_cache: bool = True
    """Run each prompt through the model once for its G samples: in generation (prefill, KV cache repeated) and in the
    update's log-prob passes (prompt KV cache indexed out to the group's rows; not under FSDP); turn off for models
    whose cache cannot be repeated or indexed."""

    # --- rollout allocation ---
    allocation: str = "uniform"
    """Rollout allocation, how many completions each candidate prompt gets (ebpo.allocation): uniform (every prompt
    group_size), skip (GRESO-style), knapsack (Knapsack-RL-style), eb (Empirical-Bayes posterior), or 'module:attr'.
    The step's budget is prompts_per_step x group_size completions whatever the allocation."""
    allocation_options: dict = field(default_factory=dict)
    """Allocation options as YAML ('{min_group_size: 2, max_group_size: 16}', skip's '{explore_prob: 0.25}')."""
    candidates_per_step: int = 0
    """Candidate prompts drawn per step, among which the allocation spreads the budget (0 = prompts_per_step)."""
    allocation_first_round: int = 0
    """Completions every candidate gets first (0 = none): their outcomes update the allocator, which then tops up the
    same groups with the rest of the budget where one more completion most raises the chance of a mixed group
    (knapsack, eb). At least the allocation's min_group_size."""
    max_samples: int = 0
    """Stop after the first step at which the run's sampled completions reach this many (0 = no cap; --steps still
    bounds the run): runs that sample differently per step (DAPO's resampling) compared at equal samples."""

    # --- advantages ---
    estimator: str = "ebpo"
    """Advantage estimator: grpo, dr_grpo, rloo, ebpo, jspo, spo, krpo, or 'module:attr'."""
    estimator_options: dict = field(default_factory=dict)
    """Estimator options as YAML ('{prior: running}' for ebpo, '{scale: batch}' for grpo)."""
    weighting: str | None = None
    """Advantage weighting: ha_dw, or none."""
    weighting_options: dict = field(default_factory=dict)
    """Weighting options as YAML ('{anchor: hard, lam: 1.5}')."""
    curriculum: str = "shuffle"
    """Order of the training prompts: shuffle, topic, difficulty."""
    difficulty_samples: int = 16
    """Samples per training prompt with which the difficulty curriculum estimates the starting model pass rate (cached)."""
    difficulty_temperature: float = 1.0
    """Sampling temperature of that pass rate estimate (the EBPO paper: 16 samples at 1.0)."""

    # --- loss ---
    loss: str = "clip"
    """Policy loss: clip, clip_cov, kl_cov. kl_cov has no effect with one PPO epoch and one mini-batch (its |logp - old_logp| penalty is 0 before the policy moves): raise --ppo-epochs or --mini-batches with it."""
    loss_agg: str = "token-mean"
    """Loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm."""
    loss_options: dict = field(default_factory=dict)
    """Extra options of the policy loss as YAML (e.g. clip_cov's ratio)."""
    eps_low: float = 0.2
    """Lower clip range of the ratio (1 - eps_low)."""
    eps_high: float = 0.2
    """Upper clip range of the ratio (1 + eps_high); DAPO's clip-higher uses 0.28."""
    divergence: str | None = None
    """Divergence to the reference policy: kl, prob_l2, log_l2, neural_mirror, or none."""
    divergence_options: dict = field(default_factory=dict)
    """Divergence options as YAML ('{estimator: k3}', '{seed: 0}')."""
    div_coef: float = 0.0
    """Coefficient of the divergence in the loss."""
    mirror_params: str | None = None
    """Neural mirror parameters file (written by ebpo meta); with --divergence neural_mirror, same as divergence option params_path."""

    # --- DAPO options ---
    dynamic_sampling: bool = False
    """Keep only groups whose rewards differ, sampling more prompts until the step is full (DAPO)."""
    max_resample_rounds: int = 3
    """Most extra sampling rounds of dynamic sampling per step; then the step trains on what it has."""
    overlong_buffer: int = 0
    """DAPO overlong shaping: length of the soft-penalty buffer before max_new_tokens (0 = off)."""
    overlong_penalty: float = 1.0
    """Reward penalty of a completion that reaches max_new_tokens (DAPO overlong shaping)."""

    # --- optimisation ---
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = off)."""
    lr_schedule: str = "constant"
    """Learning-rate schedule after warm-up: constant, linear, cosine."""
    lr_warmup_steps: int = 5
    """Optimiser steps of linear warm-up."""
    ppo_epochs: int = 1
    """Passes over each step's rollouts."""
    mini_batches: int = 1
    """Optimiser steps per pass (each on 1/mini_batches of the rollouts)."""
    micro_batch_size: int = 0
    """Sequences per forward/backward (gradient accumulation); 0 = split each mini-batch into length_buckets."""
    length_buckets: int = 4
    """With micro_batch_size 0: micro-batches per mini-batch, of rows sorted by length, each cut to its own padding."""

    # --- evaluation, logging, checkpoints ---
    eval_every: int = 0
    """Evaluate the held-out set every this many steps (0 = only before and after RL)."""
    eval_samples: int = 4
    """Held-out samples per problem: 0 = greedy, k > 0 = avg@k at the rollout temperature."""
    max_eval_problems: int = 0
    """Evaluate at most this many held-out problems (0 = all)."""
    log_every: int = 20
    """Print one console line every this many steps (every step goes to metrics.jsonl and TensorBoard)."""
    save_every: int = 50
    """Write a checkpoint every this many steps (and always at the end; 0 = only at the end)."""
    keep_checkpoints: int = 1
    """Checkpoints kept on disk (older ones are deleted)."""
    report_to: str = "tensorboard"
    """Where metrics go besides metrics.jsonl: tensorboard, wandb, mlflow, several joined by commas (wandb,tensorboard), or none. wandb and mlflow need pip install "ebpo[track]"; their environment variables are in docs/trainer.md."""
    tensorboard: bool = True
    """False leaves tensorboard out of report_to (the older way to turn it off, kept for existing commands and saved configs)."""
    progress: bool = True
    """Show a progress bar."""


@functools.cache
def field_docs() -> dict[str, str]:
    """Map each :class:`TrainConfig` field to the docstring written under it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(TrainConfig)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    missing = {f.name for f in dataclasses.fields(TrainConfig)} - set(docs)
    if missing:  # a field without documentation is a bug in this file
        raise RuntimeError(f"TrainConfig fields without a docstring: {sorted(missing)}")
    return docs


# ------------------------------------------------------------------ types
# Checked from the dataclass annotations, one rule per type (no per-field ladder). YAML 1.1, which PyYAML
# follows, reads '1e-4' (no dot) as a string, so a float field accepts a string that parses as a finite
# number; an int field accepts only integral values (2.0 or '1e3', never 1.5); booleans are never numbers.
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _as_float(value: Any) -> float:
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("a number")
    if not math.isfinite(value):
        raise TypeError("a finite number")
    return float(value)


def _as_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        number = _as_float(value)
    except TypeError:
        raise TypeError("an integer") from None
    if number != int(number):
        raise TypeError("an integer (a whole number)")
    return int(number)


def _as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("true or false")
    return value


def _as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("a string")
    return value


def _as_dict(value: Any) -> dict:
    if not isinstance(value, dict):
        raise TypeError("a mapping ({key: value})")
    return value


_COERCE: dict[Any, Callable[[Any], Any]] = {
    float: _as_float,
    int: _as_int,
    bool: _as_bool,
    str: _as_str,
    dict: _as_dict,
}


@functools.cache
def _field_types() -> dict[str, tuple[Callable[[Any], Any], bool]]:
    """Each field's coercion and whether it may be None (``X | None``)."""
    out = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        if base not in _COERCE:  # a bug in this file, caught by every test that builds a config
            raise RuntimeError(
                f"TrainConfig.{name} has type {hint}, which coerce_fields cannot check; add a rule to _COERCE"
            )
        out[name] = (_COERCE[base], optional)
    return out


def _coerce(name: str, value: Any) -> Any:
    convert, optional = _field_types()[name]
    if value is None and optional:
        return None
    try:
        return convert(value)
    except TypeError as exc:
        expected = f"{exc}{' or none' if optional else ''}"
        raise ValueError(f"{name} must be {expected}, got {short(value)} ({type(value).__name__})") from None


def check_known_fields(values: Mapping[str, Any], source: str) -> None:
    """ValueError naming every key of ``values`` that is not a field, with the closest field name."""
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = [k for k in values if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), known, n=1)
            hints.append(short(key) + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{source} has unknown field(s) {', '.join(hints)}; see 'ebpo train --help'")


def coerce_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with every field checked against its annotated type and normalised (YAML's '1e-4' -> 1e-4)."""
    check_known_fields(values, "the configuration")
    return {name: _coerce(name, value) for name, value in values.items()}


def _check_types(config: TrainConfig) -> None:
    """Every field already holds its annotated type (an int is fine where a float is expected)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        coerced = _coerce(f.name, value)
        if type(coerced) is not type(value) and not (type(value) is int and type(coerced) is float):
            convert, _ = _field_types()[f.name]
            expected = {_as_float: "a number", _as_int: "an integer"}.get(convert, "its annotated type")
            raise ValueError(
                f"{f.name} must be {expected}, got {short(value)} ({type(value).__name__}); coerce_fields() converts text"
            )


# ------------------------------------------------------------------ ranges
_POSITIVE = (
    "length_buckets",
    "difficulty_samples",
    "steps",
    "prompts_per_step",
    "group_size",
    "max_new_tokens",
    "ppo_epochs",
    "mini_batches",
    "log_every",
    "keep_checkpoints",
    "warmstart_batch_size",
    "lr",
    "warmstart_lr",
    "temperature",
    "difficulty_temperature",
    "top_p",
)
_NON_NEGATIVE = (
    "warmstart_steps",
    "threads",
    "lora_rank",
    "generation_batch_size",
    "micro_batch_size",
    "eval_every",
    "eval_samples",
    "max_eval_problems",
    "save_every",
    "max_resample_rounds",
    "candidates_per_step",
    "allocation_first_round",
    "max_samples",
    "overlong_buffer",
    "lr_warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "div_coef",
    "overlong_penalty",
    "eps_low",
    "eps_high",
    "seed",
    "warmstart_seed",
)
# Size fields whose huge values would not fail but run (nearly) forever or exhaust memory: a typo like
# max_new_tokens 1e8 must be an error, not a hang. Generous: no real run comes near these.
_AT_MOST = {
    "max_new_tokens": 131_072,
    "group_size": 4096,
    "eval_samples": 4096,
    "difficulty_samples": 4096,
    "top_p": 1.0,
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "lr_schedule": ("constant", "linear", "cosine"),
    "chat_template": ("auto", "always", "never"),
}


def _model_max_positions(model: str) -> int | None:
    """The policy's context length when it is known without loading it (built-in spec, local config.json)."""
    if model.startswith("builtin:"):
        from ebpo.models.loading import builtin_spec

        return builtin_spec(model).max_positions
    try:
        with open(os.path.join(model, "config.json")) as handle:
            value = json.load(handle).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def validate(config: TrainConfig) -> None:
    """Field-level checks that need no model or component (components are checked when built)."""
    _check_types(config)
    for name in _POSITIVE:
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(config, name)}")
    for name in _NON_NEGATIVE:
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    for name, most in _AT_MOST.items():
        if getattr(config, name) > most:
            raise ValueError(f"{name} must be <= {most}, got {getattr(config, name)}")
    positions = _model_max_positions(config.model)
    if positions is not None and config.max_new_tokens >= positions:
        raise ValueError(
            f"max_new_tokens ({config.max_new_tokens}) must be smaller than the model's context length ({positions} positions, prompt included)"
        )
    for name, choices in _CHOICES.items():
        if getattr(config, name) not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {short(getattr(config, name))}")
    from ebpo.train.trackers import parse_report_to

    parse_report_to(config.report_to)  # known names, libraries installed: before the run directory is made
    if config.eps_low >= 1.0:
        raise ValueError(f"eps_low must be < 1 (the ratio's lower clip is 1 - eps_low), got {config.eps_low}")
    if not config.temperature > 0:
        raise ValueError(
            f"temperature must be > 0, got {config.temperature}; use --eval-samples 0 for greedy evaluation"
        )
    if not 0 < config.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {config.top_p}")
    if config.overlong_buffer >= config.max_new_tokens:
        raise ValueError(
            f"overlong_buffer ({config.overlong_buffer}) must be smaller than max_new_tokens ({config.max_new_tokens})"
        )
    if config.prompts_per_step * config.group_size < config.mini_batches:
        raise ValueError(
            f"mini_batches ({config.mini_batches}) exceeds the responses per step "
            f"({config.prompts_per_step} prompts x {config.group_size}); lower --mini-batches"
        )
    if config.dynamic_sampling and (config.allocation != "uniform" or config.candidates_per_step):
        raise ValueError(
            f"dynamic_sampling (DAPO) re-draws whole steps of group_size and cannot be combined with allocation "
            f"{short(config.allocation)} or candidates_per_step {config.candidates_per_step}; choose one of the two"
        )
    if config.div_coef > 0 and config.divergence is None:
        raise ValueError(
            f"div_coef is {config.div_coef} but no divergence is set; pass --divergence kl (or prob_l2, ...) or --div-coef 0"
        )
    if config.mirror_params is not None:
        if config.divergence != "neural_mirror":
            raise ValueError(
                f"mirror_params needs --divergence neural_mirror (or --method gbmpo-mirror), got divergence {short(config.divergence)}"
            )
        if {"params", "params_path"} & set(config.divergence_options):
            raise ValueError(
                "give the mirror parameters once: --mirror-params or divergence option params/params_path, not both"
            )
    if config.divergence is not None and config.ref_model == "none":
        raise ValueError(
            f"divergence {short(config.divergence)} needs a reference policy but ref_model is 'none'; "
            "pass --ref-model init, or --divergence none"
        )
    if config.ref_model not in ("init", "none"):
        raise ValueError(f"ref_model must be 'init' or 'none', got {short(config.ref_model)}")
