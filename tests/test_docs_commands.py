"""Every ``ebpo ...`` command in README.md and docs/ runs through the real CLI parsers and names real components.

Which commands: in fenced blocks of shell (no language, ``bash``, ``sh``,
``shell``, ``console``, ``text``) every line, with ``\\`` continuations joined;
in the prose every inline code span (blockquote markers dropped, a span may
wrap lines). A line is split as the shell splits it (``shlex``: quotes, ``#``
comments, ``&&``/``;``/``|`` chains, ``VAR=value`` prefixes, ``$(...)``), and
each ``ebpo SUBCOMMAND ...`` in it, or ``python -m ebpo SUBCOMMAND ...`` /
``torchrun ... -m ebpo ...``, is a command. docs/archive/ is read too: its
banners give the commands that reproduce the archived results today, and
its recorded commands still parse.

What is checked, always with the subcommand's own ``build_parser()`` and the
real registries (never a copy of a flag list):

* ``ebpo train``: flags parse; the config resolves (defaults < the task's
  recommendations < preset < flags, ``ebpo.train.cli.resolve_config``) and
  passes ``ebpo.train.config.validate``; the estimator builds with its
  options (and the group size is at least its minimum); the policy loss and
  aggregation build; the divergence, curriculum, verifier and task resolve in
  their registries and accept their options. The task is resolved, not built
  (``stepwise`` draws 20,000 problems; a ``dataset:`` task reads files).
* ``ebpo compare``: flags parse and resolve (``ebpo.compare._resolve``); every
  method's ``ebpo train`` command, built by compare itself, passes the train
  checks above, so the flags inside ``--variant LABEL "FLAGS"`` and
  ``--train-args`` are checked like any ``ebpo train`` flags, and neither may
  repeat a flag compare sets (``check_extra_train_args``, as compare does).
* ``ebpo meta``: likewise for a member's ``ebpo train`` command, and the task
  must draw a seeded validation split (``ebpo.meta._check_task``).
* ``ebpo eval``: flags parse; ``--task`` and ``--verifier`` resolve,
  ``--benchmark NAME[=PATH]`` names a dataset loader.
* ``ebpo simulate``: flags parse and pass ``ebpo.simulate._validate``.

A component named by an import path into the reader's own code
(``--estimator my_estimators:MedianBaseline``, whose top-level module is not
installed) is checked for its form only; an import path into an installed
package (``ebpo.estimators:...``) must resolve.

Placeholders: a value written in capitals (``S``, ``N``, ``FILE``, ``DIR``,
``RUN_DIR``, ``FLAGS``) or ``...`` stands for the reader's own; it is given a
value of the flag's type and not checked further. An inline span names a
command rather than runs it: ``ebpo eval --out`` (a flag without its value)
and ``ebpo eval`` (without the required ``--model``) are accepted there, never
in a code block; a bare ``ebpo compare`` in prose is only checked to be a
subcommand. Files a command names (``--config``, ``--resume``, mirror
parameters, datasets) need not exist; ``--resume``/``--config`` commands are
checked as their flags over the defaults.

Results reproduced today: an ``ebpo compare`` command offered as what to run
*today* to reproduce a recorded result (the word "today" before it in its
paragraph, or in the paragraph that introduces its code block) must pass
``--final-samples``: its default became 32 at abcf65b, and before that a
report's final accuracy was the last in-training avg@4. It must pass
``--final-samples 0`` when that paragraph says the result is avg@4 (and not
avg@32). ``--quick`` comparisons are exempt (their default is 0). A command
recorded *before* the word (``Made with `ebpo compare ...` at 332b88e; the same
comparison today is ...``) is the record of what ran, not an offer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import io
import re
import shlex
import types
from pathlib import Path

import pytest

from ebpo.cli import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "zsh", "text", "txt"}
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
_PLACEHOLDER = re.compile(r"^(\.\.\.|[A-Z][A-Z0-9_]*)$")
_SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.S)
_MAYBE_COMMAND = re.compile(r"\bebpo\s+[\w-]")


@dataclasses.dataclass(frozen=True)
class DocCommand:
    """One ``ebpo`` command found in a markdown file."""

    where: str  # "path:line"
    argv: tuple[str, ...]  # the subcommand and its arguments
    inline: bool  # an inline code span (names a command) rather than a line of a code block (runs it)
    context: str  # the paragraph it stands in (for a code block: the paragraph that introduces it, and the block)
    lead: str = ""  # the part of ``context`` before the command

    def __str__(self) -> str:
        return f"{self.where}: ebpo {shlex.join(self.argv)}"


# ---- extraction -------------------------------------------------------------------------------------------------


def _paragraphs(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line indices of the blank-line-separated blocks of ``lines``."""
    blocks, start = [], None
    for index, line in enumerate(lines + [""]):
        if line.strip() and start is None:
            start = index
        elif not line.strip() and start is not None:
            blocks.append((start, index - 1))
            start = None
    return blocks


