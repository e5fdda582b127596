"""``ebpo train``: flags generated from :class:`~ebpo.train.config.TrainConfig`.

Every config field is a flag (``group_size`` -> ``--group-size``) whose help is
the field's docstring. Precedence: defaults < the task's ``recommended``
settings < ``--method`` preset < ``--config`` YAML < flags. ``--resume DIR``
reloads ``DIR/config.yaml`` (flags still override, e.g. ``--steps`` to extend
a finished run). Bad configuration exits
with status 2 and a message saying what to change, before any training.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import shlex
import signal
import sys
import time
import typing
from collections.abc import Callable
from typing import Any

import yaml

from ebpo.fileio import (
    RunInUse,
    RunLock,
    check_output_dir,
    make_output_dir,
    remove_output_dir,
    short,
    step_dirs,
    write_failure,
)
from ebpo.train import checkpoint as ckpt
from ebpo.train.config import TrainConfig, check_known_fields, coerce_fields, field_docs
from ebpo.train.presets import derived, describe, list_methods, preset
from ebpo.train.procs import Stopped, StopSignals

__all__ = [
    "main",
    "build_parser",
    "resolve_config",
    "check_train_args",
    "check_extra_train_args",
    "task_recommendations",
    "parse_yaml_mapping",
]

_NONE = ("none", "null", "")
_COMMAND = "ebpo train"  # the marker of the run directories it creates


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_optional_str(text: str) -> str | None:
    return None if text.lower() in _NONE else text


def parse_yaml_mapping(text: str) -> dict:
    """A flag's YAML mapping (``'{key: value}'``); empty text is ``{}``."""
    try:
        value = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"not valid YAML: {' '.join(str(exc).split())[:200]}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping like '{{key: value}}', got {short(text)}")
    try:
        _check_size(value, "the YAML mapping")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ebpo train",
        description="Post-train a causal LM with RL from verifiable rewards. With no arguments: the built-in "
        "stepwise reasoning task (chains of sums solved step by step), a tiny Llama warm-started on it, then "
        "EBPO, on CPU in about 4 minutes.",
        epilog=f"Defaults shown are those of the default --method {TrainConfig.method}; 'ebpo train --list-methods' "
        "shows what each preset sets.",
        argument_default=argparse.SUPPRESS,  # so we know which flags the user actually gave
    )
    parser.add_argument("--config", help="YAML file of config fields (flags override it).")
    parser.add_argument("--resume", metavar="DIR", help="Continue the run in DIR from its latest checkpoint.")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Delete an existing run directory that ebpo train created (never any other directory) instead of refusing.",
    )
    parser.add_argument("--list-methods", action="store_true", help="Print the --method presets and exit.")
    hints = typing.get_type_hints(TrainConfig)
    docs = field_docs()
    # Help shows what a run without flags uses: the dataclass defaults under the default --method preset.
    method = TrainConfig.method
    from_preset = preset(method)
    defaults = TrainConfig(**{**dataclasses.asdict(TrainConfig()), **from_preset})
    for f in dataclasses.fields(TrainConfig):
        hint, default = hints[f.name], getattr(defaults, f.name)
        source = f"; set by the --method {method} preset, other methods change it" if f.name in from_preset else ""
        help_ = docs[f.name] + f" (default: {default!r}{source})"
        if hint is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, help=help_)
        elif hint is dict:
            parser.add_argument(_flag(f.name), type=parse_yaml_mapping, metavar="YAML", help=help_)
        elif hint in (int, float):  # kept as text: coerce_fields checks it like a YAML value, with the same message
            parser.add_argument(_flag(f.name), metavar=hint.__name__.upper(), help=help_)
        elif f.name == "method":
            parser.add_argument(_flag(f.name), choices=list_methods(), help=help_)
        elif typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
            parser.add_argument(_flag(f.name), type=_parse_optional_str, help=help_ + " Use 'none' to unset.")
        else:
            parser.add_argument(_flag(f.name), type=str, help=help_)
    return parser


_MAX_YAML_VALUES = 100_000
"""A config holds a few hundred values; more than this (counted with every alias expanded) is an alias bomb,
refused before anything formats, copies or dumps it (each of which would expand it in full)."""


