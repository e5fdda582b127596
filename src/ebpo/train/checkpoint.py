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

Saving is atomic at every instant. Everything goes into ``.step-000050.tmp``
first; every file and folder in it is flushed to disk (``fsync``) and only then
is it renamed into place. A re-save of the same step (a resumed run that was
already finished saves its last step again) renames the old copy to
``.step-000050.old`` first, renames the new one into place and deletes the old
copy last, so at every instant one complete copy exists under one of these
names. Older checkpoints beyond ``keep`` are deleted only after the new one is
in place. A save that fails (a full disk) removes its temporary folder and
raises :class:`CheckpointWriteError`, whose one-line message names the path,
the free space and the last complete checkpoint.

:func:`resumable_checkpoint` (reads only) finds the newest *complete*
checkpoint, trying the step folders newest first and, for a step whose folder
is missing or broken, the ``.old`` copy of an interrupted re-save and a
complete ``.tmp`` of a save killed just before its rename; it returns what it
skipped and why. :func:`settle_checkpoints` (under the run lock) puts that
checkpoint in place as ``step-N``, moves newer broken ones aside to
``step-N.corrupt`` (out of pruning's way, kept for the user) and removes the
temporaries an interrupted save left. It removes only names this module
creates (``.step-NNNNNN.tmp`` and ``.step-NNNNNN.old``).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ebpo.fileio import fsync_dir, fsync_tree, load_tensors, step_dirs, write_failure
from ebpo.train.distributed import Dist

__all__ = [
    "FORMAT",
    "CheckpointWriteError",
    "rng_state",
    "set_rng_state",
    "save_checkpoint",
    "load_trainer_state",
    "check_checkpoint",
    "check_checkpoint_dir",
    "resumable_checkpoint",
    "settle_checkpoints",
]

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


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota, an I/O error); the message is one line."""


# Names this module creates in ``checkpoints/`` (and so the only ones it ever removes).
_TMP = re.compile(r"^\.step-(\d+)\.tmp$")
_OLD = re.compile(r"^\.step-(\d+)\.old$")
_FINAL = re.compile(r"^step-(\d+)$")
# Errors a failed write raises: OSError (ENOSPC, EDQUOT, EIO), torch's zip writer (RuntimeError
# "unexpected pos" on a full disk) and safetensors' own error type, matched by name (no import needed).
_WRITE_ERRORS = (OSError, RuntimeError)


def _is_write_error(exc: BaseException) -> bool:
    return isinstance(exc, _WRITE_ERRORS) or type(exc).__name__ == "SafetensorError"


def _name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(
    run_dir: str,
    step: int,
    *,
    model: Any,
    tokenizer: Any,
    trainer_state: dict[str, Any],
    dist: Dist,
    keep: int,
    model_state: dict[str, Any] | None = None,
) -> str:
    """Write checkpoint ``step`` atomically (every rank calls this); returns its path.

    ``model_state``: the policy's whole state dict when ``model``'s own is not whole (FSDP shards it;
    :meth:`Dist.full_state_dict` gathers it), ``None`` to save ``model`` as it is.

    Raises :class:`CheckpointWriteError` on every rank when any rank's write fails; the temporary folder
    is removed and the checkpoints already on disk are untouched.
    """
    root = os.path.join(run_dir, "checkpoints")
    name = _name(step)
    final, tmp = os.path.join(root, name), os.path.join(root, f".{name}.tmp")
    error: BaseException | None = None
    if dist.is_main:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # an earlier attempt at this step, killed part-way
            os.makedirs(tmp)
        except OSError as exc:
            error = exc
    dist.barrier()
    where = os.path.join(tmp, f"rng-rank{dist.rank}.pt")
    if error is None and os.path.isdir(tmp):
        try:
            torch.save(rng_state(), where)
        except BaseException as exc:
            if not _is_write_error(exc):
                raise
            error = exc
    _raise_if_any_failed(error, where, root, tmp, dist)
    if dist.is_main:
        try:
            where = os.path.join(tmp, "model")
            _save_model(model, where, model_state)
            tokenizer.save_pretrained(where)
            where = os.path.join(tmp, "trainer_state.pt")
            torch.save({**trainer_state, "world": dist.world, "format": FORMAT}, where)
            where = tmp
            fsync_tree(tmp)  # on disk before it is renamed into place
            _move_into_place(tmp, final, root)
            for old in step_dirs(root)[:-keep]:  # only once the new checkpoint is in place
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        except BaseException as exc:
            if not _is_write_error(exc):
                raise
            error = exc
    _raise_if_any_failed(error, where, root, tmp, dist)
    return final


def _save_model(model: Any, where: str, model_state: dict[str, Any] | None) -> None:
    """``save_pretrained``, from ``model_state`` when given (FSDP: the gathered weights).

    A LoRA policy under FSDP writes its adapter here rather than through peft: peft picks a state dict's
    adapter entries by the names of the model's modules, which FSDP's wrappers have changed
    (``..._fsdp_wrapped_module...``), so the gathered state dict (whose keys FSDP has cleaned) matches none
    and peft writes an empty adapter. The file is peft's own format: the adapter's config, and its weights
    under their state-dict names without the adapter's name (as ``PeftModel.from_pretrained`` reads them).
    """
    if model_state is None:
        model.save_pretrained(where)
    elif hasattr(model, "peft_config"):
        from safetensors.torch import save_file

        name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapters[0]
        marker = f".{name}."
        adapter = {
            key.replace(marker, ".", 1): value.detach().cpu().contiguous()
            for key, value in model_state.items()
            if marker in key or key.endswith(f".{name}")
        }
        adapter = {key.removesuffix(f".{name}"): value for key, value in adapter.items()}
        if not adapter:
            raise ValueError(f"the gathered state dict holds no weights of the LoRA adapter {name!r}")
        os.makedirs(where, exist_ok=True)
        model.peft_config[name].save_pretrained(where)
        save_file(adapter, os.path.join(where, "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        model.save_pretrained(where, state_dict=model_state)


def _move_into_place(tmp: str, final: str, root: str) -> None:
    """Rename the complete ``tmp`` to ``final``; an existing ``final`` is set aside first and deleted last."""
    if not os.path.exists(final):
        os.rename(tmp, final)
        fsync_dir(root)
        return
    old = os.path.join(root, f".{os.path.basename(final)}.old")
    shutil.rmtree(old, ignore_errors=True)  # left by an earlier re-save that finished its swap
    os.rename(final, old)  # from here until the next rename, .old and .tmp are both complete copies
    os.rename(tmp, final)
    fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)  # what is left of it, settle_checkpoints removes at the next resume


def _raise_if_any_failed(error: BaseException | None, where: str, root: str, tmp: str, dist: Dist) -> None:
    """Agree across ranks whether a write failed; if one did, remove ``tmp`` and raise on every rank."""
    failed = dist.max(0.0 if error is None else 1.0) > 0
    if not failed:
        return
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves no temporary folder taking space
    dist.barrier()
    done = step_dirs(root)
    last = os.path.join(root, done[-1]) if done else "none (the run has not saved one yet)"
    what = write_failure(where, error) if error is not None else "another process of the run failed to write it"
    raise CheckpointWriteError(f"checkpoint not saved: {what}; the last complete checkpoint is {last}")


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


def check_checkpoint_dir(path: str, world: int | None = None) -> dict[str, Any]:
    """Read everything a resume loads from the checkpoint at ``path``; ValueError naming the first problem.

    Reads the trainer state, every rank's RNG state (``world`` ranks; None: as many as the state says),
    the model's ``config.json`` and the header of every ``*.safetensors`` file (which covers truncation:
    safetensors checks the data length against the header). Writes nothing. Returns the trainer state.
    """
    from ebpo.models.loading import check_model_dir

    state = _load(os.path.join(path, "trainer_state.pt"), "checkpoint state", _TRAINER_KEYS)
    written_by = state.get("world", 1)
    if world is not None and written_by != world:
        raise ValueError(
            f"checkpoint {path} was written by {written_by} processes; resume it with the same number, not {world}"
        )
    for rank in range(written_by if world is None else world):
        _load(os.path.join(path, f"rng-rank{rank}.pt"), "checkpoint RNG state", ("python", "numpy", "torch"))
    check_model_dir(os.path.join(path, "model"), what=f"checkpoint {path}")
    return state


def _candidates(root: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every copy a resume may use, newest step first; for one step: the step folder,
    then the ``.old`` copy of an interrupted re-save, then the ``.tmp`` of a save killed before its rename."""
    if not os.path.isdir(root):
        return []
    found = []
    for entry in os.listdir(root):
        for rank, pattern in enumerate((_FINAL, _OLD, _TMP)):
            match = pattern.match(entry)
            if match:
                found.append((int(match.group(1)), rank, os.path.join(root, entry)))
    return [(step, path) for step, _, path in sorted(found, key=lambda f: (-f[0], f[1]))]