def _is_control(token: str) -> bool:
    return bool(token) and all(ch in "();<>|&" for ch in token)


def commands_in_line(text: str) -> list[tuple[str, ...] | str]:
    """The ``ebpo`` commands in one logical shell line: each an argv tuple (subcommand first), or an error string.

    ``text`` is split as the shell splits it: quotes, ``#`` comments, control operators (``&&``, ``;``, ``|``,
    redirections, ``$(...)``) ending a simple command. ``ebpo`` at the start of a simple command (after
    ``VAR=value`` prefixes) or after ``-m`` must be followed by a subcommand; elsewhere (quoted output, a
    sentence) only ``ebpo <subcommand>`` counts.
    """
    if not _MAYBE_COMMAND.search(text):
        return []
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError as exc:  # unbalanced quotes: the reader's shell would not run it either
        return [f"cannot be split as a shell line ({exc}): {text.strip()}"]
    found: list[tuple[str, ...] | str] = []
    simple: list[list[str]] = [[]]
    for token in tokens:
        if _is_control(token):
            simple.append([])
        else:
            simple[-1].append(token)
    for words in simple:
        first = next((i for i, w in enumerate(words) if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", w)), len(words))
        for i, word in enumerate(words):
            if word != "ebpo" or i + 1 >= len(words):
                continue
            sub = words[i + 1]
            if _PLACEHOLDER.match(sub):  # `ebpo COMMAND`: any subcommand
                break
            if sub in SUBCOMMANDS:
                found.append(tuple(words[i + 1 :]))
                break
            at_command_position = i == first or (i > 0 and words[i - 1] == "-m")
            if at_command_position and re.fullmatch(r"[a-z][a-z0-9_-]*", sub):  # not "ebpo train: error: ..."
                found.append(f"unknown subcommand {sub!r} (ebpo has {sorted(SUBCOMMANDS)}): {text.strip()}")
                break
    return found


def extract_commands(markdown: str, name: str) -> list[DocCommand | str]:
    """Every ``ebpo`` command of a markdown text (see the module docstring); problems as ``"where: message"``."""
    lines = markdown.split("\n")
    prose = list(lines)  # fenced lines blanked, blockquote markers dropped: what inline spans are read from
    blocks: list[tuple[int, list[tuple[int, str]]]] = []  # (index of the opening fence, shell lines)
    fence, shell, current = None, False, []
    for index, line in enumerate(lines):
        match = _FENCE.match(line)
        if fence is None and match:
            fence, shell, current = match.group(1), match.group(2).lower() in SHELL_FENCES, []
            blocks_start = index
            prose[index] = ""
            continue
        if fence is not None:
            prose[index] = ""
            if line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
                if shell:
                    blocks.append((blocks_start, current))
                fence = None
            else:
                current.append((index, line))
            continue
        prose[index] = re.sub(r"^\s*(>\s?)+", "", line)
    paragraphs = _paragraphs(prose)

    def paragraph_at(index: int) -> tuple[int, str]:
        """The paragraph holding line ``index``, and the offset in the prose text at which it starts."""
        for first, last in paragraphs:
            if first <= index <= last:
                return sum(len(line) + 1 for line in prose[:first]), "\n".join(prose[first : last + 1])
        return 0, ""

    def paragraph_before(index: int) -> str:
        before = [(first, last) for first, last in paragraphs if last < index]
        return "\n".join(prose[before[-1][0] : before[-1][1] + 1]) if before else ""

    found: list[DocCommand | str] = []
    for opening, block in blocks:
        lead = paragraph_before(opening)
        context = lead + "\n" + "\n".join(line for _, line in block)
        logical: list[tuple[int, str]] = []
        pending: tuple[int, str] | None = None
        for index, line in block:
            text = re.sub(r"^\s*\$\s", "", line) if pending is None else line
            start, joined = pending if pending else (index, "")
            if text.rstrip().endswith("\\"):
                pending = (start, joined + text.rstrip()[:-1] + " ")
                continue
            logical.append((start, joined + text))
            pending = None
        if pending:
            logical.append(pending)
        for index, text in logical:
            for item in commands_in_line(text):
                where = f"{name}:{index + 1}"
                found.append(
                    f"{where}: {item}" if isinstance(item, str) else DocCommand(where, item, False, context, lead)
                )
    body = "\n".join(prose)
    for match in _SPAN.finditer(body):
        span = match.group(2).replace("\n", " ").replace("\\|", "|").strip()
        index = body.count("\n", 0, match.start(2))
        start, paragraph = paragraph_at(index)
        lead = paragraph[: match.start() - start]
        for item in commands_in_line(span):
            where = f"{name}:{index + 1}"
            found.append(
                f"{where}: {item}" if isinstance(item, str) else DocCommand(where, item, True, paragraph, lead)
            )
    return found


def documented_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@functools.cache
def documented_commands() -> tuple[list[DocCommand], list[str]]:
    commands, problems = [], []
    for path in documented_files():
        for item in extract_commands(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))):
            (problems if isinstance(item, str) else commands).append(item)
    return commands, problems