def _check_size(value: Any, source: str) -> None:
    """ValueError when ``value`` holds more than :data:`_MAX_YAML_VALUES` values, aliases expanded (stops early)."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        count += 1
        if count > _MAX_YAML_VALUES:
            raise ValueError(
                f"{source} expands to more than {_MAX_YAML_VALUES} values (YAML aliases repeating a large value?); "
                "a config holds far fewer"
            )
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    except OSError as exc:
        raise ValueError(f"cannot read config file {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {path!r} is not UTF-8 text (at byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path!r} is not valid YAML: {' '.join(str(exc).split())[:300]}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of field: value")
    _check_size(values, f"config file {path!r}")
    check_known_fields(values, f"config file {path!r}")
    return values


def resolve_config(args: argparse.Namespace, *, echo: Callable[[str], None] | None = None) -> TrainConfig:
    """Defaults < the task's recommendations < preset < YAML < flags (or, with --resume, the run's saved
    config < flags), type-checked. ``echo`` gets one line naming the recommendations applied."""
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "resume", "overwrite", "list_methods")}
    if getattr(args, "resume", None):
        if not os.path.isdir(args.resume):
            raise ValueError(f"--resume {args.resume!r}: no such run directory")
        values = _read_yaml(os.path.join(args.resume, "config.yaml"))
        values.update(flags)
        values["out"] = args.resume
        return TrainConfig(**coerce_fields(values))
    file_values = _read_yaml(args.config) if getattr(args, "config", None) else {}
    method = flags.get("method", file_values.get("method", TrainConfig.method))
    if method not in list_methods():
        raise ValueError(f"method must be one of {list_methods()}, got {method!r}")
    chosen = {**preset(method), **file_values, **flags, "method": method}
    values = coerce_fields({**dataclasses.asdict(TrainConfig()), **chosen})  # type errors first, as without a task
    recommended = task_recommendations(values["task"], values["task_options"])
    if recommended and echo is not None:
        echo(_describe_recommendations(values["task"], recommended, chosen))
    resolved = coerce_fields({**values, **recommended, **chosen})
    resolved.update(derived(method, resolved, given={*file_values, *flags}))  # e.g. dapo's buffer from max_new_tokens
    return TrainConfig(**resolved)


def task_recommendations(task: str, options: dict[str, Any]) -> dict[str, Any]:
    """The ``ebpo train`` settings the task recommends (its ``recommended`` mapping; {} when it has none),
    checked: every key a config field of the right type, none of them the task itself or its options."""
    from ebpo.tasks.build import build_task

    recommended = dict(getattr(build_task(task, options), "recommended", None) or {})
    source = f"task {task!r}'s recommended settings"
    check_known_fields(recommended, source)
    fixed = sorted({"task", "task_options", "method", "out"} & set(recommended))
    if fixed:
        raise ValueError(f"{source} may not set {fixed} (a task recommends training settings, not which run to do)")
    try:
        return coerce_fields(recommended)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def _describe_recommendations(task: str, recommended: dict[str, Any], chosen: dict[str, Any]) -> str:
    applied = ", ".join(f"{k}={v!r}" for k, v in recommended.items() if k not in chosen)
    overridden = ", ".join(k for k in recommended if k in chosen)
    line = f"task {task} recommends {applied or 'nothing not already set'}"
    return line + (f" (overridden by --method/--config/flags: {overridden})" if overridden else "")


def check_train_args(argv: list[str], *, build: bool = False) -> None:
    """ValueError if ``ebpo train argv`` has a bad flag or config value, for commands that launch train runs
    and must fail before writing anything rather than in every child. ``build``: also build the components
    and check that prompts fit the model (catches e.g. an estimator's minimum group size, a dataset whose
    prompts are all too long; needs every file the flags name to exist)."""
    config = resolve_config(_parse_quietly(argv, "ebpo train flags"))
    if build:
        from ebpo.train.trainer import build_components, fit_prompts

        fit_prompts(config, build_components(config), echo=lambda _: None)  # prompts that fit: checked once here
    else:
        from ebpo.train.config import validate

        validate(config)


def check_extra_train_args(fixed: list[str], extra: list[str], command: str, source: str = "--train-args") -> None:
    """ValueError if ``extra`` (a command's ``source``) sets a flag that ``command`` sets itself in ``fixed``.

    Both lists are ``ebpo train`` flags, and argparse lets the last
    occurrence of a flag win: extra flags appended after the command's own
    would override them (``--train-args '--seed 3'`` would silently give
    every run of a comparison the same seed), and ones placed before would be
    silently ignored. Flags are compared by what they set (their config
    field), so ``--no-progress`` and ``--progress``, or an abbreviation,
    count as the same flag.
    """
    own = vars(_parse_quietly(fixed, "ebpo train flags"))
    clash = sorted(set(own) & set(vars(_parse_quietly(extra, f"ebpo train flags in {source}"))))
    if clash:
        flags = ", ".join(_flag(dest) for dest in clash)
        raise ValueError(
            f"{source} sets {flags}, which {command} sets itself for every run (see its own flags); "
            f"remove it from {source}"
        )


def _parse_quietly(argv: list[str], what: str) -> argparse.Namespace:
    """``ebpo train``'s parser on ``argv``; argparse's complaint becomes a ValueError naming ``what``.

    The namespace holds only the flags ``argv`` gives (the parser's defaults are suppressed)."""
    import contextlib
    import io

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return build_parser().parse_args(argv)
    except SystemExit:
        lines = stderr.getvalue().strip().splitlines() or ["invalid flags"]
        raise ValueError(f"bad {what}: {lines[-1].removeprefix('ebpo train: error: ')}") from None


def _prepare_run_dir(config: TrainConfig, *, resume: bool, overwrite: bool) -> str:
    """The run directory, after every check that can fail (nothing is written here but ``--overwrite``'s removal).

    A new run needs a path that does not exist, an empty directory, or (with ``--overwrite``) a directory that
    ``ebpo train`` created: see :mod:`ebpo.fileio`. A resumed run needs a complete, readable checkpoint.
    """
    run_dir = config.out or os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{config.method}")
    if resume:
        if not os.path.isdir(run_dir):
            raise ValueError(f"--resume {run_dir!r}: no such run directory")
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise ValueError(f"--resume {run_dir!r}: the run directory is not writable")
        holder = RunLock.holder(run_dir) if int(os.environ.get("RANK", "0")) == 0 else None
        if holder is not None:  # before reading checkpoints a live run may be replacing
            raise RunInUse(f"--resume {run_dir}: the run is still going ({holder} holds it); stop it first")
        ckpt.check_checkpoint(run_dir, int(os.environ.get("WORLD_SIZE", "1")))
        return run_dir
    if int(os.environ.get("RANK", "0")) != 0:
        return run_dir  # rank 0 alone checks and creates it (it may already have written config.yaml)
    check_output_dir(run_dir, _COMMAND, overwrite=overwrite)
    if overwrite and os.path.isdir(run_dir) and os.listdir(run_dir):
        with RunLock(run_dir, _COMMAND):  # a live run is refused, never deleted under its process
            remove_output_dir(run_dir, _COMMAND)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "list_methods", False):
        for name in list_methods():
            print(f"{name:<14} {describe(name)}")
        return 0
    resume = bool(getattr(args, "resume", None))
    try:
        return _main(args, resume)
    except KeyboardInterrupt:  # Ctrl-C before the run's own handling is in place: nothing to save yet
        print("ebpo train: stopped by SIGINT before training started; nothing was saved", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace, resume: bool) -> int:
    try:
        is_main = int(os.environ.get("RANK", "0")) == 0
        config = resolve_config(args, echo=print if is_main else None)
        from ebpo.train.trainer import build_components, fit_prompts

        components = build_components(config)
        # Prompts longer than the model's context are skipped (counted) or refused now, not mid-run.
        components = fit_prompts(config, components, echo=print if is_main else (lambda _: None))
        run_dir = _prepare_run_dir(config, resume=resume, overwrite=getattr(args, "overwrite", False))
    except ValueError as exc:
        print(f"ebpo train: error: {exc}", file=sys.stderr)
        return 2
    return run(config, components, run_dir, resume=resume)


def run(config: Any, components: Any, run_dir: str, *, resume: bool) -> int:
    """Train in ``run_dir`` (rank 0 holds its lock throughout); the exit status.

    SIGTERM or SIGINT ends the run after the current step with a checkpoint and one line (exit 143 / 130;
    a second signal stops at once without saving). A failed write (a full disk) ends it with one line
    naming the path, the free space and the last complete checkpoint (exit 1).
    """
    _quiet_transformers()
    is_main = int(os.environ.get("RANK", "0")) == 0
    lock = None
    with StopSignals(on_first=_acknowledge if is_main else None, on_second=_stop_at_once) as stop:
        if is_main:
            if not resume:
                make_output_dir(run_dir, _COMMAND)
            try:
                # Held until this process ends: a second train --resume/--overwrite or compare on it is refused.
                lock = RunLock(run_dir, _COMMAND).acquire()
                if resume:  # the newest complete checkpoint in place, broken newer ones aside, temporaries gone
                    ckpt.settle_checkpoints(run_dir, int(os.environ.get("WORLD_SIZE", "1")))
            except ValueError as exc:
                if lock is not None:
                    lock.release()
                print(f"ebpo train: error: {exc}", file=sys.stderr)
                return 2
        try:
            return _run_locked(config, components, run_dir, resume=resume, is_main=is_main, stop=stop)
        except Stopped as stopped:
            return stopped.exit_code  # the trainer printed the line (checkpoint saved, how to resume)
        except OSError as exc:
            if not isinstance(exc, ckpt.CheckpointWriteError) and exc.errno not in _WRITE_ERRNOS:
                raise  # not a write that the disk refused: a bug, with its traceback
            print(f"ebpo train: error: {_write_error_line(exc, run_dir)}", file=sys.stderr)
            return 1
        finally:
            if lock is not None:
                lock.release()


# Errors of a write the disk refused: full, over quota, too large, read-only, failing.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})


def _write_error_line(exc: OSError, run_dir: str) -> str:
    """One line: what could not be written, the free space, the last complete checkpoint, how to go on."""
    resume = f"free some space, then resume with: ebpo train --resume {shlex.quote(run_dir)}"
    if isinstance(exc, ckpt.CheckpointWriteError):
        return f"{exc}; {resume}"
    done = step_dirs(os.path.join(run_dir, "checkpoints"))
    last = os.path.join(run_dir, "checkpoints", done[-1]) if done else "none yet"
    return f"{write_failure(exc.filename or run_dir, exc)}; the last complete checkpoint is {last}; {resume}"


def _acknowledge(signum: int) -> None:
    # os.write, not print: a handler that prints while the main thread is inside print raises "reentrant call".
    name = signal.Signals(signum).name
    os.write(
        2,
        f"{name} received: finishing the current step, then saving a checkpoint and stopping "
        f"(send {name} again to stop at once, without saving)\n".encode(),
    )


def _stop_at_once(signum: int) -> None:
    name = signal.Signals(signum).name
    os.write(
        2, f"second {name}: stopped at once, without saving; --resume continues from the last checkpoint\n".encode()
    )
    os._exit(128 + signum)  # no cleanup can be trusted mid-step; checkpoints are atomic and the lock dies with us


def _run_locked(config: Any, components: Any, run_dir: str, *, resume: bool, is_main: bool, stop: StopSignals) -> int:
    from ebpo.train.trainer import Trainer

    if is_main:
        config = dataclasses.replace(config, out=run_dir)
        from ebpo.train.warmstart import library_versions

        tmp = os.path.join(run_dir, ".config.yaml.tmp")
        try:
            with open(tmp, "w") as handle:
                # What the numbers also depend on (comments, so --resume reads the file as before); summary.json has the threads used.
                versions = ", ".join(f"{name} {version}" for name, version in library_versions().items())
                handle.write(
                    f"# ebpo train with {versions}, python {sys.version.split()[0]}; {os.cpu_count()} CPU cores\n"
                )
                yaml.safe_dump(dataclasses.asdict(config), handle, sort_keys=False)
            os.replace(
                tmp, os.path.join(run_dir, "config.yaml")
            )  # a resumed run's config: replaced whole or not at all
        except OSError:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    trainer = Trainer(config, run_dir, components, resume=resume, echo=print if is_main else (lambda _: None))
    summary = trainer.train(stop=stop)
    if is_main:
        print(
            f"done: held-out accuracy {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f} "
            f"({summary['accuracy_gain']:+.3f} ± {summary['accuracy_gain_se']:.3f} {summary['accuracy_gain_se_kind']} SE, "
            f"{summary['eval_mode']}, {summary['eval_problems']} problems) | "
            f"{summary['wall_seconds']:.0f} s | peak RSS {summary['peak_rss_mb']:.0f} MiB | run dir {run_dir}"
        )
    return 0


def _quiet_transformers() -> None:
    """Hide per-call progress bars and generation-config notices of transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
