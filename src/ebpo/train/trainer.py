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
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ebpo.models.loading import BUILTIN_PREFIX, TinyLlamaSpec, add_lora, check_model_source, load_adapter, load_policy, select_device
from ebpo.train import checkpoint as ckpt
from ebpo.train.config import TrainConfig, validate
from ebpo.train.data import PromptStream, build_task, build_verifier_for
from ebpo.train.distributed import Dist, setup
from ebpo.train.rollout import Rollout, generate, length_chunks, overlong_penalty, rows_logprobs, score
from ebpo.train.tracking import Tracker, accuracy_change_se, format_line, plot_curves
from ebpo.train.warmstart import cached_warmstart, library_versions, train_data_id

__all__ = ["Components", "build_components", "Trainer", "peak_rss_mb"]


@dataclass
class Components:
    """Everything the loop calls, built (and so validated) before any model is loaded."""

    task: Any
    verifier: Any
    estimator: Any
    loss_fn: Any
    divergence: Any | None


def build_components(config: TrainConfig) -> Components:
    """Build every component from the config; any bad name or option raises ValueError here, before training."""
    from ebpo.divergences import build_divergence
    from ebpo.estimators import build_estimator
    from ebpo.losses import build_policy_loss

    validate(config)
    check_model_source(config.model)
    estimator = build_estimator(
        config.estimator,
        weighting=config.weighting,
        weighting_options=config.weighting_options or None,
        **config.estimator_options,
    )
    if config.group_size < estimator.min_group_size:
        raise ValueError(
            f"estimator {config.estimator!r} compares responses within a group and needs group_size >= "
            f"{estimator.min_group_size}, got {config.group_size}; raise --group-size or use --estimator ebpo"
        )
    divergence_options = dict(config.divergence_options)
    if config.mirror_params is not None:  # validate() checked that the divergence is neural_mirror
        divergence_options["params_path"] = config.mirror_params
    divergence = build_divergence(config.divergence, **divergence_options) if config.divergence else None
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
    return Components(task, verifier, estimator, loss_fn, divergence)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class Trainer:
    """Owns the policy, the optimiser and every piece of state that a checkpoint saves."""

    def __init__(self, config: TrainConfig, run_dir: str, components: Components, *, resume: bool, echo: Callable[[str], None] = print) -> None:
        self.config, self.run_dir, self.c, self.echo = config, run_dir, components, echo
        self.start_time = time.time()
        self.device = select_device(config.device)
        self.dist = setup(self.device)
        threads = config.threads or max(1, min(os.cpu_count() or 1, 8) // self.dist.world)
        torch.set_num_threads(threads)
        self._seed_everything(config.seed + self.dist.rank)
        self.spec = TinyLlamaSpec()

        self.model, self.tokenizer, self.init_path = self._initial_policy()
        # The reference is the starting policy, frozen; only built when a divergence needs it. With LoRA
        # it is the policy itself with its adapters disabled (no second copy of the base weights).
        needs_ref = components.divergence is not None and getattr(components.divergence, "needs_reference", True)
        self.lora = config.lora_rank > 0
        if not needs_ref:
            self.ref_model = None
        elif self.lora:
            self.ref_model = self.model
        else:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.step, self.accuracy_before, self.elapsed_before = 0, None, 0.0
        self.scores_before: Tensor | None = None  # per-problem held-out scores before RL (not kept across --resume)
        self.last_eval_scores: Tensor | None = None
        pass_rates = self._starting_pass_rates() if config.curriculum == "difficulty" else None
        self.stream = PromptStream(components.task.train_problems(), config.curriculum, config.seed, pass_rates)
        if resume:
            self._resume()
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        if resume:
            self.optimizer.load_state_dict(self._resume_state["optimizer"])
            self.scheduler.load_state_dict(self._resume_state["scheduler"])
            ckpt.set_rng_state(self._resume_rng)
        self.tracker = Tracker(run_dir, enabled=self.dist.is_main, tensorboard=config.tensorboard, resume_step=self.step, echo=echo)

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
        model, tokenizer = load_policy(cfg.model, device=self.device, dtype=cfg.dtype, spec=self.spec, seed=cfg.warmstart_seed)
        if not cfg.model.startswith(BUILTIN_PREFIX) or cfg.warmstart_steps == 0:
            return self._with_lora(model, cfg.model), tokenizer, cfg.model
        problems = self.c.task.train_problems()
        task_id = train_data_id(cfg.task, problems)
        settings = dict(spec=self.spec, task_id=task_id, steps=cfg.warmstart_steps, lr=cfg.warmstart_lr, batch_size=cfg.warmstart_batch_size, seed=cfg.warmstart_seed)
        if not self.dist.is_main:
            self.dist.barrier()  # wait for rank 0 to train and cache it
        model, path = cached_warmstart(model, tokenizer, problems, log=self.echo if self.dist.is_main else (lambda _: None), **settings)
        if self.dist.is_main:
            self.dist.barrier()
        return self._with_lora(model, path), tokenizer, path

    def _with_lora(self, model: Any, base: str) -> Any:
        """LoRA adapters go on after the (full-parameter, cached) warm start, so the cache does not depend on them."""
        if self.config.lora_rank == 0:
            return model
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

        from ebpo.evaluate import sample_correctness
        from ebpo.train.warmstart import cache_dir

        cfg = self.config
        problems = self.c.task.train_problems()
        key_src = json.dumps(
            {"model": self.init_path, "task": cfg.task, "options": cfg.task_options, "n": cfg.difficulty_samples,
             "t": cfg.difficulty_temperature, "top_p": cfg.top_p, "len": cfg.max_new_tokens, "problems": len(problems)},
            sort_keys=True, default=str,
        )  # fmt: skip
        path = os.path.join(cache_dir(), "difficulty", hashlib.sha256(key_src.encode()).hexdigest()[:16] + ".pt")
        if os.path.exists(path):
            return torch.load(path)
        self.echo(f"difficulty curriculum: estimating the starting model's pass rate on {len(problems)} prompts x {cfg.difficulty_samples} samples")
        rewards, _ = sample_correctness(
            self.model, self.tokenizer, problems, self.c.verifier, samples=cfg.difficulty_samples,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.difficulty_temperature, top_p=cfg.top_p,
            chat_template=cfg.chat_template, generation_batch_size=cfg.generation_batch_size, seed=cfg.seed,
        )  # fmt: skip
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
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            raise ValueError(f"--resume {self.run_dir}: no checkpoint in {os.path.join(self.run_dir, 'checkpoints')}")
        state, rng = ckpt.load_trainer_state(path, self.dist)
        from transformers import AutoModelForCausalLM

        dtype = next(self.model.parameters()).dtype
        if self.lora:  # the checkpoint holds the adapter; the base is the starting model, already loaded
            self.model = load_adapter(os.path.join(path, "model"), dtype=dtype, trainable=True, base=self.model.unload()).to(self.device)
            self.ref_model = self.model if self.ref_model is not None else None
        else:
            self.model = AutoModelForCausalLM.from_pretrained(os.path.join(path, "model"), dtype=dtype).to(self.device)
        self.c.estimator.load_state_dict(state["estimator"])
        self.stream.load_state_dict(state["stream"])
        self.step, self.accuracy_before, self.elapsed_before = state["step"], state["accuracy_before"], state["elapsed_seconds"]
        self._resume_state, self._resume_rng = state, rng
        self.echo(f"resumed from {path} at step {self.step}")

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict[str, Any]:
        cfg = self.config
        if self.accuracy_before is None:
            self.accuracy_before = self.evaluate()
            self.scores_before = self.last_eval_scores  # per problem, for the paired standard error of the change
            self.echo(f"held-out accuracy before RL: {self.accuracy_before:.3f}")
        bar = _progress(cfg.steps, self.step, enabled=cfg.progress and self.dist.is_main)
        while self.step < cfg.steps:
            started = time.time()
            rollout, rewards, metrics = self.rollout_and_score()
            advantages, adv_metrics = self.compute_advantages(rollout, rewards)
            rollout_seconds = time.time() - started
            update_metrics = self.update(rollout, advantages)
            self.step += 1
            metrics.update(adv_metrics, **update_metrics)
            metrics.update({"time/rollout_seconds": rollout_seconds, "time/step_seconds": time.time() - started})
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                metrics["eval/accuracy"] = self.evaluate()
            self.tracker.log(self.step, metrics)
            if self.step % cfg.log_every == 0 or self.step == 1 or self.step == cfg.steps:  # first, every log_every, last
                _write(bar, format_line(self.step, cfg.steps, metrics), self.echo if self.dist.is_main else None)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        accuracy_after = self.evaluate()
        self.tracker.log(self.step, {"eval/accuracy": accuracy_after})
        self.save()
        return self.finish(accuracy_after)

    def rollout_and_score(self) -> tuple[Rollout, Tensor, dict[str, float]]:
        """Sample and score one step's responses (this rank's share); DAPO dynamic sampling resamples.

        Each round draws ``prompts_per_step`` prompts from the stream (the same on
        every rank) and rank r rolls out prompts r, r + world, ... Group ids
        are global, so the estimator can pool groups from every rank.
        """
        cfg, dist = self.config, self.dist
        rounds = 1 + (cfg.max_resample_rounds if cfg.dynamic_sampling else 0)
        rollouts, rewards_list, metrics = [], [], {}
        kept_ids = torch.empty(0, dtype=torch.long)
        for round_ in range(rounds):
            problems = self.stream.take(cfg.prompts_per_step)
            global_ids = torch.arange(cfg.prompts_per_step) + round_ * cfg.prompts_per_step
            mine = list(range(dist.rank, cfg.prompts_per_step, dist.world))
            rollout = generate(
                self.model, self.tokenizer, [problems[i] for i in mine], global_ids[mine],
                group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                top_p=cfg.top_p, do_sample=True, chat_template=cfg.chat_template, batch_size=cfg.generation_batch_size,
                share_prompt_cache=cfg.share_prompt_cache,
            )
            rewards, keep, info = score(rollout, self.c.verifier)
            if round_ == 0:
                metrics.update(self._rollout_metrics(rollout, rewards, keep, info))
            rewards = rewards + self._overlong(rollout)
            rollout, rewards = rollout.select(torch.nonzero(keep).squeeze(1)), rewards[keep]
            rollouts.append(rollout)
            rewards_list.append(rewards)
            if not cfg.dynamic_sampling:
                break
            kept_ids = torch.cat([kept_ids, _mixed_groups(dist.all_gather_cat(rewards), dist.all_gather_cat(rollout.group_ids.cpu()))])
            if kept_ids.numel() >= cfg.prompts_per_step:
                break
        rollout, rewards = Rollout.concat(rollouts), torch.cat(rewards_list)
        if cfg.dynamic_sampling:
            metrics.update({"dapo/rounds": float(round_ + 1), "dapo/kept_groups": float(min(kept_ids.numel(), cfg.prompts_per_step))})
            if kept_ids.numel() > 0:  # train on the first prompts_per_step groups with differing rewards
                selected = torch.isin(rollout.group_ids.cpu(), kept_ids[: cfg.prompts_per_step])
                rollout, rewards = rollout.select(torch.nonzero(selected).squeeze(1)), rewards[selected]
        return rollout, rewards, metrics

    def _overlong(self, rollout: Rollout) -> Tensor:
        cfg = self.config
        if cfg.overlong_buffer == 0:
            return torch.zeros(len(rollout.texts), dtype=torch.float64)
        mask = rollout.completion_mask.bool()  # (B, T)
        completion = rollout.input_ids[:, rollout.prompt_length :]  # (B, T)
        stopped = (torch.isin(completion, torch.tensor([self.tokenizer.eos_token_id], device=completion.device)) & mask).any(1)
        lengths = mask.sum(1).cpu()  # (B,)
        return overlong_penalty(lengths, ~stopped.cpu(), max_new_tokens=cfg.max_new_tokens, buffer=cfg.overlong_buffer, penalty=cfg.overlong_penalty)

    def _rollout_metrics(self, rollout: Rollout, rewards: Tensor, keep: Tensor, info: dict[str, float]) -> dict[str, float]:
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

    def compute_advantages(self, rollout: Rollout, rewards: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Advantages of this rank's responses from the estimator run on the global batch.

        Rewards and group ids of every rank are gathered first, so the
        estimator sees the whole step (its statistics and state are then
        bit-identical on every rank), and each rank keeps its own slice.
        """
        dist = self.dist
        all_rewards = dist.all_gather_cat(rewards)  # (N_global,)
        all_ids = dist.all_gather_cat(rollout.group_ids.cpu())
        advantages, metrics = self.c.estimator(all_rewards, all_ids, training=True)
        offset = dist.local_offset(len(rewards))
        return advantages[offset : offset + len(rewards)].float().to(self.device), metrics

    def update(self, rollout: Rollout, advantages: Tensor) -> dict[str, float]:
        """PPO epochs x mini-batches of the policy loss; one AdamW step per mini-batch."""
        cfg, dist = self.config, self.dist
        mask = rollout.completion_mask.float()  # (B, T)
        rows = torch.arange(len(advantages))
        # Old log-probs are needed only when the policy moves before the last
        # mini-batch is seen; with one epoch and one mini-batch the policy *is*
        # the old policy, so the ratio's denominator is the detached log-prob
        # of the same forward pass (saves a forward).
        on_policy = cfg.ppo_epochs * cfg.mini_batches == 1
        old_logprobs = None if on_policy else self._logprobs(self.model, rollout, rows)
        ref_logprobs = self._logprobs(self.ref_model, rollout, rows, reference=True) if self.ref_model is not None else None
        sums: dict[str, float] = {}
        updates = 0
        from ebpo.losses import LossInputs

        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(rows)) if cfg.mini_batches > 1 else rows
            for mini in torch.tensor_split(order, cfg.mini_batches):
                num_tokens = dist.sum(float(mask[mini].sum()))
                num_seqs = dist.sum(float(len(mini)))
                for micro in length_chunks(rollout, mini, cfg.micro_batch_size, cfg.length_buckets):
                    if micro.numel() == 0:
                        continue  # this rank has nothing in this mini-batch; it still joins the gradient sum
                    logprobs = rows_logprobs(self.model, rollout, micro)
                    inputs = LossInputs(
                        logprobs=logprobs,
                        old_logprobs=logprobs.detach() if old_logprobs is None else old_logprobs[micro],
                        advantages=advantages[micro],
                        mask=mask[micro],
                        ref_logprobs=None if ref_logprobs is None else ref_logprobs[micro],
                    )
                    out = self.c.loss_fn(inputs, num_tokens=num_tokens, num_seqs=num_seqs)
                    out.loss.backward()
                    for key, value in out.metrics.items():
                        sums[key] = sums.get(key, 0.0) + float(value)
                    sums["loss/total"] = sums.get("loss/total", 0.0) + float(out.loss.detach())
                    updates += 1
                dist.sum_gradients(self.params)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
                sums["optim/grad_norm"] = sums.get("optim/grad_norm", 0.0) + float(grad_norm) * (1 if updates else 0)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        metrics = {k: v / max(updates, 1) for k, v in sums.items() if k != "optim/grad_norm"}
        metrics["optim/grad_norm"] = sums.get("optim/grad_norm", 0.0) / (cfg.ppo_epochs * cfg.mini_batches)
        metrics["optim/lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    @torch.no_grad()
    def _logprobs(self, model: Any, rollout: Rollout, rows: Tensor, *, reference: bool = False) -> Tensor:
        """Detached log-probs of ``rows``; ``reference`` under LoRA: the same model with its adapters disabled.

        (The flag, not ``model is self.ref_model``: with LoRA both are the same object, and the old
        log-probs of PPO epochs must keep the adapters on.)
        """
        out = torch.zeros(rollout.completion_mask.shape, dtype=torch.float32, device=self.device)
        with model.disable_adapter() if self.lora and reference else contextlib.nullcontext():
            for micro in length_chunks(rollout, rows, self.config.micro_batch_size, self.config.length_buckets):
                if micro.numel() > 0:
                    out[micro] = rows_logprobs(model, rollout, micro).float()
        return out[rows]

    @torch.no_grad()
    def evaluate(self) -> float:
        """Held-out accuracy: greedy, or avg@k with ``eval_samples`` samples (under a fixed seed).

        Uses :func:`ebpo.evaluate.sample_correctness`, the function ``ebpo eval``
        uses, so ``ebpo eval`` on a checkpoint reproduces this number.
        """
        from ebpo.evaluate import EVAL_SEED_OFFSET, sample_correctness

        cfg, dist = self.config, self.dist
        problems = list(self.c.task.eval_problems())
        if cfg.max_eval_problems:
            problems = problems[: cfg.max_eval_problems]
        rewards, _ = sample_correctness(
            self.model, self.tokenizer, problems[dist.rank :: dist.world], self.c.verifier,
            samples=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            chat_template=cfg.chat_template, generation_batch_size=cfg.generation_batch_size,
            seed=cfg.seed + EVAL_SEED_OFFSET * (dist.rank + 1),
        )
        scored = ~torch.isnan(rewards)
        # (P,) per-problem mean reward (NaN where every sample was skipped), gathered in rank order.
        self.last_eval_scores = dist.all_gather_cat(torch.nanmean(rewards, dim=1).to(self.device)).cpu()
        return dist.sum(float(rewards[scored].sum())) / max(dist.sum(float(scored.sum())), 1.0)

    # ---------------------------------------------------------------- checkpoint and summary
    def save(self) -> None:
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "estimator": self.c.estimator.state_dict(),
            "stream": self.stream.state_dict(),
            "accuracy_before": self.accuracy_before,
            "elapsed_seconds": self.elapsed_before + time.time() - self.start_time,
            "init_model": self.init_path,
        }
        ckpt.save_checkpoint(self.run_dir, self.step, model=self.model, tokenizer=self.tokenizer, trainer_state=state, dist=self.dist, keep=self.config.keep_checkpoints)

    def finish(self, accuracy_after: float) -> dict[str, Any]:
        eval_problems = len(self.c.task.eval_problems()) if not self.config.max_eval_problems else min(self.config.max_eval_problems, len(self.c.task.eval_problems()))
        samples = max(self.config.eval_samples, 1)
        gain_se, gain_se_kind = accuracy_change_se(
            self.scores_before, self.last_eval_scores, accuracy_before=self.accuracy_before or 0.0,
            accuracy_after=accuracy_after, samples=eval_problems * samples,
        )  # fmt: skip
        summary = {
            "method": self.config.method,
            "task": self.config.task,
            "seed": self.config.seed,
            "steps": self.step,
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
            "estimator_state": _plain(self.c.estimator.state_dict()),
        }
        self.tracker.close()
        if self.dist.is_main:
            import json

            with open(os.path.join(self.run_dir, "summary.json"), "w") as handle:
                json.dump(summary, handle, indent=2)
            plot_curves(
                os.path.join(self.run_dir, "metrics.jsonl"), os.path.join(self.run_dir, "learning_curve.png"),
                f"{self.config.method} on {self.config.task}", accuracy_before=self.accuracy_before,
            )  # fmt: skip
        return summary


def _mixed_groups(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Sorted ids of the groups whose rewards are not all equal (DAPO dynamic sampling), int64."""
    ids, inverse = torch.unique(group_ids, return_inverse=True)
    low = torch.full((len(ids),), float("inf"), dtype=torch.float64).scatter_reduce(0, inverse, rewards, "amin")
    high = torch.full((len(ids),), float("-inf"), dtype=torch.float64).scatter_reduce(0, inverse, rewards, "amax")
    return ids[high > low]


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