# ---- checking ---------------------------------------------------------------------------------------------------


def _parse(parser, argv: list[str]):
    """``parser.parse_args(argv)``; argparse's complaint becomes a ValueError with its message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(argv)
    except SystemExit as exc:
        lines = stderr.getvalue().strip().splitlines() or [f"exit {exc.code}"]
        raise ValueError(lines[-1]) from None


def _takes_value(action) -> bool:
    return action.nargs != 0


def _stand_in(action, default: object = None) -> str:
    """A value of ``action``'s type for a placeholder (``S``, ``NAME``, ``FILE``, ``...``): a number for a number,
    a choice for a choice, else the flag's own default when it is a name (``--estimator NAME``: ``ebpo``), so a
    placeholder is never checked as the name it stands for."""
    if action.choices:
        return str(list(action.choices)[0])
    if action.type is int or action.metavar == "INT":
        return "1"
    if action.type is float or action.metavar == "FLOAT":
        return "1.0"
    if action.metavar == "YAML":
        return "{}"
    return default if isinstance(default, str) and default else "PLACEHOLDER"


def fill_placeholders(
    parser, argv: list[str], *, mention: bool, defaults: dict | None = None
) -> tuple[list[str], set[str]]:
    """``argv`` with placeholder values replaced by stand-ins (:func:`_stand_in`); the dests that held one.

    ``defaults``: each dest's default where the parser does not hold it (``ebpo train`` suppresses them).
    ``mention``: an inline span naming a flag (``ebpo eval --out``) or a command without its required flags
    (``ebpo eval``) gets stand-ins for what it leaves out."""
    options = parser._option_string_actions  # argparse's own table of flags (the parser's, not a copy)
    defaults = {action.dest: action.default for action in parser._actions} | (defaults or {})
    out, placeholders = [], set()
    for index, token in enumerate(argv):
        action = options.get(argv[index - 1]) if index else None
        if action is not None and _takes_value(action) and _PLACEHOLDER.match(token):
            out.append(_stand_in(action, defaults.get(action.dest)))
            placeholders.add(action.dest)
        else:
            out.append(token)
    if mention:
        last = options.get(out[-1]) if out else None
        if last is not None and _takes_value(last):
            out.append(_stand_in(last, defaults.get(last.dest)))
            placeholders.add(last.dest)
        for action in parser._actions:
            if action.required and not any(flag in out for flag in action.option_strings):
                out += [action.option_strings[0], _stand_in(action, defaults.get(action.dest))]
                placeholders.add(action.dest)
    return out, placeholders


def _resolved_task_stub(name: str, options: dict):
    """What ``ebpo train`` needs of a task to resolve a config, without building it: its factory resolves in the
    task registry (``task_factory``, as ``build_task`` does), takes ``options``, and its ``recommended`` settings."""
    from ebpo.tasks.build import task_factory

    factory = task_factory(name)
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        raise ValueError(f"bad options for task {name!r}: {exc}") from None
    except ValueError:
        pass
    cls = factory.func if isinstance(factory, functools.partial) else factory
    from ebpo.data import DATASETS, DatasetTask

    if cls is DatasetTask and isinstance(factory, functools.partial):  # what DatasetTask does first: its loader
        DATASETS.get(factory.args[0])
    recommended = getattr(cls, "recommended", None)
    if dataclasses.is_dataclass(cls):
        field = {f.name: f for f in dataclasses.fields(cls)}.get("recommended")
        if field is not None and field.default_factory is not dataclasses.MISSING:
            recommended = field.default_factory()
        elif field is not None and field.default is not dataclasses.MISSING:
            recommended = field.default
    return types.SimpleNamespace(recommended=recommended if isinstance(recommended, dict) else None)


def _bind(factory, options: dict, what: str) -> None:
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        raise ValueError(f"bad options for {what}: {exc}") from None
    except ValueError:  # no introspectable signature
        pass


_COMPONENT_FIELDS = {
    "estimator": "estimator_options",
    "weighting": "weighting_options",
    "divergence": "divergence_options",
    "loss": "loss_options",
    "loss_agg": None,
    "curriculum": None,
    "verifier": None,
    "task": "task_options",
}
"""``ebpo train``'s fields that name a registered component or a ``module:attr`` import path, with their options."""


