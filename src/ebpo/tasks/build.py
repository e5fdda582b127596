"""Build a task and its verifier by name: what ``ebpo train`` and ``ebpo eval`` both start from.

Here, below both commands, so that neither imports the other for it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from ebpo.registry import call_with_options, import_from_path
from ebpo.tasks.base import TASKS, Task
from ebpo.verifiers.base import VERIFIERS, Verifier

__all__ = ["DEFAULT_TASK", "build_task", "task_factory", "build_verifier_for", "register_builtin_components"]

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


def task_factory(name: str) -> Callable[..., Task]:
    """What ``name`` builds a task with (called with the task's options): a registered task's factory,
    ``registered:arg`` (that factory with ``arg`` as its first argument), or the object at ``module:attr``."""
    register_builtin_components()
    head, sep, arg = name.partition(":")
    if sep and head in TASKS:  # e.g. reasoning_gym:chain_sum
        return functools.partial(TASKS.get(head), arg)
    if sep:
        return import_from_path(name)
    return TASKS.get(name)  # an unknown name fails here, naming the registered ones


def build_task(name: str, options: dict[str, Any]) -> Task:
    """Resolve ``name`` (see :func:`task_factory`) and build the task with ``options``."""
    task = call_with_options(task_factory(name), options, f"task {name!r}")
    for attr in ("train_problems", "eval_problems", "verifier"):
        if not hasattr(task, attr):
            raise ValueError(f"task {name!r} does not implement {attr!r} (see ebpo.tasks.base.Task)")
    return task


def build_verifier_for(task: Task, override: str | None) -> Verifier:
    register_builtin_components()
    return VERIFIERS.build(override or task.verifier)
