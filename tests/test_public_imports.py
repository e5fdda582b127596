"""Every import path users and the docs rely on resolves, and the commands sit above what they share.

The layout: the core at the top level; one package per command
(``train/``, ``evaluate/``, ``compare/``, ``meta/``, ``simulate/``). What two
commands share lives below both, so that no command package imports another;
``compare`` and ``meta`` launch ``ebpo train`` runs and may use its pieces.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

import ebpo
from ebpo.cli import SUBCOMMANDS

SRC = Path(ebpo.__file__).resolve().parent

COMMANDS = ("train", "evaluate", "compare", "meta", "simulate")
ALLOWED = {("compare", "train"), ("meta", "train")}  # (importer, imported): both run ebpo train subprocesses


def test_top_level_api():
    from ebpo import build_divergence, build_estimator, list_estimators

    assert "ebpo" in list_estimators()
    assert callable(build_estimator) and callable(build_divergence)
    for name in ebpo.__all__:
        assert hasattr(ebpo, name), name


@pytest.mark.parametrize(
    ("module", "names"),
    [
        ("ebpo.eval_metrics", ["avg_at_k", "pass_at_k", "maj_at_k"]),  # README's feature list
        ("ebpo.curriculum", ["build_curriculum", "list_curricula"]),
        (
            "ebpo.data",
            ["load_records", "load_dataset_records", "apply_chat_template", "LOADERS"],
        ),  # README, docs/data.md
        ("ebpo.verifiers", ["VERIFIERS", "build_verifier", "list_verifiers"]),
        ("ebpo.tasks", ["TASKS", "Problem", "Task"]),
        ("ebpo.models", ["load_policy", "load_tokenizer", "CharTokenizer"]),
        ("ebpo.integrations.verl", ["register", "save_estimator_states", "load_estimator_states"]),
        # the pieces the commands share, below them
        ("ebpo.tasks.build", ["build_task", "build_verifier_for", "register_builtin_components"]),
        ("ebpo.sampling", ["Rollout", "generate", "sampling_config", "sample_correctness", "EVAL_SEED_OFFSET"]),
        ("ebpo.fileio", ["latest_checkpoint", "load_tensors", "check_output_dir"]),
        ("ebpo.stats_report", ["mean_ci", "t_quantile", "samples_to_target"]),
        ("ebpo.train.procs", ["run_parallel"]),
        # the commands' own pieces
        ("ebpo.compare", ["main", "RunSpec", "aggregate_runs", "write_report", "build_parser", "DEFAULT_METHODS"]),
        ("ebpo.meta", ["main", "min_divergence_on_grid"]),
        ("ebpo.meta.es", ["ESConfig", "ESState", "es_iteration"]),
        ("ebpo.evaluate", ["main", "summarise", "build_parser"]),
        ("ebpo.simulate", ["main", "run", "build_parser"]),
        ("ebpo.simulate.report", ["markdown", "plots", "PAPER_HADW"]),
        ("ebpo.simulate.theory", ["hadw_probability_exact", "bias_closed_form"]),
        ("ebpo.simulate.topics", ["topic_mixture_mse", "topic_population"]),
        ("ebpo.train.cli", ["main", "check_train_args"]),
        ("ebpo.train.rollout", ["rows_logprobs", "sequence_logprobs", "score", "overlong_penalty"]),
    ],
)
def test_module_exports(module, names):
    imported = importlib.import_module(module)
    missing = [n for n in names if not hasattr(imported, n)]
    assert not missing, f"{module} lacks {missing}"


def test_trl_integration():
    pytest.importorskip("trl")
    from ebpo.integrations.trl import EBPOGRPOConfig, EBPOGRPOTrainer

    assert EBPOGRPOTrainer.__name__ == "EBPOGRPOTrainer" and EBPOGRPOConfig.__name__ == "EBPOGRPOConfig"


def test_verl_plugin_path():
    # VERL_USE_EXTERNAL_MODULES names this module; importing it registers with verl, so it needs verl installed.
    assert importlib.util.find_spec("ebpo.integrations.verl_plugin") is not None
    pytest.importorskip("verl")
    assert importlib.import_module("ebpo.integrations.verl_plugin").REGISTERED


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_command_has_an_entry_point(command):
    """``python -m ebpo COMMAND`` dispatches to ``main`` of the module the CLI names, which is a command package."""
    module = importlib.import_module(SUBCOMMANDS[command][0])
    assert callable(module.main)
    assert module.__name__.split(".")[1] in COMMANDS


def test_command_main_functions():
    import ebpo.compare
    import ebpo.evaluate
    import ebpo.meta
    import ebpo.simulate
    import ebpo.train.cli

    for module in (ebpo.compare, ebpo.meta, ebpo.evaluate, ebpo.simulate, ebpo.train.cli):
        assert callable(module.main), module.__name__


def imported_modules(source: str, module: str) -> set[str]:
    """Every ebpo module that ``source`` (the text of ``module``) imports, at any depth (function-local included)."""
    package = module if module.endswith("__init__") else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in out if name == "ebpo" or name.startswith("ebpo.")}


def command_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in COMMANDS else None


def layering_violations(sources: dict[str, str]) -> list[str]:
    """Imports from one command package into another (not in ALLOWED), or from outside the commands into one."""
    bad = []
    for module, source in sorted(sources.items()):
        own = command_of(module)
        for target in sorted(imported_modules(source, module)):
            other = command_of(target)
            if other is None or other == own:
                continue
            if own is None or (own, other) not in ALLOWED:
                bad.append(f"{module} imports {target}")
    return bad


def package_sources() -> dict[str, str]:
    sources = {}
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(relative.parts)
        if name not in ("ebpo.cli", "ebpo.__main__"):  # the dispatcher names every command (by string, lazily)
            sources[name] = path.read_text()
    return sources


def test_no_command_imports_another():
    sources = package_sources()
    assert any(m.startswith("ebpo.evaluate") for m in sources) and any(m.startswith("ebpo.train.") for m in sources)
    assert layering_violations(sources) == []


def test_evaluate_and_train_do_not_import_each_other():
    for module, source in package_sources().items():
        targets = imported_modules(source, module)
        if command_of(module) == "evaluate":
            assert not any(command_of(t) == "train" for t in targets), f"{module} imports ebpo.train: {sorted(targets)}"
        if command_of(module) == "train":
            assert not any(command_of(t) == "evaluate" for t in targets), (
                f"{module} imports ebpo.evaluate: {sorted(targets)}"
            )


def test_the_layering_check_finds_upward_imports():
    """The scan above can fail: planted imports in each form are reported."""
    planted = {
        "ebpo.train.trainer": "def evaluate():\n    from ebpo.evaluate import main\n",  # function-local
        "ebpo.evaluate.__init__": "from ..train import data\n",  # relative
        "ebpo.simulate.bandit": "import ebpo.compare\n",
        "ebpo.estimators": "from ebpo.train.cli import main\n",  # the core importing a command
        "ebpo.meta.__init__": "from ebpo.train.procs import run_parallel\n",  # allowed
    }
    assert layering_violations(planted) == [
        "ebpo.estimators imports ebpo.train.cli",
        "ebpo.estimators imports ebpo.train.cli.main",
        "ebpo.evaluate.__init__ imports ebpo.train",
        "ebpo.evaluate.__init__ imports ebpo.train.data",
        "ebpo.simulate.bandit imports ebpo.compare",
        "ebpo.train.trainer imports ebpo.evaluate",
        "ebpo.train.trainer imports ebpo.evaluate.main",
    ]