def readers_plugin(name: object, kind: str) -> bool:
    """Whether ``name`` is an import path into the reader's own code: ``module:attr`` whose top-level package is not
    installed (``my_estimators:MedianBaseline``; a task's ``dataset:gsm8k`` is a registered task with its argument)."""
    if not isinstance(name, str):
        return False
    module, sep, attr = name.partition(":")
    if not (sep and module and attr):
        return False
    if kind == "task":
        from ebpo.tasks.base import TASKS
        from ebpo.tasks.build import register_builtin_components

        register_builtin_components()
        if module in TASKS:
            return False
    return importlib.util.find_spec(module.split(".")[0]) is None


@functools.cache
def check_train_argv(argv: tuple[str, ...], placeholders: frozenset[str] = frozenset()) -> None:
    """ValueError when ``ebpo train argv`` would be refused before training (see the module docstring)."""
    from ebpo.curriculum import CURRICULA
    from ebpo.divergences import DIVERGENCES
    from ebpo.estimators import build_estimator
    from ebpo.losses import build_policy_loss
    from ebpo.tasks import build as task_build
    from ebpo.train import cli as train_cli
    from ebpo.train.config import validate
    from ebpo.verifiers.base import VERIFIERS

    args = _parse(train_cli.build_parser(), list(argv))
    for name in ("resume", "config"):  # the run directory or YAML file is the reader's: check the flags alone
        if hasattr(args, name):
            delattr(args, name)
    for name, options in _COMPONENT_FIELDS.items():  # the reader's own plugin: the preset's component instead
        if readers_plugin(getattr(args, name, None), name):
            delattr(args, name)
            if options and hasattr(args, options):
                delattr(args, options)
    real_build_task = task_build.build_task
    task_build.build_task = _resolved_task_stub  # task_recommendations imports it from there at call time
    try:
        config = train_cli.resolve_config(args)
    finally:
        task_build.build_task = real_build_task
    validate(config)
    estimator = build_estimator(
        config.estimator,
        weighting=config.weighting,
        weighting_options=config.weighting_options or None,
        **config.estimator_options,
    )
    if config.group_size < estimator.min_group_size:
        raise ValueError(f"estimator {config.estimator!r} needs group_size >= {estimator.min_group_size}")
    build_policy_loss(
        name=config.loss,
        eps_low=config.eps_low,
        eps_high=config.eps_high,
        agg=config.loss_agg,
        agg_constant=float(config.max_new_tokens),
        **config.loss_options,
    )
    if config.divergence is not None:  # resolved, not built: a neural mirror's parameter file is the reader's
        _bind(DIVERGENCES.get(config.divergence), config.divergence_options, f"divergence {config.divergence!r}")
    CURRICULA.get(config.curriculum)
    if config.verifier is not None:
        VERIFIERS.get(config.verifier)
    if config.model.startswith("builtin:") and "model" not in placeholders:
        from ebpo.models.loading import builtin_spec

        builtin_spec(config.model)


