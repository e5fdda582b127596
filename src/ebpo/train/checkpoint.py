"""Checkpoints: written atomically, restored exactly.

Layout of ``<run>/checkpoints/step-000050/``::

    model/              save_pretrained (weights + config) and the tokenizer
    trainer_state.pt    step, optimiser, LR scheduler, estimator state,
                        data-stream position, accuracy before RL
    rng-rank0.pt        python, numpy and torch (and CUDA) RNG states, one file per rank

Everything goes into ``.step-000050.tmp`` first and is renamed into place
only when complete, so a run killed mid-write leaves the previous checkpoint
intact and never a half-written one. Older checkpoints beyond ``keep`` are
deleted afterwards.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch

from ebpo.train.distributed import Dist

__all__ = ["rng_state", "set_rng_state", "save_checkpoint", "latest_checkpoint", "load_trainer_state"]

_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str, step: int, *, model: Any, tokenizer: Any, trainer_state: dict[str, Any], dist: Dist, keep: int) -> str:
    """Write checkpoint ``step`` atomically (every rank calls this); returns its path."""
    root = os.path.join(run_dir, "checkpoints")
    name = f"step-{step:06d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".{name}.tmp")
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng-rank{dist.rank}.pt"))
    dist.barrier()
    if dist.is_main:
        model.save_pretrained(os.path.join(tmp, "model"))
        tokenizer.save_pretrained(os.path.join(tmp, "model"))
        torch.save({**trainer_state, "world": dist.world}, os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(final, ignore_errors=True)  # only when re-saving the same step (e.g. the final one)
        os.rename(tmp, final)
        for old in _step_dirs(root)[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    return final


def _step_dirs(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if _STEP_DIR.match(d))


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint of ``run_dir`` (temporary directories are ignored)."""
    dirs = _step_dirs(os.path.join(run_dir, "checkpoints"))
    return os.path.join(run_dir, "checkpoints", dirs[-1]) if dirs else None


def load_trainer_state(path: str, dist: Dist) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(trainer_state, this rank's RNG state)`` of the checkpoint at ``path``."""
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    if state.get("world", 1) != dist.world:
        raise ValueError(f"checkpoint {path} was written by {state.get('world')} processes; resume it with the same number, not {dist.world}")
    rng = torch.load(os.path.join(path, f"rng-rank{dist.rank}.pt"), weights_only=False)
    return state, rng