def resumable_checkpoint(run_dir: str, world: int) -> tuple[str, list[str]]:
    """The newest complete checkpoint of ``run_dir`` and one note per newer copy it skipped; reads only.

    ValueError when there is none: the one broken checkpoint's own message, or every skipped one's.
    """
    root = os.path.join(run_dir, "checkpoints")
    skipped: list[str] = []
    candidates = _candidates(root)
    for _, path in candidates:
        try:
            check_checkpoint_dir(path, world)
        except ValueError as exc:
            if "processes; resume it with the same number" in str(exc):
                raise  # the checkpoint is fine; the launch is not
            skipped.append(f"{os.path.basename(path)} ({exc})" if len(candidates) > 1 else str(exc))
            continue
        return path, skipped
    if not candidates:
        raise ValueError(
            f"--resume {run_dir}: no checkpoint in {root} (the run stopped before its first checkpoint; start it again)"
        )
    if len(skipped) == 1:
        raise ValueError(skipped[0])
    raise ValueError(f"--resume {run_dir}: no complete checkpoint in {root}: " + "; ".join(skipped))


def check_checkpoint(run_dir: str, world: int) -> str:
    """The checkpoint a resume of ``run_dir`` would use (see :func:`resumable_checkpoint`); writes nothing."""
    return resumable_checkpoint(run_dir, world)[0]