def _check_train(argv: list[str], placeholders: set[str]) -> None:
    check_train_argv(tuple(argv), frozenset(placeholders))


def _check_compare(args) -> None:
    from ebpo import compare
    from ebpo.train.cli import check_extra_train_args

    try:
        args = compare._resolve(args)
    except SystemExit as exc:
        raise ValueError(str(exc.code)) from None
    check_dir = Path("runs/check")
    for method in args.methods:
        spec = compare.RunSpec(method, min(args.group_sizes), 0)
        command = compare._command(spec, args, check_dir)[4:]  # what compare itself runs, less "python -m ebpo train"
        try:
            check_train_argv(tuple(command))
        except ValueError as exc:
            raise ValueError(f"method {method!r} (ebpo train {shlex.join(command)}): {exc}") from None
        check_extra_train_args(compare._own_flags(spec, args, check_dir), shlex.split(args.train_args), "ebpo compare")
        if method in args.variants:
            own = compare._own_flags(spec, args, check_dir, method=False)
            check_extra_train_args(own, args.variants[method], "ebpo compare", source=f"--variant {method}")


def _check_meta(args) -> None:
    from ebpo import meta
    from ebpo.train.cli import check_extra_train_args

    args = meta._resolve(args)
    meta._check_task(args)
    own = meta._own_flags(args, Path("runs/check/params.json"), Path("runs/check/member"))
    check_extra_train_args(own, shlex.split(args.train_args), "ebpo meta")
    check_train_argv(tuple(own + shlex.split(args.train_args)))


def _check_eval(args, placeholders: set[str]) -> None:
    import yaml

    from ebpo.data import DATASETS
    from ebpo.tasks.build import register_builtin_components
    from ebpo.verifiers.base import VERIFIERS

    register_builtin_components()
    if args.task is not None and "task" not in placeholders:
        options = yaml.safe_load(args.task_options) if args.task_options else {}
        _resolved_task_stub(args.task, options or {})
    for item in args.benchmark:
        name = item.partition("=")[0]
        if name not in DATASETS:
            raise ValueError(f"--benchmark {item!r}: no dataset loader {name!r}; choose one of {DATASETS.names()}")
    if args.verifier is not None:
        VERIFIERS.get(args.verifier)
    if args.model.startswith("builtin:"):
        from ebpo.models.loading import builtin_spec

        builtin_spec(args.model)


def check_command(command: DocCommand) -> None:
    """ValueError when ``command`` would be refused by ebpo (see the module docstring)."""
    sub, rest = command.argv[0], list(command.argv[1:])
    if command.inline and not rest:
        return  # the command's name in a sentence
    if "-h" in rest or "--help" in rest:
        return
    module = importlib.import_module(SUBCOMMANDS[sub][0])
    parser = module.build_parser()
    defaults = None
    if sub == "train":
        from ebpo.train.config import TrainConfig

        defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    argv, placeholders = fill_placeholders(parser, rest, mention=command.inline, defaults=defaults)
    if sub == "train":
        _check_train(argv, placeholders)
        return
    args = _parse(parser, argv)
    if sub == "compare":
        _check_compare(args)
    elif sub == "meta":
        _check_meta(args)
    elif sub == "eval":
        _check_eval(args, placeholders)
    elif sub == "simulate":
        module._validate(args)


