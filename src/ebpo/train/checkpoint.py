"""Checkpoints: written atomically, restored exactly.

Layout of ``<run>/checkpoints/step-000050/``::

    model/              save_pretrained (weights + config) and the tokenizer
    trainer_state.pt    step, optimiser, LR scheduler, estimator state,
                        data-stream position, accuracy before RL
    rng-rank0.pt        python, numpy and torch (and CUDA) RNG states, one file per rank

Every ``.pt`` file holds tensors and plain values only (the python and numpy
RNG states are stored as integer tensors), so resuming reads them with
``torch.load(weights_only=True)`` (:func:`ebpo.fileio.load_tensors`) and a
crafted checkpoint cannot run code. Both files carry ``format``
(:data:`FORMAT`); a checkpoint without it was written by an older ebpo, with
numpy arrays inside, and is refused with an error that says so.
:func:`check_checkpoint` reads everything a resume needs, so that a missing,
corrupt or truncated checkpoint is reported before anything is written.

Everything goes into ``.step-000050.tmp`` first and is renamed into place
only when complete, so a run killed mid-write leaves the previous checkpoint
intact and never a half-written one. Older checkpoints beyond ``keep`` are
deleted afterwards.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any

import numpy as np
import torch

from ebpo.fileio import latest_checkpoint, load_tensors, step_dirs
from ebpo.train.distributed import Dist

__all__ = ["FORMAT", "rng_state", "set_rng_state", "save_checkpoint", "load_trainer_state", "check_checkpoint"]

FORMAT = 2
"""Checkpoint format: 2 = tensors and plain values only (loadable with weights_only=True)."""

_TRAINER_KEYS = ("step", "optimizer", "scheduler", "estimator", "stream", "accuracy_before", "elapsed_seconds")


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain values (nothing that needs unpickling)."""
    version, words, gauss = random.getstate()
    bit_generator, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "format": FORMAT,
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "bit_generator": bit_generator,
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(w) for w in py["words"].tolist()), py["gauss"]))
    key = npy["key"].numpy().astype(np.uint32)
    np.random.set_state((npy["bit_generator"], key, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str, step: int, *, model: Any, tokenizer: Any, trainer_state: dict[str, Any], dist: Dist, keep: int
) -> str:
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
        torch.save({**trainer_state, "world": dist.world, "format": FORMAT}, os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(final, ignore_errors=True)  # only when re-saving the same step (e.g. the final one)
        os.rename(tmp, final)
        for old in step_dirs(root)[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    return final


def _load(path: str, what: str, keys: tuple[str, ...]) -> dict[str, Any]:
    state = load_tensors(path, what=what)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(
            f"{what} {path} was written by an older ebpo (checkpoint format {state.get('format', 1) if isinstance(state, dict) else '?'}, this ebpo reads {FORMAT}); it cannot be resumed, start a new run"
        )
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{what} {path} is incomplete: it has no {missing}")
    return state


def load_trainer_state(path: str, dist: Dist) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(trainer_state, this rank's RNG state)`` of the checkpoint at ``path``, read without unpickling."""
    state = _load(os.path.join(path, "trainer_state.pt"), "checkpoint state", _TRAINER_KEYS)
    if state.get("world", 1) != dist.world:
        raise ValueError(
            f"checkpoint {path} was written by {state.get('world')} processes; resume it with the same number, not {dist.world}"
        )
    rng = _load(os.path.join(path, f"rng-rank{dist.rank}.pt"), "checkpoint RNG state", ("python", "numpy", "torch"))
    return state, rng


def check_checkpoint(run_dir: str, world: int) -> str:
    """The latest checkpoint of ``run_dir``, after reading everything a resume loads; ValueError if anything is wrong.

    Reads the trainer state, every rank's RNG state, the model's ``config.json`` and the header of every
    ``*.safetensors`` file (which covers truncation: safetensors checks the data length against the header).
    Writes nothing.
    """
    path = latest_checkpoint(run_dir)
    if path is None:
        raise ValueError(
            f"--resume {run_dir}: no checkpoint in {os.path.join(run_dir, 'checkpoints')} (the run stopped before its first checkpoint; start it again)"
        )
    state = _load(os.path.join(path, "trainer_state.pt"), "checkpoint state", _TRAINER_KEYS)
    if state.get("world", 1) != world:
        raise ValueError(
            f"checkpoint {path} was written by {state.get('world')} processes; resume it with the same number, not {world}"
        )
    for rank in range(world):
        _load(os.path.join(path, f"rng-rank{rank}.pt"), "checkpoint RNG state", ("python", "numpy", "torch"))
    model_dir = os.path.join(path, "model")
    configs = [name for name in ("config.json", "adapter_config.json") if os.path.isfile(os.path.join(model_dir, name))]
    weights = (
        sorted(name for name in os.listdir(model_dir) if name.endswith(".safetensors"))
        if os.path.isdir(model_dir)
        else []
    )
    if not configs or not weights:
        raise ValueError(
            f"checkpoint {path} has no model (config and *.safetensors weights in {model_dir}); it is incomplete"
        )
    from safetensors import safe_open

    for name in configs:
        try:
            with open(os.path.join(model_dir, name)) as handle:
                json.load(handle)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"checkpoint model config {os.path.join(model_dir, name)} is corrupt or truncated ({exc})"
            ) from None
    for name in weights:
        try:
            with safe_open(os.path.join(model_dir, name), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for every malformed file
            raise ValueError(
                f"checkpoint weights {os.path.join(model_dir, name)} are corrupt or truncated ({exc})"
            ) from None
    return path
