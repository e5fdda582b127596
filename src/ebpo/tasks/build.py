"""Build a task and its verifier by name: what ``ebpo train`` and ``ebpo eval`` both start from.

Here, below both commands, so that neither imports the other for it.
"""

from __future__ import annotations

import importlib
from typing import Any

from ebpo.registry import import_from_path
from ebpo.tasks.base import TASKS, Task
from ebpo.verifiers.base import VERIFIERS, Verifier

__all__ = ["DEFAULT_TASK", "build_task", "build_verifier_for", "register_builtin_components"]

DEFAULT_TASK = "stepwise"
"""The built-in task ``ebpo train`` trains and ``ebpo eval`` evaluates when none is named (docs/testbed.md)."""

# Modules whose import registers built-in tasks and verifiers. The optional
# ones belong to other parts of ebpo and may be absent in a given install.
_BUILTIN_MODULES = ("ebpo.tasks.arithmetic", "ebpo.verifiers.exact")
_OPTIONAL_MODULES = ("ebpo.verifiers", "ebpo.tasks")


def register_builtin_components() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    for module in _OPTIONAL_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a missing dependency inside the module is a real error
                raise


def build_task(name: str, options: dict[str, Any]) -> Task:
    """Resolve ``name``: a registered task, ``registered:arg`` (the factory gets ``arg``), or ``module:attr``."""
    register_builtin_components()
    head, sep, arg = name.partition(":")
    if sep and head in TASKS:
        # e.g. reasoning_gym:chain_sum -> the reasoning_gym factory with its first argument.
        task = TASKS.get(head)(arg, **options)
    elif sep:
        task = import_from_path(name)(**options)
    else:
        task = TASKS.build(name, **options)
    for attr in ("train_problems", "eval_problems", "verifier"):
        if not hasattr(task, attr):
            raise ValueError(f"task {name!r} does not implement {attr!r} (see ebpo.tasks.base.Task)")
    return task


def build_verifier_for(task: Task, override: str | None) -> Verifier:
    register_builtin_components()
    return VERIFIERS.build(override or task.verifier)
