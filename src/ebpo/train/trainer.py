"""The RLVR training loop, top to bottom.

One step::

    rollout     sample G completions for each of the step's prompts (batched generate, KV cache)
    score       verifier reward per completion (+ DAPO overlong shaping; DAPO dynamic sampling resamples)
    advantages  the estimator on the rewards of *every* rank (so its statistics agree everywhere)
    update      PPO epochs x mini-batches of the clipped loss (+ divergence to the reference policy)
    log         metrics.jsonl, TensorBoard, one console line
    checkpoint  every ``save_every`` steps, atomically

Components come from their registries (``ebpo.estimators``, ``ebpo.losses``,
``ebpo.divergences``, ``ebpo.verifiers``, ``ebpo.tasks``,
``ebpo.curriculum``); the trainer only wires them together.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import resource
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ebpo.fileio import short
from ebpo.models.loading import (
    BUILTIN_PREFIX,
    TinyLlamaSpec,
    add_lora,
    builtin_spec,
    check_model_source,
    load_adapter,
    load_policy,
    resolve_dtype,
)
from ebpo.sampling import EVAL_SEED_OFFSET, Rollout, end_of_turn_ids, generate, sample_correctness
from ebpo.tasks.build import build_task, build_verifier_for
from ebpo.train import checkpoint as ckpt
from ebpo.train.config import TrainConfig, validate
from ebpo.train.data import PromptStream
from ebpo.train.distributed import setup
from ebpo.train.procs import Stopped, StopSignals
from ebpo.train.rollout import SHARED_FORWARDS, length_chunks, overlong_penalty, rows_logprobs, score
from ebpo.train.tracking import Tracker, accuracy_change_se, format_line, plot_curves
from ebpo.train.warmstart import cached_warmstart, library_versions, start_identity, train_data_id

__all__ = ["Components", "build_components", "Trainer", "peak_rss_mb"]


@dataclass
class Components:
    """Everything the loop calls, built (and so validated) before any model is loaded."""

    task: Any
    verifier: Any
    estimator: Any
    loss_fn: Any
    divergence: Any | None
    allocator: Any = None  # ebpo.allocation: the group size of each candidate prompt (None: build_allocator("uniform"))


def build_components(config: TrainConfig) -> Components:
    """Build every component from the config; any bad name or option raises ValueError here, before training."""
    from ebpo.divergences import build_divergence
    from ebpo.estimators import build_estimator
    from ebpo.losses import build_policy_loss

    validate(config)
    check_model_source(config.model)
    try:  # an option of the wrong type (a list where a number goes) fails inside the component as a TypeError
        estimator = build_estimator(
            config.estimator,
            weighting=config.weighting,
            weighting_options=config.weighting_options or None,
            **config.estimator_options,
        )
    except TypeError as exc:
        raise ValueError(
            f"estimator {short(config.estimator)} cannot take options {short(config.estimator_options, 160)}"
            f"{' with weighting options ' + short(config.weighting_options, 160) if config.weighting_options else ''}: "
            f"{str(exc)[:200]}"
        ) from None
    if config.group_size < estimator.min_group_size:
        raise ValueError(
            f"estimator {config.estimator!r} compares responses within a group and needs group_size >= "
            f"{estimator.min_group_size}, got {config.group_size}; raise --group-size or use --estimator ebpo"
        )
    _probe_estimator(estimator, config)
    divergence_options = dict(config.divergence_options)
    if config.mirror_params is not None:  # validate() checked that the divergence is neural_mirror
        divergence_options["params_path"] = config.mirror_params
    try:
        divergence = build_divergence(config.divergence, **divergence_options) if config.divergence else None
    except TypeError as exc:
        raise ValueError(
            f"divergence {short(config.divergence)} cannot take options {short(divergence_options, 160)}: {str(exc)[:200]}"
        ) from None
    loss_fn = build_policy_loss(
        name=config.loss,
        eps_low=config.eps_low,
        eps_high=config.eps_high,
        agg=config.loss_agg,
        agg_constant=float(config.max_new_tokens),
        divergence=divergence,
        div_coef=config.div_coef,
        **config.loss_options,
    )
    from ebpo.curriculum import CURRICULA

    CURRICULA.get(config.curriculum)  # unknown curriculum -> ValueError now, not at the first step
    task = build_task(config.task, config.task_options)
    verifier = build_verifier_for(task, config.verifier)
    return Components(task, verifier, estimator, loss_fn, divergence, build_step_allocator(config, estimator))


def build_step_allocator(config: TrainConfig, estimator: Any) -> Any:
    """The rollout allocator of ``config``, checked against the estimator and the step's budget.

    Defaults: groups of at least ``min(2, group_size)`` completions (never below what the estimator
    needs) and at most ``max(32, group_size)``, so that ``uniform`` gives every prompt exactly
    ``group_size``, as a run without allocation does.
    """
    from ebpo.allocation import build_allocator, check_budget

    options = {
        "min_group_size": max(min(2, config.group_size), estimator.min_group_size),
        "max_group_size": max(32, config.group_size),
        **config.allocation_options,
    }
    try:
        allocator = build_allocator(config.allocation, **options)
    except TypeError as exc:
        raise ValueError(
            f"allocation {short(config.allocation)} cannot take options {short(config.allocation_options, 160)}: "
            f"{str(exc)[:200]}"
        ) from None
    if allocator.min_group_size < estimator.min_group_size:
        raise ValueError(
            f"allocation min_group_size {allocator.min_group_size} is below the {estimator.min_group_size} completions "
            f"estimator {config.estimator!r} needs per group; raise it in --allocation-options"
        )
    budget, candidates = config.prompts_per_step * config.group_size, step_candidates(config)
    first = config.allocation_first_round
    if first:
        if not hasattr(allocator, "top_up"):
            raise ValueError(
                f"allocation {config.allocation!r} cannot top up a first round (allocation_first_round {first}); "
                "use knapsack or eb, or --allocation-first-round 0"
            )
        if not allocator.min_group_size <= first <= allocator.max_group_size or first * candidates > budget:
            raise ValueError(
                f"allocation_first_round {first} must be between the allocation's min_group_size "
                f"{allocator.min_group_size} and max_group_size {allocator.max_group_size}, and {candidates} candidates x "
                f"{first} must fit the step's budget of {budget} completions"
            )
        return allocator
    try:
        check_budget(candidates, budget, allocator.min_group_size, allocator.max_group_size)
    except ValueError as exc:
        raise ValueError(
            f"the step's budget of {budget} completions ({config.prompts_per_step} prompts x {config.group_size}) cannot "
            f"be spread over {candidates} candidate prompts in groups of {allocator.min_group_size}.."
            f"{allocator.max_group_size} ({exc}); change --candidates-per-step or the allocation's group sizes"
        ) from None
    return allocator


def step_candidates(config: TrainConfig) -> int:
    """Candidate prompts drawn per step (``candidates_per_step``, 0 = ``prompts_per_step``)."""
    return config.candidates_per_step or config.prompts_per_step


class _FittingTask:
    """A task with the problems whose prompts fit the model's context (everything else from the task itself)."""

    def __init__(self, task: Any, train: list[Any], held_out: list[Any]) -> None:
        self._task, self._train, self._eval = task, train, held_out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def train_problems(self) -> list[Any]:
        return self._train

    def eval_problems(self) -> list[Any]:
        return self._eval