def settle_checkpoints(run_dir: str, world: int, echo: Callable[[str], None] = print) -> str:
    """Under the run lock: the newest complete checkpoint in place as ``checkpoints/step-N``; returns its path.

    Newer step folders (broken, or they would have been chosen) are renamed to ``step-M.corrupt``
    (``.corrupt-2``, ... when taken): kept for the user, out of pruning's way (pruning would otherwise keep
    a broken newest checkpoint and delete the good one). A complete ``.old`` or ``.tmp`` copy is renamed
    into place; every other ``.step-M.tmp`` / ``.step-M.old`` (what an interrupted save leaves) is removed.
    One warning line per step folder set aside, naming why.
    """
    root = os.path.join(run_dir, "checkpoints")
    path, skipped = resumable_checkpoint(run_dir, world)
    reasons = {note.split(" ", 1)[0]: note.split(" ", 1)[1] if " " in note else "" for note in skipped}
    chosen = os.path.basename(path)
    step = int(re.search(r"(\d+)", chosen).group(1))  # type: ignore[union-attr]
    final = os.path.join(root, _name(step))
    for name in step_dirs(root):
        if int(name.split("-")[1]) > step or (name == _name(step) and path != final):
            aside, count = os.path.join(root, f"{name}.corrupt"), 1
            while os.path.exists(aside):
                count += 1
                aside = os.path.join(root, f"{name}.corrupt-{count}")
            os.rename(os.path.join(root, name), aside)
            why = reasons.get(name, "(not complete)")[:300]
            echo(
                f"warning: skipped checkpoint {name} {why}; moved it aside to {os.path.basename(aside)}, "
                f"resuming from {_name(step)}"
            )
    if path != final:
        os.rename(path, final)
        echo(f"warning: checkpoint {_name(step)} was found complete as {chosen} (an interrupted save); restored it")
    for entry in os.listdir(root):
        if _TMP.match(entry) or _OLD.match(entry):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    fsync_dir(root)
    return final
