"""Warm start: a short supervised phase so the built-in tiny model starts RL at a modest accuracy.

RL with verifiable rewards needs a policy that is sometimes right: a freshly
initialised model never is, so every group is all-zero and no estimator has
a signal. The warm start teaches the answer format and some arithmetic by
teacher forcing on (prompt, ``Problem.completion_target``, EOS) of the
task's training problems, for few enough steps that plenty is left for RL
to learn. Problems with an empty target (nothing to teach: reasoning-gym
datasets that store no reference answer) and problems whose prompt + target
+ EOS is longer than the model's
positions (``max_position_embeddings``, 64 for the built-in model) are left
out of the warm start (a log line says how many); when none fits it raises
ValueError rather than train on sequences the model was not built for.

The result is cached under ``$EBPO_CACHE_DIR/warmstart/<hash>`` (default
``~/.cache/ebpo``), keyed by everything that determines it, the torch and
transformers versions included (their kernels and initialisation change the
trained weights), and written atomically (temporary directory, then
rename), so runs with other RL seeds or methods reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel

from ebpo.models.loading import TinyLlamaSpec
from ebpo.tasks.base import Problem

__all__ = [
    "cache_dir",
    "warmstart_key",
    "supervised_batch",
    "fitting_problems",
    "train_supervised",
    "cached_warmstart",
    "library_versions",
]

# Bump when the warm-start procedure changes, to invalidate old caches.
# 2: problems longer than the model's positions are left out; torch/transformers versions in the key.
_VERSION = 2


def library_versions() -> dict[str, str]:
    """Versions of the libraries the trained weights depend on (part of the cache key and of run summaries)."""
    return {"torch": torch.__version__, "transformers": transformers.__version__}


def cache_dir() -> str:
    """Root of ebpo's caches: ``$EBPO_CACHE_DIR``, else ``~/.cache/ebpo``."""
    return os.environ.get("EBPO_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ebpo")


def warmstart_key(settings: dict[str, Any]) -> str:
    payload = json.dumps({"version": _VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def supervised_batch(problems: Sequence[Problem], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)`` (B, L); labels are -100 on the prompt."""
    prompts = tokenizer([p.prompt for p in problems])["input_ids"]
    answers = tokenizer([p.completion_target for p in problems], add_special_tokens=False)["input_ids"]
    rows = [prompt + answer + [tokenizer.eos_token_id] for prompt, answer in zip(prompts, answers)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, prompt) in enumerate(zip(rows, prompts)):  # building ragged token lists is per example
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, len(prompt) : len(row)] = torch.tensor(row[len(prompt) :])
    attention_mask = (torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long()
    return input_ids, attention_mask, labels


def fitting_problems(problems: Sequence[Problem], tokenizer: Any, max_positions: int) -> list[Problem]:
    """The problems with a non-empty target whose prompt + target + EOS fits in ``max_positions`` tokens.

    Raises ValueError when none does (e.g. reasoning-gym's ``leg_counting``
    prompts on the 64-position built-in model).
    """
    problems = [p for p in problems if p.completion_target]
    if not problems:
        raise ValueError("warm start: no training problem has a target to teach; pass --warmstart-steps 0")
    prompts = tokenizer([p.prompt for p in problems])["input_ids"]
    targets = tokenizer([p.completion_target for p in problems], add_special_tokens=False)["input_ids"]
    lengths = [len(prompt) + len(target) + 1 for prompt, target in zip(prompts, targets)]
    kept = [problem for problem, length in zip(problems, lengths) if length <= max_positions]
    if not kept:
        raise ValueError(
            f"warm start: no training problem fits the model's {max_positions} positions (prompt + target + EOS: "
            f"{min(lengths)} to {max(lengths)} tokens); pass --warmstart-steps 0, or choose task options with shorter problems"
        )
    return kept


def train_supervised(
    model: PreTrainedModel,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    log: Any = None,
    log_every: int = 0,
) -> list[float]:
    """Teacher-forced cross-entropy on the targets; linear warm-up then linear decay. Returns the losses.

    With ``log``, one progress line (step, mean loss since the last line,
    seconds) every ``log_every`` steps and at the last step.
    """
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1.0 - s / steps)
    )
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    started = time.time()
    for step in range(1, steps + 1):
        batch = [problems[rng.randrange(len(problems))] for _ in range(batch_size)]
        input_ids, attention_mask, labels = (t.to(device) for t in supervised_batch(batch, tokenizer))
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(float(loss.detach()))
        if log is not None and log_every and (step % log_every == 0 or step == steps):
            recent = losses[-((step - 1) % log_every + 1) :]  # the steps since the previous line
            log(
                f"warm start: step {step:>{len(str(steps))}}/{steps} | loss {sum(recent) / len(recent):.3f} | {time.time() - started:.0f} s"
            )
    return losses


def train_data_id(task: str, problems: Sequence[Problem]) -> dict[str, Any]:
    """What the warm start depends on from the task: its name and the content of its training problems.

    Not the task options: two runs whose options differ only in their
    evaluation split (``ebpo meta``'s validation members and the final runs)
    train on the same problems and so share one cached warm start.
    """
    digest = hashlib.sha256()
    for problem in problems:
        digest.update(f"{problem.prompt}\x1f{problem.completion_target}\x1e".encode())
    return {"task": task, "train_problems": len(problems), "train_sha256": digest.hexdigest()}


def cached_warmstart(
    model: PreTrainedModel,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    spec: TinyLlamaSpec,
    task_id: dict[str, Any],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    log: Any = print,
) -> tuple[PreTrainedModel, str]:
    """Load the cached warm start for these settings, or train it and cache it. Returns (model, cache path)."""
    settings = {
        "spec": asdict(spec),
        "alphabet": getattr(tokenizer, "alphabet", None),
        "task": task_id,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "versions": library_versions(),
    }
    path = os.path.join(cache_dir(), "warmstart", warmstart_key(settings))
    if os.path.isfile(os.path.join(path, "warmstart.json")):
        log(f"warm start: reusing {path}")
        loaded = type(model).from_pretrained(path).to(next(model.parameters()).device)
        return loaded, path
    fitting = fitting_problems(problems, tokenizer, model.config.max_position_embeddings)
    if len(fitting) < len(problems):
        log(
            f"warm start: {len(problems) - len(fitting)} of {len(problems)} training problems are longer than the model's {model.config.max_position_embeddings} positions; left out"
        )
    log(f"warm start: {steps} supervised steps on {len(fitting)} problems (cached afterwards in {path})")
    with torch.random.fork_rng(devices=[]):  # the warm start must not move the run's RNG stream
        torch.manual_seed(seed)
        losses = train_supervised(
            model,
            tokenizer,
            fitting,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            log=log,
            log_every=max(1, steps // 6),
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(path))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "warmstart.json"), "w") as handle:
        json.dump({**settings, "final_loss": losses[-1] if losses else None}, handle, indent=1, default=str)
    try:
        os.rename(tmp, path)
    except OSError:  # another process cached the same settings first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return model, path