def model_context(model: str) -> int | None:
    """Positions the policy was built for (``max_position_embeddings``); None when it cannot be read cheaply."""
    from ebpo.models.loading import is_adapter_dir
    from ebpo.train.config import _model_max_positions

    positions = _model_max_positions(model)
    if positions is not None or model.startswith(BUILTIN_PREFIX) or is_adapter_dir(model):
        return positions
    if os.path.isdir(os.path.expanduser(model)):
        return None
    try:  # a hub id: its config is small and is downloaded with the model anyway
        from transformers import AutoConfig

        value = getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None)
    except Exception:  # noqa: BLE001 - unreadable now: loading the model will say why
        return None
    return value if isinstance(value, int) else None


# Every tokenizer ebpo meets makes at most one token per byte (byte-level BPE, byte-fallback SentencePiece, the
# character tokenizer) plus a few special tokens, so a prompt of at most ``budget - _SPECIALS`` bytes fits
# without tokenizing it; and none averages 32 characters per token, so a longer prompt than 32 x budget
# characters is too long without tokenizing it (a 50 MB dataset row costs nothing to refuse).
_SPECIALS, _CHARS_PER_TOKEN = 8, 32


def fit_prompts(config: TrainConfig, components: Components, echo: Callable[[str], None] = print) -> Components:
    """The components with a task that holds only the problems whose prompt fits the model, checked before
    any run directory exists: prompt tokens + ``max_new_tokens`` <= the model's context.

    Problems that do not fit are skipped with one line that counts them; a split where none fits is a
    ValueError. For the warm-started built-in model, a training set where no prompt + target fits (the
    warm start would fail after the run directory was made) is refused here too.
    """
    from ebpo.sampling import prompt_text

    positions = model_context(config.model)
    if positions is None:
        return components
    try:
        from ebpo.models.loading import load_tokenizer

        tokenizer = load_tokenizer(config.model)
    except Exception:  # noqa: BLE001 - loading the policy will report it, with its own message
        return components
    budget = positions - config.max_new_tokens
    task = components.task

    def fits(problem: Any) -> bool:
        text = prompt_text(problem, tokenizer, config.chat_template)
        if len(text) > _CHARS_PER_TOKEN * budget:
            return False
        if len(text.encode()) + _SPECIALS <= budget:
            return True
        return len(tokenizer(text)["input_ids"]) <= budget

    kept, counts = {}, {}
    for split, problems in (("training", list(task.train_problems())), ("held-out", list(task.eval_problems()))):
        kept[split] = [p for p in problems if fits(p)]
        counts[split] = (len(problems) - len(kept[split]), len(problems))
        if problems and not kept[split]:
            raise ValueError(
                f"no {split} prompt of task {config.task!r} fits {config.model}'s context: {positions} positions "
                f"minus --max-new-tokens {config.max_new_tokens} leaves {budget} prompt tokens; use a model with a "
                "longer context or lower --max-new-tokens"
            )
    if config.model.startswith(BUILTIN_PREFIX) and config.warmstart_steps > 0:
        _check_warmstart_fits(kept["training"], tokenizer, positions)
    if not counts["training"][0] and not counts["held-out"][0]:
        return components
    parts = [f"{skipped} of {total} {split}" for split, (skipped, total) in counts.items() if skipped]
    echo(
        f"skipped {' and '.join(parts)} prompts longer than {config.model}'s context ({positions} positions minus "
        f"--max-new-tokens {config.max_new_tokens} = {budget} prompt tokens)"
    )
    return dataclasses.replace(components, task=_FittingTask(task, kept["training"], kept["held-out"]))


def _check_warmstart_fits(problems: list[Any], tokenizer: Any, positions: int) -> None:
    """The warm start's own check (some prompt + target + EOS fits), run before any run directory exists."""
    from ebpo.train.warmstart import fitting_problems

    targets = [p for p in problems if p.completion_target]
    if any(len((p.prompt + p.completion_target).encode()) + _SPECIALS <= positions for p in targets):
        return  # one fits for sure: no tokenizing
    candidates = [p for p in targets if len(p.prompt) + len(p.completion_target) <= _CHARS_PER_TOKEN * positions]
    if targets and not candidates:
        raise ValueError(
            f"warm start: no training problem fits the model's {positions} positions (prompt + target + EOS); "
            "pass --warmstart-steps 0, or choose task options with shorter problems"
        )
    fitting_problems(candidates, tokenizer, positions)  # its ValueError when none fits (or none has a target)