def stale_final_samples(command: DocCommand) -> str | None:
    """Why ``command`` misstates the results it reproduces today (see the module docstring), or None."""
    if command.argv[0] != "compare" or len(command.argv) < 2 or not re.search(r"\btoday\b", command.lead, re.I):
        return None
    from ebpo.compare import build_parser

    args = _parse(build_parser(), list(command.argv[1:]))
    if args.quick:
        return None
    if args.final_samples is None:
        return (
            "offered as today's command for a recorded result but leaves --final-samples at its default (32 since "
            "abcf65b: it would report avg@32); pass --final-samples 0 for a result measured by the last in-training "
            "evaluation"
        )
    says_avg4 = "avg@4" in command.context and "avg@32" not in command.context
    if says_avg4 and args.final_samples != 0:
        return f"its paragraph reports avg@4, but --final-samples {args.final_samples} reports avg@{args.final_samples}"
    return None


# ---- tests ------------------------------------------------------------------------------------------------------

COMMANDS, PROBLEMS = documented_commands()


def test_extraction_follows_the_shell():
    markdown = "\n".join(
        [
            "Run `ebpo train --seed S` or `ebpo eval --out` (a flag); `ebpo.build_estimator` is no command.",
            "> quoted `ebpo compare --group-sizes 2",
            "> --seeds 3` across lines",
            "",
            "```bash",
            "pip install -e . && ebpo train --steps 3   # a comment --not-a-flag",
            "EBPO_CACHE_DIR=$(mktemp -d) ebpo compare --variant x \\",
            '  "--method grpo --lr 1e-4"',
            "torchrun --nproc_per_node 2 -m ebpo train --device cpu",
            "ebpo evaluate --model m",
            "ebpo train: error: steps must be > 0, got 0",
            "python -m ebpo.train.warmstart --ship",
            "```",
            "```python",
            'subprocess.run(["ebpo", "train"])  # ebpo train in python is not a shell line',
            "```",
        ]
    )
    found = extract_commands(markdown, "x.md")
    commands = [item for item in found if isinstance(item, DocCommand)]
    assert [c.argv for c in commands] == [
        ("train", "--steps", "3"),
        ("compare", "--variant", "x", "--method grpo --lr 1e-4"),
        ("train", "--device", "cpu"),
        ("train", "--seed", "S"),
        ("eval", "--out"),
        ("compare", "--group-sizes", "2", "--seeds", "3"),
    ]
    assert [c.where for c in commands] == ["x.md:6", "x.md:7", "x.md:9", "x.md:1", "x.md:1", "x.md:2"]
    assert [c.inline for c in commands] == [False, False, False, True, True, True]
    assert (
        found[3]
        == "x.md:10: unknown subcommand 'evaluate' (ebpo has ['compare', 'eval', 'meta', 'simulate', 'train']): ebpo evaluate --model m"
    )


def test_the_docs_have_commands_of_every_subcommand():
    assert len(COMMANDS) >= 60, f"the scan found only {len(COMMANDS)} ebpo commands in README.md and docs/"
    runnable = {c.argv[0] for c in COMMANDS if not c.inline}
    assert runnable >= {"train", "compare", "meta", "simulate"}, runnable
    assert not PROBLEMS, "\n".join(PROBLEMS)


