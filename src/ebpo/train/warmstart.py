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

The warm starts of the testbed's measured runs ship with the package
(``warmstart_data/<name>/``: ``model.safetensors`` and ``warmstart.json``,
made by ``python -m ebpo.train.warmstart --ship`` under the versions of
``requirements/lock.txt``): ``default``, the warm start of ``ebpo train``'s
default run (and of ``ebpo compare``'s default grid), because it is most of a
first run's time; and ``pool-2000``, that of ``ebpo compare --pool 2000``
(``ebpo train --task-options '{num_train: 2000}'``), because a fresh warm
start's last bits come from the CPU's BLAS kernels and 1,000 steps of training
turn them into a different model: the figures measured from a pool start
trained on one machine did not hold from another machine's start
(docs/allocation.md). :data:`SHIPPED_RUNS` lists them, each as the ``ebpo
train`` flags that select it. On a cache miss whose key is exactly a shipped
one (the same settings, training problems, torch and transformers versions and
``_VERSION``; nothing else is compared), :func:`cached_warmstart` loads those
weights instead of training and writes them to the cache like a trained warm
start; any other key trains as before. Copying into the cache rather than
loading from the package keeps the run's starting path (recorded in
checkpoints, LoRA adapters' base, the difficulty curriculum's cache key) the
same cache directory whether the weights were shipped or trained, and
independent of where, or whether, the package is installed later. The weights
are loaded with safetensors (no pickle), after checking their sha256 against
``warmstart.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_model, save_model
from transformers import PreTrainedModel

from ebpo.models.loading import BUILTIN_PREFIX, TinyLlamaSpec, builtin_spec, load_policy
from ebpo.tasks.base import Problem

__all__ = [
    "cache_dir",
    "warmstart_key",
    "supervised_batch",
    "fitting_problems",
    "train_supervised",
    "cached_warmstart",
    "library_versions",
    "start_identity",
    "warmstart_settings",
    "shipped_warmstart",
    "run_warmstart",
    "default_warmstart",
    "ship",
    "SHIPPED_DIR",
    "SHIPPED_RUNS",
    "SHIP_COMMAND",
]

# Bump when the warm-start procedure changes, to invalidate old caches.
# 2: problems longer than the model's positions are left out; torch/transformers versions in the key.
_VERSION = 2

# The shipped warm starts (package data, see the module docstring): one folder per entry of SHIPPED_RUNS.
SHIPPED_DIR = Path(__file__).with_name("warmstart_data")
SHIP_COMMAND = "python -m ebpo.train.warmstart --ship"
SHIPPED_RUNS: dict[str, tuple[str, ...]] = {
    "default": (),
    "pool-2000": ("--task-options", "{num_train: 2000}"),
}
"""The warm starts that ship, by folder name: the ``ebpo train`` flags of a run that warm-starts from each (the
other settings are the defaults). ``default`` is ``ebpo train``'s default run and ``ebpo compare``'s default grid;
``pool-2000`` is ``ebpo compare --pool 2000``'s runs (the flags compare gives them)."""
_SHIPPED_WEIGHTS = "model.safetensors"
_SHIPPED_RECORD = "warmstart.json"