def _probe_estimator(estimator: Any, config: TrainConfig) -> None:
    """Refuse, before training, an estimator/weighting that cannot take the rewards this config produces.

    One dry run (``training=False``: no state moves) on a synthetic step with
    the config's group size and reward range: a mixed group, an all-correct and
    an all-wrong group, correctness in {0, 1}, and, with DAPO's overlong
    shaping, rewards down to ``-overlong_penalty`` (a weighting that rejected those would
    otherwise fail mid-run, on the first overlong batch, not here). Two topics, so a hierarchical prior is exercised.
    """
    g = config.group_size
    correctness = torch.cat([(torch.arange(g) % 2 == 0).double(), torch.ones(g), torch.zeros(g)])  # (3G,)
    shaping = torch.zeros(3 * g, dtype=torch.float64)
    if config.overlong_buffer > 0:
        shaping[1::2] = -config.overlong_penalty  # every other response truncated
    group_ids = torch.arange(3).repeat_interleave(g)
    try:
        estimator(
            correctness + shaping,
            group_ids,
            topic_ids=(group_ids > 0).long(),
            correctness=correctness,
            prompt_ids=group_ids,
            training=False,
        )
    except ValueError as exc:
        raise ValueError(
            f"this configuration cannot train: estimator {config.estimator!r} with weighting {config.weighting!r} "
            f"rejects the rewards it would get (group size {g}, overlong shaping down to "
            f"{-config.overlong_penalty if config.overlong_buffer else 0.0}): {exc}"
        ) from exc


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class Trainer:
    """Owns the policy, the optimiser and every piece of state that a checkpoint saves."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str,
        components: Components,
        *,
        resume: bool,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.config, self.run_dir, self.c, self.echo = config, run_dir, components, echo
        self.start_time = time.time()
        # accelerate places this process on its device (cuda:LOCAL_RANK when launched on GPUs) and owns
        # mixed precision: --dtype is the compute dtype, the trained parameters stay fp32.
        self.dist = setup(config.device, config.dtype)
        self.device = self.dist.device
        self.compute_dtype = resolve_dtype(config.dtype, self.device)
        threads = config.threads or max(1, min(os.cpu_count() or 1, 8) // self.dist.world)
        torch.set_num_threads(threads)
        self._seed_everything(
            config.seed + self.dist.rank
        )  # sampling differs per rank; initialisation does not (below)
        self.spec = builtin_spec(config.model) if config.model.startswith(BUILTIN_PREFIX) else TinyLlamaSpec()
        self.lora = config.lora_rank > 0
        if config.loss == "kl_cov" and config.ppo_epochs * config.mini_batches == 1:
            echo(
                "warning: --loss kl_cov has no effect with one PPO epoch and one mini-batch: its penalty |logp - old_logp| "
                "is 0 when the policy has not moved yet; raise --ppo-epochs or --mini-batches, or use --loss clip_cov"
            )

        self.model, self.tokenizer, self.init_path = self._initial_policy()
        # The reference is the starting policy, frozen; only built when a divergence needs it. With LoRA
        # it is the policy itself with its adapters disabled (no second copy of the base weights). A full
        # copy is stored as the policy is (fp32 master weights) and runs under the same autocast, so the two
        # are the same function at step 0. A copy cast to the compute dtype is not: autocast runs the linear
        # layers in bf16 either way, but embeddings, norms and the residual stream stay fp32 only in the
        # policy. Measured on CPU under bf16 autocast at step 0 (random built-in models, 251 tokens): k3 KL
        # 1.0e-6 (tiny) and 1.5e-5 (medium), max |log-prob difference| 0.004 and 0.016, a pull toward the
        # copy's rounding. The cost: 4 bytes per parameter instead of 2 (the policy holds 16 with AdamW).
        needs_ref = components.divergence is not None and getattr(components.divergence, "needs_reference", True)
        if not needs_ref:
            self.ref_model = None
        elif self.lora:
            self.ref_model = self.model
        else:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.step, self.accuracy_before, self.elapsed_before = 0, None, 0.0
        self.samples_total = 0  # completions sampled so far, every rank and resampling round (max_samples reads it)
        self.mean_group_size = float(config.group_size)  # of the groups the estimator saw last step (the prior's noise)
        self.scores_before: Tensor | None = None  # per-problem held-out scores before RL (not kept across --resume)
        self.last_eval_scores: Tensor | None = None
        pass_rates = self._starting_pass_rates() if config.curriculum == "difficulty" else None
        self.stream = PromptStream(components.task.train_problems(), config.curriculum, config.seed, pass_rates)
        if resume:
            self._resume()
        # Every rank starts from rank 0's weights (LoRA adapters too), whatever each one loaded or initialised.
        self.dist.broadcast_parameters(self.model)
        optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99))
        # train_model: the model wrapped for gradient sync (DDP/FSDP as launched), used by the update's forwards;
        # self.model stays the plain module for generation, no-grad log-probs and checkpoints.
        self.train_model, self.optimizer = self.dist.prepare(self.model, optimizer)
        # The update runs each group's prompt once (two model calls per micro-batch, rollout.shared_prompt_logits).
        # Not under FSDP: two forwards of the sharded wrapper before one backward are not verified there (no GPU
        # here), so FSDP runs keep one forward over the full rows.
        self.share_update_prompts = config.share_prompt_cache and not self.dist.shards_parameters
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        if resume:
            self.dist.load_optimizer_state_dict(self.train_model, self.optimizer, self._resume_state["optimizer"])
            self.scheduler.load_state_dict(self._resume_state["scheduler"])
            ckpt.set_rng_state(self._resume_rng)
        from dataclasses import asdict

        from ebpo.train.trackers import selected

        self.tracker = Tracker(
            run_dir,
            enabled=self.dist.is_main,
            report_to=selected(config.report_to, config.tensorboard),
            config=asdict(config),  # logged once: the wandb config, the mlflow params
            resume_step=self.step,
            echo=echo,
        )

    # ---------------------------------------------------------------- setup
    @staticmethod
    def _seed_everything(seed: int) -> None:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _initial_policy(self) -> tuple[Any, Any, str]:
        """Load the policy; the built-in model is warm-started (cached) on rank 0 first, then everyone loads it."""
        cfg = self.config
        # Trained weights are stored in fp32 (master weights of mixed precision); under LoRA the frozen base is
        # stored in the compute dtype and peft keeps the adapters in fp32.
        storage = cfg.dtype if self.lora else "float32"
        model, tokenizer = load_policy(
            cfg.model, device=self.device, dtype=storage, spec=self.spec, seed=cfg.warmstart_seed
        )
        if not cfg.model.startswith(BUILTIN_PREFIX) or cfg.warmstart_steps == 0:
            return self._with_lora(model, cfg.model), tokenizer, cfg.model
        problems = self.c.task.train_problems()
        task_id = train_data_id(cfg.task, problems)
        settings = dict(
            spec=self.spec,
            task_id=task_id,
            steps=cfg.warmstart_steps,
            lr=cfg.warmstart_lr,
            batch_size=cfg.warmstart_batch_size,
            seed=cfg.warmstart_seed,
        )
        if not self.dist.is_main:
            self.dist.barrier()  # wait for rank 0 to train and cache it
        model, path = cached_warmstart(
            model, tokenizer, problems, log=self.echo if self.dist.is_main else (lambda _: None), **settings
        )
        if self.dist.is_main:
            self.dist.barrier()
        return self._with_lora(model, path), tokenizer, path

    def _with_lora(self, model: Any, base: str) -> Any:
        """LoRA adapters go on after the (full-parameter, cached) warm start, so the cache does not depend on them."""
        if self.config.lora_rank == 0:
            return model
        # The same adapters on every rank: initialised under the run's seed (not seed + rank), outside the
        # sampling RNG stream; Trainer.__init__ also broadcasts rank 0's parameters.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.config.seed)
            model = add_lora(model, self.config.lora_rank)
        model.peft_config["default"].base_model_name_or_path = base  # saved adapters name their base model
        return model

    def _starting_pass_rates(self) -> Tensor:
        """EBPO-diff's difficulty: the starting policy's pass rate on every training prompt, cached.

        ``difficulty_samples`` samples per prompt at ``difficulty_temperature``
        (the paper: 16 at 1.0). Cached under ``$EBPO_CACHE_DIR/difficulty`` by
        the starting model, task and sampling settings, so reruns and resumed
        runs see the same order. Costs len(train) x samples generations once.
        """
        import hashlib
        import json

        from ebpo.train.warmstart import cache_dir

        cfg = self.config
        problems = self.c.task.train_problems()
        key_src = json.dumps(
            {
                "model": self.init_path,
                "task": cfg.task,
                "options": cfg.task_options,
                "n": cfg.difficulty_samples,
                "t": cfg.difficulty_temperature,
                "top_p": cfg.top_p,
                "len": cfg.max_new_tokens,
                "problems": len(problems),
            },
            sort_keys=True,
            default=str,
        )
        path = os.path.join(cache_dir(), "difficulty", hashlib.sha256(key_src.encode()).hexdigest()[:16] + ".pt")
        if os.path.exists(path):
            from ebpo.fileio import load_tensors

            try:
                return load_tensors(path, what="difficulty cache")  # weights_only: the cache dir is shared
            except ValueError as exc:
                self.echo(f"{exc}; estimating it again")
        self.echo(
            f"difficulty curriculum: estimating the starting model's pass rate on {len(problems)} prompts x {cfg.difficulty_samples} samples"
        )
        with self._generation_context():
            rewards, _ = sample_correctness(
                self.model,
                self.tokenizer,
                problems,
                self.c.verifier,
                samples=cfg.difficulty_samples,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.difficulty_temperature,
                top_p=cfg.top_p,
                chat_template=cfg.chat_template,
                generation_batch_size=cfg.generation_batch_size,
                seed=cfg.seed,
            )
        pass_rates = torch.nan_to_num(rewards, nan=0.0).mean(dim=1)  # (num_train,)
        if self.dist.is_main:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(pass_rates, path + ".tmp")
            os.replace(path + ".tmp", path)
        return pass_rates

    def _lr_factor(self, update: int) -> float:
        cfg = self.config
        warmup = cfg.lr_warmup_steps
        if update < warmup:
            return (update + 1) / warmup
        total = max(1, cfg.steps * cfg.ppo_epochs * cfg.mini_batches - warmup)
        progress = min(1.0, (update - warmup) / total)
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        if cfg.lr_schedule == "cosine":
            import math

            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    def _resume(self) -> None:
        self.dist.barrier()  # rank 0 has put the newest complete checkpoint in place (cli.run) before anyone reads
        path = ckpt.check_checkpoint(self.run_dir, self.dist.world)
        state, rng = ckpt.load_trainer_state(path, self.dist)
        from transformers import AutoModelForCausalLM

        dtype = next(self.model.parameters()).dtype
        if self.lora:  # the checkpoint holds the adapter; the base is the starting model, already loaded
            self.model = load_adapter(
                os.path.join(path, "model"), dtype=dtype, trainable=True, base=self.model.unload()
            ).to(self.device)
            self.ref_model = self.model if self.ref_model is not None else None
        else:
            self.model = AutoModelForCausalLM.from_pretrained(os.path.join(path, "model"), dtype=dtype).to(self.device)
        self.c.estimator.load_state_dict(state["estimator"])
        self.stream.load_state_dict(state["stream"])
        cfg = self.config
        # Checkpoints from before allocation: every step sampled prompts_per_step x group_size (no DAPO resampling
        # counted), and the allocator starts empty (uniform keeps no history).
        allocation = state.get("allocation", {})
        if "allocator" in allocation:
            self.c.allocator.load_state_dict(allocation["allocator"])
        self.samples_total = int(allocation.get("samples_total", state["step"] * cfg.prompts_per_step * cfg.group_size))
        self.mean_group_size = float(allocation.get("mean_group_size", cfg.group_size))
        self.step, self.accuracy_before, self.elapsed_before = (
            state["step"],
            state["accuracy_before"],
            state["elapsed_seconds"],
        )
        self._resume_state, self._resume_rng = state, rng
        self.echo(f"resumed from {path} at step {self.step}")

    @contextlib.contextmanager
    def _generation_context(self) -> Any:
        """Sampling with the plain module, in the compute dtype (and FSDP's root parameters gathered)."""
        train_model = getattr(self, "train_model", None)
        with (
            self.dist.full_parameters(train_model) if train_model is not None else contextlib.nullcontext(),
            self.dist.autocast(),
        ):
            yield

    # ---------------------------------------------------------------- the loop
    def train(self, stop: StopSignals | None = None) -> dict[str, Any]:
        """Run to ``config.steps``, evaluate and save; returns the summary.

        ``stop``: once it has recorded a SIGTERM or SIGINT, the run ends after the step in progress (or
        before the first one) with a checkpoint of that step and one line, raising :class:`Stopped`. The
        checkpoint holds every RNG state, so a resume reproduces the uninterrupted run's next steps.
        """
        cfg = self.config
        self._stop_if_requested(stop, None, saved=False)
        if self.accuracy_before is None:
            self.accuracy_before = self.evaluate()
            self.scores_before = self.last_eval_scores  # per problem, for the paired standard error of the change
            self.echo(f"held-out accuracy before RL: {self.accuracy_before:.3f}")
        bar = _progress(cfg.steps, self.step, enabled=cfg.progress and self.dist.is_main)
        while self.step < cfg.steps and not (cfg.max_samples and self.samples_total >= cfg.max_samples):
            started = time.time()
            rollout, rewards, correctness, metrics = self.rollout_and_score()
            advantages, adv_metrics = self.compute_advantages(rollout, rewards, correctness)
            rollout_seconds = time.time() - started
            update_metrics = self.update(rollout, advantages)
            self.step += 1
            last = self.step >= cfg.steps or bool(cfg.max_samples and self.samples_total >= cfg.max_samples)
            metrics.update(adv_metrics, **update_metrics)
            metrics.update({"time/rollout_seconds": rollout_seconds, "time/step_seconds": time.time() - started})
            if cfg.eval_every and self.step % cfg.eval_every == 0 and not last:
                metrics["eval/accuracy"] = self.evaluate()
            self.tracker.log(self.step, metrics)
            if self.step % cfg.log_every == 0 or self.step == 1 or last:  # first, every log_every, last
                _write(bar, format_line(self.step, cfg.steps, metrics), self.echo if self.dist.is_main else None)
            saved = bool(cfg.save_every and self.step % cfg.save_every == 0 and not last)
            if saved:
                self.save()
            if bar is not None:
                bar.update(1)
            self._stop_if_requested(stop, bar, saved=saved)
        if bar is not None:
            bar.close()
        accuracy_after = self.evaluate()
        self.tracker.log(self.step, {"eval/accuracy": accuracy_after})
        self.save()
        return self.finish(accuracy_after)

    def _stop_if_requested(self, stop: StopSignals | None, bar: Any, *, saved: bool) -> None:
        """Between steps: if any rank got a stop signal, save this step's checkpoint (unless just saved),
        print one line and raise :class:`Stopped`. Every rank reads the same answer (one collective), so all
        of them stop at the same step and save together."""
        if stop is None:
            return
        signum = int(self.dist.max(float(stop.signum or 0)))
        if not signum:
            return
        if bar is not None:
            bar.close()
        if not saved:
            self.save()
        self.tracker.close()
        name = signal.Signals(signum).name
        self.echo(
            f"stopped by {name} at step {self.step}; resume with: ebpo train --resume {shlex.quote(self.run_dir)}"
        )
        raise Stopped(signum)

    def rollout_and_score(self) -> tuple[Rollout, Tensor, Tensor, dict[str, float]]:
        """Sample and score one step's responses (this rank's share); DAPO dynamic sampling resamples.

        Each round draws ``candidates_per_step`` prompts from the stream (the same on every rank),
        the allocator gives each a group size (``prompts_per_step x group_size`` completions in all;
        ``uniform``: ``group_size`` each), and the sampled prompts are dealt to the ranks by
        :func:`rank_prompts`. Every rank holds the same allocator and calls it with the same
        candidates, prior and observations, so the sizes agree without a collective (one small
        gather checks it). Group ids are global, so the estimator can pool groups from every rank.

        Returns the rollout, the rewards it is trained on (the verifier's
        correctness plus DAPO's overlong shaping), the correctness itself
        (what dynamic sampling, HA-DW and the allocator read) and metrics.
        """
        cfg, dist = self.config, self.dist
        rounds = 1 + (cfg.max_resample_rounds if cfg.dynamic_sampling else 0)
        rollouts, rewards_list, correct_list, metrics = [], [], [], {}
        kept_ids = torch.empty(0, dtype=torch.long)
        samples = all_equal_samples = allocation_seconds = 0.0
        for round_ in range(rounds):
            rollout, correctness, keep, info, alloc_metrics, seconds, kept = self._sample_round(round_)
            allocation_seconds += seconds
            if round_ == 0:
                metrics.update(self._rollout_metrics(rollout, correctness, keep, info))
                metrics.update(alloc_metrics)
            samples += dist.sum(float(len(rollout.texts)))
            rewards = correctness + self._overlong(rollout)
            rows = torch.nonzero(keep).squeeze(1)
            rollout, rewards, correctness = rollout.select(rows), rewards[keep], correctness[keep]
            rollouts.append(rollout)
            rewards_list.append(rewards)
            correct_list.append(correctness)
            ids, _, trials, mixed = group_outcomes(*kept)  # every rank's kept rows, gathered once by _sample_round
            all_equal_samples += float(trials[~mixed].sum())
            if not cfg.dynamic_sampling:
                break
            # DAPO keeps a group when 0 < #correct < G: on correctness, so that a group whose answers
            # are all right (or all wrong) and differ only by the overlong penalty is dropped
            # (the penalty is shaping, not signal about the answer).
            kept_ids = torch.cat([kept_ids, ids[mixed]])
            if kept_ids.numel() >= cfg.prompts_per_step:
                break
        rollout, rewards, correctness = Rollout.concat(rollouts), torch.cat(rewards_list), torch.cat(correct_list)
        if cfg.dynamic_sampling:
            metrics.update(
                {
                    "dapo/rounds": float(round_ + 1),
                    "dapo/kept_groups": float(min(kept_ids.numel(), cfg.prompts_per_step)),
                }
            )
            if kept_ids.numel() > 0:  # train on the first prompts_per_step groups with differing correctness
                selected = torch.isin(rollout.group_ids.cpu(), kept_ids[: cfg.prompts_per_step])
                rows = torch.nonzero(selected).squeeze(1)
                rollout, rewards, correctness = rollout.select(rows), rewards[selected], correctness[selected]
        self.samples_total += int(samples)
        trained = dist.sum(float(len(rewards)))
        groups = float(torch.unique(dist.all_gather_cat(rollout.group_ids.cpu())).numel())
        self.mean_group_size = trained / groups if groups else self.mean_group_size  # of the groups the estimator saw
        metrics.update(
            {
                "rollout/samples": samples,
                "rollout/samples_total": float(self.samples_total),
                "rollout/all_equal_samples": all_equal_samples,
                "time/allocation_seconds": allocation_seconds,
            }
        )
        return rollout, rewards, correctness, metrics

    def _sample_round(
        self, round_: int
    ) -> tuple[Rollout, Tensor, Tensor, dict[str, float], dict[str, float], float, tuple[Tensor, Tensor]]:
        """Draw the round's candidates, allocate the budget over them, sample and score this rank's prompts.

        Without a first round the allocator sizes every group at once. With
        ``allocation_first_round`` n0, every candidate first gets n0 completions; their outcomes go to
        the allocator, whose ``top_up`` then spreads the rest of the budget over the same groups
        (same group ids and ranks), which are merged. The allocator observes what each group got.
        Returns this rank's rollout (each group's rows together), its correctness, keep mask and
        verifier diagnostics, the allocator's metrics, the seconds allocation took, and every rank's
        kept rows as (correctness, group ids), gathered once for the allocator and reused by the caller.
        """
        from ebpo.allocation import AllocationRequest, allocation_metrics
        from ebpo.estimators import stable_prompt_ids
        from ebpo.grouping import stable_topic_ids

        cfg, dist = self.config, self.dist
        count, budget, first = step_candidates(cfg), cfg.prompts_per_step * cfg.group_size, cfg.allocation_first_round
        problems = self.stream.take(count)
        keys = stable_prompt_ids([p.id for p in problems])  # (count,) what the allocator keys its history by
        global_ids = torch.arange(count) + round_ * count
        started = time.time()
        mean, var = self._allocation_prior(stable_topic_ids([p.topic for p in problems]))
        request = AllocationRequest(keys, budget - first * count, mean, var)
        if first:
            sizes, metrics = torch.full((count,), first, dtype=torch.long), {}
        else:
            sizes, metrics = self.c.allocator.allocate(request)  # (count,) int64, the same on every rank
        seconds = time.time() - started
        self._check_ranks_agree(sizes)
        mine = rank_prompts(sizes, dist.rank, dist.world)
        parts = [self._sample_sizes(problems, global_ids, sizes, mine)]
        if first:
            successes, trials, kept_first = self._observe(parts, keys, global_ids)  # (count,) each, every rank's rows
            started = time.time()
            extra, metrics = self.c.allocator.top_up(request, successes, trials)
            seconds += time.time() - started
            self._check_ranks_agree(extra)
            parts.append(self._sample_sizes(problems, global_ids, extra, mine[extra[mine] > 0]))
            sizes = sizes + extra
        rollout, correctness, keep, info = _merge_scored(parts)
        _, _, kept = self._observe([(rollout, correctness, keep, info)] if not first else parts[1:], keys, global_ids)
        if first:
            kept = (torch.cat([kept_first[0], kept[0]]), torch.cat([kept_first[1], kept[1]]))
        metrics = {
            **metrics,
            **allocation_metrics(sizes, budget),
            **({"alloc/first_round_samples": float(first * count)} if first else {}),
        }
        return rollout, correctness, keep, info, metrics, seconds, kept

    def _sample_sizes(
        self, problems: list[Any], global_ids: Tensor, sizes: Tensor, mine: Tensor
    ) -> tuple[Rollout, Tensor, Tensor, dict[str, float]]:
        """Sample and score ``sizes[i]`` completions of each of this rank's prompts ``mine``.

        One :func:`generate` call sequence per distinct size, in increasing size, the same sequence
        on every rank (under FSDP each call is a collective; a rank with no prompt of a size makes
        idle calls). With one size (``uniform``) this is exactly the calls of a run without allocation.
        """
        parts = []
        for size in torch.unique(sizes[sizes > 0]).tolist():  # sorted: the same call sequence on every rank
            chosen = mine[sizes[mine] == size]
            if chosen.numel() == 0 and self.dist.sync_calls is None:
                continue
            parts.append(self._generate([problems[i] for i in chosen.tolist()], global_ids[chosen], size))
        if not parts:  # this rank got no prompt: an empty rollout (zero generate calls)
            parts.append(self._generate([], global_ids[:0], 1, sync=lambda calls: calls))
        rollout = Rollout.concat(parts)
        correctness, keep, info = score(rollout, self.c.verifier)  # (B,) the verifier's reward, unshaped
        return rollout, correctness, keep, info

    def _check_ranks_agree(self, sizes: Tensor) -> None:
        """One small gather: a rank whose allocator drifted would otherwise sample another batch silently."""
        dist = self.dist
        if dist.world > 1 and not bool((dist.all_gather_cat(sizes).reshape(dist.world, -1) == sizes).all()):
            raise RuntimeError(
                f"allocation {self.config.allocation!r} gave different group sizes on different ranks at step "
                f"{self.step + 1}; an allocator must be a deterministic function of its calls (seed its randomness, "
                "keep no rank-local state)"
            )

    def _generate(self, problems: list[Any], group_ids: Tensor, group_size: int, sync: Any = None) -> Rollout:
        cfg = self.config
        return generate(
            self.model,
            self.tokenizer,
            problems,
            group_ids,
            group_size=group_size,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            do_sample=True,
            chat_template=cfg.chat_template,
            batch_size=cfg.generation_batch_size,
            share_prompt_cache=cfg.share_prompt_cache,
            autocast=self._generation_context,
            sync=sync or self.dist.sync_calls,
        )

    def _allocation_prior(self, topic_ids: Tensor) -> tuple[Any, Any]:
        """The population prior the allocator starts each prompt from: the estimator's, when it keeps one.

        ``topic_ids`` (P,): the candidates' topics. EBPO gives its global (mu_glob, tau^2), or with
        ``hierarchical: true`` each candidate's topic prior (two (P,) tensors). These are statistics of
        observed group means; tau^2 contains the binomial noise of the groups they came from (last
        step's mean size), which :func:`~ebpo.allocation.between_prompt_variance` removes. Estimators
        without a prior give (None, None): the allocator then uses its default.
        """
        from ebpo.allocation import between_prompt_variance

        source = getattr(self.c.estimator, "population_prior", None)  # the pipeline has it; a bare callable may not
        prior = source(topic_ids) if source is not None else None  # None unless the estimator keeps a prior
        if prior is None:
            return None, None
        mean, tau2 = prior
        mean = torch.as_tensor(mean, dtype=torch.float64).clamp(0.0, 1.0)
        mean = mean if mean.dim() else float(mean)
        if not self.mean_group_size > 1:
            return mean, None
        return mean, between_prompt_variance(tau2, mean, self.mean_group_size)

    def _observe(
        self, parts: list[tuple[Rollout, Tensor, Tensor, Any]], keys: Tensor, global_ids: Tensor
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """Tell the allocator what each candidate's group got in ``parts`` (this rank's scored rollouts).

        Every rank's kept rows are gathered, so every allocator sees the same observations. Returns
        the successes and completions of each candidate (count,) (0 for one not sampled), and the
        gathered rows as (correctness, group ids).
        """
        dist, allocator = self.dist, self.c.allocator
        correctness = torch.cat([c[k] for _, c, k, _ in parts])
        group_ids = torch.cat([r.group_ids.cpu()[k.cpu()] for r, _, k, _ in parts])
        correctness, gathered_ids = dist.all_gather_cat(correctness), dist.all_gather_cat(group_ids)
        ids, successes, trials, _ = group_outcomes(correctness, gathered_ids)
        index = ids - global_ids[0]  # positions among the round's candidates
        per_successes = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, index, successes)
        per_trials = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, index, trials)
        if allocator.reads_history and ids.numel():
            if bool(((correctness < 0) | (correctness > 1)).any()):
                raise ValueError(
                    f"allocation {self.config.allocation!r} counts successes and needs the verifier's rewards in "
                    f"[0, 1]; verifier {self.config.verifier!r} returned rewards outside it"
                )
            allocator.observe(keys[index], successes, trials)
        return per_successes, per_trials, (correctness, gathered_ids)

    def _overlong(self, rollout: Rollout) -> Tensor:
        cfg = self.config
        if cfg.overlong_buffer == 0:
            return torch.zeros(len(rollout.texts), dtype=torch.float64)
        mask = rollout.completion_mask.bool()  # (B, T)
        completion = rollout.input_ids[:, rollout.prompt_length :]  # (B, T)
        ends = torch.tensor(end_of_turn_ids(self.model, self.tokenizer), device=completion.device)  # as sampling's
        stopped = (torch.isin(completion, ends) & mask).any(1)  # (B,) ended its turn; the rest were truncated
        lengths = mask.sum(1).cpu()  # (B,)
        return overlong_penalty(
            lengths,
            ~stopped.cpu(),
            max_new_tokens=cfg.max_new_tokens,
            buffer=cfg.overlong_buffer,
            penalty=cfg.overlong_penalty,
        )

    def _rollout_metrics(
        self, rollout: Rollout, rewards: Tensor, keep: Tensor, info: dict[str, float]
    ) -> dict[str, float]:
        dist = self.dist
        count = dist.sum(float(keep.sum()))
        lengths = rollout.completion_mask.sum(1).double().cpu()
        metrics = {
            "train/accuracy": dist.sum(float(rewards[keep].sum())) / max(count, 1.0),
            "rollout/completion_length": dist.sum(float(lengths.sum())) / max(dist.sum(float(len(lengths))), 1.0),
            "rollout/skipped_frac": 1.0 - count / max(dist.sum(float(len(keep))), 1.0),
        }
        metrics.update(dist.sum_dict(info))  # ranks may see different diagnostic keys
        return metrics

    def compute_advantages(
        self, rollout: Rollout, rewards: Tensor, correctness: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """Advantages of this rank's responses from the estimator run on the global batch.

        Rewards, correctness, group ids and topic ids of every rank are
        gathered first, so the estimator sees the whole step (its statistics
        and state are then bit-identical on every rank), and each rank keeps
        its own slice. Topic ids hash ``Problem.topic`` (stable across ranks
        and resumes; see :func:`ebpo.grouping.stable_topic_ids`).
        """
        from ebpo.estimators import stable_prompt_ids
        from ebpo.grouping import stable_topic_ids

        dist = self.dist
        all_rewards = dist.all_gather_cat(rewards)  # (N_global,)
        all_correct = dist.all_gather_cat(correctness)  # (N_global,)
        all_ids = dist.all_gather_cat(rollout.group_ids.cpu())
        all_topics = dist.all_gather_cat(stable_topic_ids([p.topic for p in rollout.problems]))
        # A prompt's key across steps (group ids name a group within one step): per-prompt trackers (spo,
        # krpo carry=True) keep their state under it.
        all_prompts = dist.all_gather_cat(stable_prompt_ids([p.id for p in rollout.problems]))
        advantages, metrics = self.c.estimator(
            all_rewards, all_ids, topic_ids=all_topics, correctness=all_correct, prompt_ids=all_prompts, training=True
        )
        offset = dist.local_offset(len(rewards))
        return advantages[offset : offset + len(rewards)].float().to(self.device), metrics

    def update(self, rollout: Rollout, advantages: Tensor) -> dict[str, float]:
        """PPO epochs x mini-batches of the policy loss; one AdamW step per mini-batch.

        Metrics are of the global batch: ``loss/policy`` and ``loss/total`` are
        the losses the optimiser steps minimised (their micro-batch parts are
        normalised by the global counts, so they add up), averaged over the
        step's updates; the other loss diagnostics and ``policy/entropy`` are
        token-weighted means over every rank; ``optim/lr`` is the rate the
        updates used (their mean).
        """
        cfg, dist = self.config, self.dist
        mask = rollout.completion_mask.float()  # (B, T)
        rows = torch.arange(len(advantages))
        # Row lengths on the CPU, read back once: micro-batch cuts and token counts need no device sync.
        lengths = rollout.row_lengths()
        completion_lengths = lengths[1]  # (B,) int64
        # Old log-probs are needed only when the policy moves before the last
        # mini-batch is seen; with one epoch and one mini-batch the policy *is*
        # the old policy, so the ratio's denominator is the detached log-prob
        # of the same forward pass (saves a forward).
        on_policy = cfg.ppo_epochs * cfg.mini_batches == 1
        old_logprobs = None if on_policy else self._logprobs(self.model, rollout, rows, lengths=lengths)
        ref_logprobs = (
            self._logprobs(self.ref_model, rollout, rows, reference=True, lengths=lengths)
            if self.ref_model is not None
            else None
        )
        # The loss checks the policy's log-probs before backward; the reference's are checked here, once per step
        # (one read): an overflow in the reference forward (fp16) would otherwise reach AdamW as NaN.
        if ref_logprobs is not None and not bool(torch.isfinite(ref_logprobs).all()):
            raise ValueError(
                "ref_logprobs contains NaN or infinite values: the reference policy's forward overflowed or its "
                "weights are not finite (fp16 overflows where bf16 does not: use --dtype bfloat16 or float32)"
            )
        # Metrics stay on the device (0-dim tensors) until the end of the step: one host sync for all of them.
        additive: dict[str, Any] = {}  # parts of a globally normalised loss: they sum over micro-batches and ranks
        weighted: dict[str, Any] = {"tokens": 0.0}  # token-weighted sums of per-token means
        grad_norms, lrs = [], []
        from ebpo.losses import LossInputs

        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(rows)) if cfg.mini_batches > 1 else rows
            for mini in torch.tensor_split(order, cfg.mini_batches):
                num_tokens = dist.sum(float(completion_lengths[mini].sum()))
                num_seqs = dist.sum(float(len(mini)))
                share = self.share_update_prompts
                micros = length_chunks(
                    rollout, mini, cfg.micro_batch_size, cfg.length_buckets, lengths, whole_groups=share
                )
                micros = [m for m in micros if m.numel() > 0]
                # DDP needs the same number of backward passes on every rank: ranks with fewer micro-batches
                # (dynamic sampling, skipped rewards, uneven shards) pad with zero-weight passes, and only the
                # last pass of the mini-batch all-reduces (the others accumulate under no_sync).
                passes = int(dist.max(len(micros)))
                for index in range(passes):
                    last = index == passes - 1
                    with dist.no_sync(self.train_model) if not last else contextlib.nullcontext(), dist.autocast():
                        if index >= len(micros):
                            loss = self._padding_loss()
                        else:
                            micro = micros[index]
                            logprobs, entropy = rows_logprobs(
                                self.train_model,
                                rollout,
                                micro,
                                cfg.temperature,
                                entropy=True,
                                lengths=lengths,
                                share_prompts=share,
                            )
                            inputs = LossInputs(
                                logprobs=logprobs,
                                old_logprobs=logprobs.detach() if old_logprobs is None else old_logprobs[micro],
                                advantages=advantages[micro],
                                mask=mask[micro],
                                ref_logprobs=None if ref_logprobs is None else ref_logprobs[micro],
                            )
                            out = self.c.loss_fn(inputs, num_tokens=num_tokens, num_seqs=num_seqs)
                            loss = out.loss
                            tokens = float(completion_lengths[micro].sum())
                            for key, value in out.metrics.items():
                                target, weight = (additive, 1.0) if key in _ADDITIVE_METRICS else (weighted, tokens)
                                target[key] = target.get(key, 0.0) + value * weight
                            weighted["policy/entropy"] = (
                                weighted.get("policy/entropy", 0.0) + (entropy * mask[micro]).sum()
                            )
                            weighted["tokens"] += tokens
                        # The loss is this rank's share of the global-count-normalised loss, so the *sum* over ranks
                        # of the gradients is the full-batch gradient; DDP (and FSDP, DeepSpeed) *average* them over
                        # ranks, hence the factor world.
                        dist.backward(loss * dist.world)
                lrs.append(self.scheduler.get_last_lr()[0])  # the rate this optimiser step uses
                grad_norms.append(
                    dist.clip_grad_norm_(
                        self.params,
                        cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"),
                        model=self.train_model,
                    )
                )
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        local = _read_back(
            {**{f"sum:{k}": v for k, v in additive.items()}, **{f"weighted:{k}": v for k, v in weighted.items()}}
        )
        totals = dist.sum_dict(local)
        tokens = max(totals.get("weighted:tokens", 0.0), 1.0)
        metrics = {k[len("sum:") :]: v / len(lrs) for k, v in totals.items() if k.startswith("sum:")}
        metrics.update(
            {
                k[len("weighted:") :]: v / tokens
                for k, v in totals.items()
                if k.startswith("weighted:") and k != "weighted:tokens"
            }
        )
        metrics["optim/grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["optim/lr"] = sum(lrs) / len(lrs)
        if self.device.type == "cuda":  # this rank's peak since the run started (rank 0's is logged)
            metrics["system/peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    def _padding_loss(self) -> Tensor:
        """A zero-weight loss through every parameter of the policy (the DDP-padding backward pass).

        As many model calls as a real micro-batch makes (two when prompts are shared), so that the
        forward-time collectives of DDP (buffer broadcasts) stay in step across ranks.
        """
        token = torch.full((1, 1), self.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
        calls = SHARED_FORWARDS if self.share_update_prompts else 1
        logits = [
            self.train_model(input_ids=token, attention_mask=torch.ones_like(token), use_cache=False).logits
            for _ in range(calls)
        ]
        return sum(x.float().sum() for x in logits) * 0.0

    @torch.no_grad()
    def _logprobs(
        self,
        model: Any,
        rollout: Rollout,
        rows: Tensor,
        *,
        reference: bool = False,
        lengths: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Detached log-probs of ``rows`` at the rollout temperature; ``reference`` under LoRA: adapters disabled.

        (The flag, not ``model is self.ref_model``: with LoRA both are the same object, and the old
        log-probs of PPO epochs must keep the adapters on.)

        Under FSDP the policy's parameters are whole only inside its wrapper's forward, so the policy (and
        the LoRA reference, the same module) runs through ``train_model``, and every rank makes the same
        number of forwards (each gathers shards: a collective), padding with idle ones as the update does.
        A full-copy reference is a plain module on every rank and runs as it is.
        """
        lengths = rollout.row_lengths() if lengths is None else lengths
        out = torch.zeros(rollout.completion_mask.shape, dtype=torch.float32, device=self.device)
        sharded = self.dist.shards_parameters and model is self.model
        forward = self.train_model if sharded else model
        with model.disable_adapter() if self.lora and reference else contextlib.nullcontext(), self.dist.autocast():
            share = self.share_update_prompts
            micros = length_chunks(
                rollout, rows, self.config.micro_batch_size, self.config.length_buckets, lengths, whole_groups=share
            )
            micros = [micro for micro in micros if micro.numel() > 0]
            for index in range(int(self.dist.max(len(micros))) if sharded else len(micros)):
                if index >= len(micros):
                    self._padding_loss()  # an idle forward: the other ranks' forwards gather shards from this one
                    continue
                out[micros[index]] = rows_logprobs(
                    forward, rollout, micros[index], self.config.temperature, lengths=lengths, share_prompts=share
                ).float()
        return out[rows]

    @torch.no_grad()
    def evaluate(self) -> float:
        """Held-out accuracy: greedy, or avg@k with ``eval_samples`` samples (under a fixed seed).

        Uses :func:`ebpo.sampling.sample_correctness`, the function ``ebpo eval``
        uses, so ``ebpo eval`` on a checkpoint reproduces this number.
        """
        cfg, dist = self.config, self.dist
        problems = list(self.c.task.eval_problems())
        if cfg.max_eval_problems:
            problems = problems[: cfg.max_eval_problems]
        with self._generation_context():
            rewards, _ = sample_correctness(
                self.model,
                self.tokenizer,
                problems[dist.rank :: dist.world],
                self.c.verifier,
                samples=cfg.eval_samples,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                chat_template=cfg.chat_template,
                generation_batch_size=cfg.generation_batch_size,
                seed=cfg.seed + EVAL_SEED_OFFSET * (dist.rank + 1),
                sync=dist.sync_calls,
            )
        scored = ~torch.isnan(rewards)
        # (P,) per-problem mean reward (NaN where every sample was skipped), gathered in rank order.
        self.last_eval_scores = dist.all_gather_cat(torch.nanmean(rewards, dim=1).to(self.device)).cpu()
        return dist.sum(float(rewards[scored].sum())) / max(dist.sum(float(scored.sum())), 1.0)

    def _by_topic(self) -> dict[str, dict[str, float]]:
        """Held-out accuracy per ``Problem.topic`` before and after RL (``{}`` when no problem has a topic).

        The per-problem scores were gathered in rank order of the ``problems[rank::world]`` shards;
        every problem has the same number of samples, so a topic's accuracy is the mean of its problems'.
        """
        problems = list(self.c.task.eval_problems())
        if self.config.max_eval_problems:
            problems = problems[: self.config.max_eval_problems]
        world = self.dist.world
        topics = [p.topic for rank in range(world) for p in problems[rank::world]]
        if all(t is None for t in topics):
            return {}
        out: dict[str, dict[str, float]] = {}
        for name in sorted({t for t in topics if t is not None}):
            rows = torch.tensor([t == name for t in topics])
            out[name] = {
                "problems": int(rows.sum()),
                "before": float(torch.nanmean(self.scores_before[rows])),  # type: ignore[index]
                "after": float(torch.nanmean(self.last_eval_scores[rows])),  # type: ignore[index]
            }
        return out

    # ---------------------------------------------------------------- checkpoint and summary
    def save(self) -> None:
        # Both gathers are collectives under FSDP (every rank calls save); elsewhere they read the local state.
        model_state = self.dist.full_state_dict(self.train_model)
        state = {
            "step": self.step,
            "optimizer": self.dist.optimizer_state_dict(self.train_model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "estimator": self.c.estimator.state_dict(),
            "stream": self.stream.state_dict(),
            "allocation": {
                "allocator": self.c.allocator.state_dict(),
                "samples_total": self.samples_total,
                "mean_group_size": self.mean_group_size,
            },
            "accuracy_before": self.accuracy_before,
            "elapsed_seconds": self.elapsed_before + time.time() - self.start_time,
            "init_model": self.init_path,
        }
        ckpt.save_checkpoint(
            self.run_dir,
            self.step,
            model=self.model,
            tokenizer=self.tokenizer,
            trainer_state=state,
            dist=self.dist,
            keep=self.config.keep_checkpoints,
            model_state=model_state,
        )

    def finish(self, accuracy_after: float) -> dict[str, Any]:
        eval_problems = (
            len(self.c.task.eval_problems())
            if not self.config.max_eval_problems
            else min(self.config.max_eval_problems, len(self.c.task.eval_problems()))
        )
        samples = max(self.config.eval_samples, 1)
        gain_se, gain_se_kind = accuracy_change_se(
            self.scores_before,
            self.last_eval_scores,
            accuracy_before=self.accuracy_before or 0.0,
            accuracy_after=accuracy_after,
            samples=eval_problems * samples,
        )
        summary = {
            "method": self.config.method,
            "task": self.config.task,
            "seed": self.config.seed,
            "steps": self.step,
            "samples": self.samples_total,
            "accuracy_before": self.accuracy_before,
            "accuracy_after": accuracy_after,
            "accuracy_gain": accuracy_after - (self.accuracy_before or 0.0),
            "accuracy_gain_se": gain_se,
            "accuracy_gain_se_kind": gain_se_kind,
            "eval_problems": eval_problems,
            "eval_mode": "greedy" if self.config.eval_samples == 0 else f"avg@{self.config.eval_samples}",
            "wall_seconds": self.elapsed_before + time.time() - self.start_time,
            "peak_rss_mb": peak_rss_mb(),
            "world_size": self.dist.world,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "versions": {**library_versions(), "python": sys.version.split()[0]},
            "start": {"model": self.init_path, **start_identity(self.init_path)},
            "estimator_state": _plain(self.c.estimator.state_dict()),
        }
        if self.scores_before is not None and self.last_eval_scores is not None:
            summary["accuracy_by_topic"] = self._by_topic()
        self.tracker.close()
        if self.dist.is_main:
            import json

            path = os.path.join(self.run_dir, "summary.json")
            try:  # whole or absent: compare reads a run with summary.json as finished
                with open(path + ".tmp", "w") as handle:
                    json.dump(summary, handle, indent=2)
                os.replace(path + ".tmp", path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.remove(path + ".tmp")
                raise
            plot_curves(
                os.path.join(self.run_dir, "metrics.jsonl"),
                os.path.join(self.run_dir, "learning_curve.png"),
                f"{self.config.method} on {self.config.task}",
                accuracy_before=self.accuracy_before,
            )
        return summary


# Loss metrics that are parts of a loss normalised by global counts (they add up over micro-batches and
# ranks); every other loss metric is a per-token mean and is averaged with token weights.
_ADDITIVE_METRICS = frozenset({"loss/policy", "loss/total"})


def _read_back(values: dict[str, Any]) -> dict[str, float]:
    """Floats of a dict of floats and 0-dim tensors, with one device-to-host copy for all the tensors."""
    tensors = [v.detach().to(torch.float64) for v in values.values() if isinstance(v, Tensor)]
    read = iter(torch.stack(tensors).tolist() if tensors else [])  # the one sync
    return {k: next(read) if isinstance(v, Tensor) else float(v) for k, v in values.items()}


def group_outcomes(correctness: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per group (sorted ids): the id, the summed correctness, the number of rows, and whether the correctness differs.

    Four (K,) tensors: ids int64, successes and trials float64, mixed bool. A group is mixed when its
    correctness is not all equal; with 0/1 correctness that is DAPO's keep rule 0 < #correct < G
    (arXiv 2503.14476 eq. 11) and the complement of an all-equal (zero-signal) group. Pass the
    verifier's score, not the shaped reward.
    """
    ids, inverse = torch.unique(group_ids, return_inverse=True)
    k = len(ids)
    values = correctness.to(torch.float64)
    low = torch.full((k,), float("inf"), dtype=torch.float64).scatter_reduce(0, inverse, values, "amin")
    high = torch.full((k,), float("-inf"), dtype=torch.float64).scatter_reduce(0, inverse, values, "amax")
    successes = torch.zeros(k, dtype=torch.float64).index_add_(0, inverse, values)
    trials = torch.zeros(k, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(values))
    return ids, successes, trials, high > low


def rank_prompts(sizes: Tensor, rank: int, world: int) -> Tensor:
    """Indices of the prompts rank ``rank`` samples: the non-empty ones dealt round-robin in decreasing size.

    Ties keep their order, so with equal sizes rank r gets prompts r, r + world, ...; larger groups
    are spread first, which keeps the ranks' completion counts within one largest group of each
    other. Sorted ascending.
    """
    order = torch.argsort(-sizes, stable=True)
    order = order[sizes[order] > 0]
    return order[rank::world].sort().values


def _merge_scored(
    parts: list[tuple[Rollout, Tensor, Tensor, dict[str, float]]],
) -> tuple[Rollout, Tensor, Tensor, dict[str, float]]:
    """Scored rollouts of one round as one, each group's rows together (a first round and its top-ups merge)."""
    if len(parts) == 1:
        return parts[0]
    rollout = Rollout.concat([p[0] for p in parts])
    correctness, keep = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
    info: dict[str, float] = {}
    for part in parts:
        for key, value in part[3].items():
            info[key] = info.get(key, 0.0) + value
    order = torch.argsort(rollout.group_ids, stable=True)
    return rollout.select(order), correctness[order], keep[order], info


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of an estimator state (tensors become lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    return value


def _progress(total: int, initial: int, *, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="RL", unit="step", dynamic_ncols=True, leave=False)


def _write(bar: Any, line: str, echo: Callable[[str], None] | None) -> None:
    if echo is None:
        return
    if bar is not None:
        bar.write(line)
    else:
        echo(line)
