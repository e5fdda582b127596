"""Tasks: problem sources paired with a verifier name (see ``ebpo.tasks.base``)."""

from ebpo.tasks.base import TASKS, Problem, Task

__all__ = ["TASKS", "Problem", "Task"]