def library_versions() -> dict[str, str]:
    """Versions of the libraries the trained weights depend on (part of the cache key and of run summaries)."""
    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`); "" when unknown."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def start_identity(path: str) -> dict[str, Any]:
    """What a run started from: the sha256 of ``path``'s ``model.safetensors`` (None when ``path`` is not a local
    model directory with that file, such as a hub id) and the CPU model.

    The built-in model's warm start is trained on the machine that first needs it and cached, and the BLAS kernels
    decide its last bits (on one machine it is the same in every process; MKL's reproducible mode,
    ``MKL_CBWR=COMPATIBLE``, alone trains a different one), which 1,000 steps of training turn into a different
    model. Run summaries record the start, and ``ebpo compare`` names the starts its runs share, so absolute
    accuracies are compared only between runs with the same start; differences paired by seed within one
    comparison share it by construction.
    """
    weights = os.path.join(path, "model.safetensors")
    digest = _file_sha256(weights) if os.path.isfile(weights) else None
    return {"weights_sha256": digest, "cpu": _cpu_model()}


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


def warmstart_settings(
    tokenizer: Any,
    *,
    spec: TinyLlamaSpec,
    task_id: dict[str, Any],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    """Everything the warm-started weights depend on; :func:`warmstart_key` hashes it (with ``_VERSION``)."""
    return {
        "spec": asdict(spec),
        "alphabet": getattr(tokenizer, "alphabet", None),
        "task": task_id,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "versions": library_versions(),
    }


def shipped_warmstart(key: str, *, log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]] | None:
    """The shipped weights file and its record whose key is exactly ``key``; else None.

    Each folder under :data:`SHIPPED_DIR` with a ``warmstart.json`` is one
    shipped warm start. The key is the only thing trusted: it hashes the
    settings, the training problems and the library versions. A shipped file
    that does not match its record's sha256 (a damaged install) is not used; a
    log line says so.
    """
    if not SHIPPED_DIR.is_dir():
        return None
    for folder in sorted(p for p in SHIPPED_DIR.iterdir() if p.is_dir()):
        record_path = folder / _SHIPPED_RECORD
        if not record_path.is_file():
            continue
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError) as exc:
            log(f"warning: the shipped warm start's record {record_path} is unreadable ({exc}); skipped")
            continue
        if not isinstance(record, dict) or record.get("key") != key:
            continue
        weights = folder / _SHIPPED_WEIGHTS
        try:
            digest = _file_sha256(weights)
        except OSError as exc:
            log(f"warning: the shipped warm start {weights} is unreadable ({exc}); training the warm start")
            return None
        if digest != record.get("sha256"):
            log(
                f"warning: the shipped warm start {weights} does not match its sha256 in {record_path}; training the warm start"
            )
            return None
        return weights, record
    return None


def _train_warmstart(
    model: PreTrainedModel,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    destination: str,
    log: Callable[[str], None],
) -> list[float]:
    """Train ``model`` in place on the problems that fit it, outside the caller's RNG stream; returns the losses."""
    fitting = fitting_problems(problems, tokenizer, model.config.max_position_embeddings)
    if len(fitting) < len(problems):
        log(
            f"warm start: {len(problems) - len(fitting)} of {len(problems)} training problems are longer than the model's {model.config.max_position_embeddings} positions; left out"
        )
    log(f"warm start: {steps} supervised steps on {len(fitting)} problems ({destination})")
    with torch.random.fork_rng(devices=[]):  # the warm start must not move the run's RNG stream
        torch.manual_seed(seed)
        return train_supervised(
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


def _write_cache(model: PreTrainedModel, tokenizer: Any, record: dict[str, Any], path: str) -> None:
    """Save the warm-started model and its record under ``path`` atomically (temporary directory, then rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(path))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "warmstart.json"), "w") as handle:
        json.dump(record, handle, indent=1, default=str)
    try:
        os.rename(tmp, path)
    except OSError:  # another process cached the same settings first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


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
    """Load the cached warm start for these settings, else the shipped one when its key matches, else train it;
    cache it. Returns (model, cache path)."""
    settings = warmstart_settings(
        tokenizer, spec=spec, task_id=task_id, steps=steps, lr=lr, batch_size=batch_size, seed=seed
    )
    key = warmstart_key(settings)
    path = os.path.join(cache_dir(), "warmstart", key)
    if os.path.isfile(os.path.join(path, "warmstart.json")):
        log(f"warm start: reusing {path}")
        loaded = type(model).from_pretrained(path, use_safetensors=True).to(next(model.parameters()).device)
        return loaded, path
    shipped = shipped_warmstart(key, log=log)
    if shipped is not None:
        weights, record = shipped
        # strict: every parameter comes from the file (the tied output embedding is stored once)
        load_model(model, weights, strict=True, device=str(next(model.parameters()).device))
        versions = ", ".join(f"{name} {version}" for name, version in settings["versions"].items())
        log(f"warm start: using the warm start shipped with ebpo (key {key}, {versions}; cached in {path})")
        _write_cache(model, tokenizer, {**settings, "final_loss": record.get("final_loss"), "shipped": True}, path)
        return model, path
    losses = _train_warmstart(
        model,
        tokenizer,
        problems,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        destination=f"cached afterwards in {path}",
        log=log,
    )
    _write_cache(model, tokenizer, {**settings, "final_loss": losses[-1] if losses else None}, path)
    return model, path


def run_warmstart(train_args: Sequence[str] = ()) -> tuple[PreTrainedModel, Any, list[Problem], dict[str, Any]]:
    """What ``ebpo train <train_args>`` warm-starts: ``(fresh model, tokenizer, training problems, keywords)``,
    the keywords being those ``Trainer._initial_policy`` passes to :func:`cached_warmstart`.

    The config is resolved by ``ebpo train``'s own code (defaults < the task's recommendations < the method
    preset < the flags); tests/test_warmstart_shipped.py checks that the trainer passes the same keywords for
    every entry of :data:`SHIPPED_RUNS`. Raises ValueError when that run has no warm start (not the built-in
    model, or ``--warmstart-steps 0``).
    """
    from ebpo.train.cli import build_parser, resolve_config
    from ebpo.train.trainer import build_components

    config = resolve_config(build_parser().parse_args(list(train_args)))
    components = build_components(config)
    if not config.model.startswith(BUILTIN_PREFIX) or config.warmstart_steps == 0:
        command = " ".join(["ebpo train", *train_args])
        raise ValueError(f"{command} has no warm start to ship (model {config.model!r})")
    spec = builtin_spec(config.model)
    model, tokenizer = load_policy(
        config.model, device=torch.device("cpu"), dtype="float32", spec=spec, seed=config.warmstart_seed
    )
    problems = components.task.train_problems()
    keywords = {
        "spec": spec,
        "task_id": train_data_id(config.task, problems),
        "steps": config.warmstart_steps,
        "lr": config.warmstart_lr,
        "batch_size": config.warmstart_batch_size,
        "seed": config.warmstart_seed,
    }
    return model, tokenizer, problems, keywords


def default_warmstart() -> tuple[PreTrainedModel, Any, list[Problem], dict[str, Any]]:
    """What ``ebpo train`` with no flags warm-starts (:func:`run_warmstart` of no flags)."""
    return run_warmstart(())


def _lock_mismatch() -> str | None:
    """How torch/transformers differ from the repository's ``requirements/lock.txt``; None when they agree or
    there is no lock (an installed package)."""
    lock = Path(__file__).resolve().parents[3] / "requirements" / "lock.txt"
    if not lock.is_file():
        return None
    lines = [line.split("#")[0].strip() for line in lock.read_text().splitlines()]
    pins = dict(line.lower().split("==", 1) for line in lines if "==" in line)
    differ = [
        f"{name} {version} (lock: {pins.get(name)})"
        for name, version in library_versions().items()
        if pins.get(name) != version.split("+")[0]  # the lock records torch without its local label (+cpu)
    ]
    return ", ".join(differ) or None


def ship(directory: Path | None = None, *, name: str = "default", log: Callable[[str], None] = print) -> str:
    """Train the warm start of :data:`SHIPPED_RUNS` ``[name]`` and write it as a shipped one (``directory``,
    default :data:`SHIPPED_DIR`, in its folder ``name``), replacing that folder whole; returns its key. Never
    reads a cache or the shipped data."""
    if name not in SHIPPED_RUNS:
        raise ValueError(f"no shipped warm start named {name!r}; the shipped ones are {sorted(SHIPPED_RUNS)}")
    folder = Path(directory or SHIPPED_DIR) / name
    flags = SHIPPED_RUNS[name]
    model, tokenizer, problems, keywords = run_warmstart(flags)
    settings = warmstart_settings(tokenizer, **keywords)
    key = warmstart_key(settings)
    losses = _train_warmstart(
        model,
        tokenizer,
        problems,
        steps=keywords["steps"],
        lr=keywords["lr"],
        batch_size=keywords["batch_size"],
        seed=keywords["seed"],
        destination=f"to ship in {folder}",
        log=log,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    save_model(model, str(tmp / _SHIPPED_WEIGHTS))
    (tmp / _SHIPPED_WEIGHTS).chmod(0o644)  # safetensors writes it private too
    record = {
        "key": key,
        "sha256": _file_sha256(tmp / _SHIPPED_WEIGHTS),
        "made_with": f"{SHIP_COMMAND} {name}",
        "train_flags": list(flags),
        "threads": torch.get_num_threads(),
        "final_loss": losses[-1] if losses else None,
        "settings": settings,
    }
    (tmp / _SHIPPED_RECORD).write_text(json.dumps(record, indent=1, default=str) + "\n")
    # Swap the folders: a reader sees the old pair, no folder (it then trains), or the new pair, never a mix.
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return key


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ebpo.train.warmstart",
        description="Regenerate the warm starts shipped with ebpo (SHIPPED_RUNS: "
        + "; ".join(f"{name}: ebpo train {' '.join(flags)}".rstrip() for name, flags in SHIPPED_RUNS.items())
        + "); prints each key.",
    )
    parser.add_argument(
        "--ship",
        nargs="*",
        metavar="NAME",
        required=True,
        help=f"train these shipped warm starts and ship them (default: all of {', '.join(SHIPPED_RUNS)})",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"folder that holds one folder per warm start (default: {SHIPPED_DIR})"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads for torch (default: 1, as the README's runs)"
    )
    parser.add_argument(
        "--ignore-lock",
        action="store_true",
        help="ship even when torch/transformers differ from requirements/lock.txt (users of the lock would miss it)",
    )
    args = parser.parse_args(argv)
    names = args.ship or list(SHIPPED_RUNS)
    unknown = [name for name in names if name not in SHIPPED_RUNS]
    if unknown:
        parser.error(
            f"unknown shipped warm start {', '.join(map(repr, unknown))}; the shipped ones are {', '.join(SHIPPED_RUNS)}"
        )
    mismatch = _lock_mismatch()
    if mismatch and not args.ignore_lock:
        print(
            f"{parser.prog}: error: ship under the lock's versions; this environment has {mismatch} "
            "(install requirements/lock.txt, or pass --ignore-lock)",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(args.threads)
    for name in dict.fromkeys(names):
        key = ship(args.out, name=name)
        print(f"shipped warm start {name} ({key}) in {Path(args.out or SHIPPED_DIR) / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