@pytest.mark.parametrize(
    "argv,why",
    [
        (["train", "--task", "gsm8k"], "unknown task 'gsm8k'"),
        (["train", "--method", "ebpo2"], "invalid choice"),
        (["train", "--estimator", "grpoo"], "unknown advantage estimator"),
        (["train", "--estimator", "ebpo.estimators:Nope"], "has no attribute"),
        (["train", "--task", "dataset:gsm8kk"], "gsm8kk"),
        (["train", "--estimator-options", "{prior: runing}"], "prior"),
        (["train", "--weighting", "hadw"], "unknown advantage weighting"),
        (["train", "--divergence", "kl", "--divergence-options", "{estimater: k3}"], "bad options for divergence"),
        (["train", "--loss-agg", "token_mean"], "unknown loss aggregation"),
        (["train", "--curriculum", "hard"], "unknown curriculum"),
        (["train", "--steps", "ten"], "steps"),
        (["train", "--method", "grpo", "--estimator", "rloo", "--group-size", "1"], "group_size"),
        (["compare", "--variant", "x", "--method grpo --estimater ebpo"], "unrecognized arguments: --estimater"),
        (["compare", "--variant", "x", "--method grpo --group-size 16"], "--variant x sets --group-size"),
        (["compare", "--train-args", "--divergence nope", "--methods", "grpo"], "unknown divergence"),
        (["compare", "--train-args", "--seed 3", "--methods", "grpo"], "sets --seed"),
        (["compare", "--methods", "grpo", "--group-sizes", "two"], "invalid int value"),
        (["meta", "--task", "dataset:gsm8k"], "validation"),
        (["meta", "--train-args", "--steps 5"], "sets --steps"),
        (["eval", "--model", "m", "--benchmark", "gsm8kk=x.jsonl"], "no dataset loader"),
        (["eval", "--model", "m", "--task", "gsm8k"], "unknown task"),
        (["simulate", "--group-sizes", "1", "2"], "group sizes must be >= 2"),
    ],
)
def test_the_checks_refuse_what_ebpo_refuses(argv, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        check_command(DocCommand("test", tuple(argv), False, ""))


def test_the_checks_accept_what_ebpo_accepts():
    for argv in (
        ["train", "--task", "dataset:gsm8k", "--task-options", "{path: train.jsonl, eval_path: test.jsonl}"],
        ["train", "--method", "gbmpo-mirror", "--mirror-params", "FILE", "--seed", "S"],
        ["train", "--estimator", "NAME", "--task", "NAME"],
        ["train", "--estimator", "my_estimators:MedianBaseline", "--estimator-options", "{width: 2}"],
        ["compare", "--methods", "grpo", "--variant", "k", "--method ebpo --estimator-options '{prior: running}'"],
        ["meta", "--task", "arithmetic", "--train-args", "--prompts-per-step 16 --group-size 4"],
        ["eval", "--model", "RUN_DIR", "--benchmark", "math500=path.jsonl"],
    ):
        check_command(DocCommand("test", tuple(argv), False, ""))


def test_the_stale_rule():
    def stale(argv: str, context: str) -> str | None:
        return stale_final_samples(DocCommand("test", tuple(shlex.split(argv)), True, context, context))

    today = "The same comparison today (its tables are avg@4) is:"
    assert stale("compare --task arithmetic --seeds 5", today) is not None
    assert stale("compare --task arithmetic --seeds 5 --final-samples 32", today) is not None
    assert stale("compare --task arithmetic --seeds 5 --final-samples 0", today) is None
    assert stale("compare --quick", today) is None
    assert stale("compare --task arithmetic --seeds 5", "The stepwise grid, avg@32:") is None
    made = (
        "Made with `ebpo compare --out runs/compare` at 332b88e; the same comparison today is `ebpo compare --seeds 5`."
    )
    commands = [c for c in extract_commands(made, "x.md") if isinstance(c, DocCommand)]
    assert [stale_final_samples(c) is None for c in commands] == [True, False]  # the record, then today's command


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_runs(command):
    try:
        check_command(command)
    except ValueError as exc:
        pytest.fail(f"{command}\n  is refused: {exc}")


def test_commands_offered_for_today_reproduce_the_recorded_measure():
    stale = [f"{command}\n  {why}" for command in COMMANDS if (why := stale_final_samples(command))]
    assert not stale, "\n".join(stale)
