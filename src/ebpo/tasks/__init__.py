"""Tasks: problem sources paired with a verifier name (see ``ebpo.tasks.base``).

Importing this package registers the built-in ``arithmetic`` and ``stepwise`` tasks
(``stepwise`` also registers its verifier), the
``dataset`` task (benchmark files, :mod:`ebpo.data`) and ``reasoning_gym``.
"""

from ebpo.tasks.base import TASKS, Problem, Task  # noqa: I001  (base first: the modules below register into it)
from ebpo.tasks import arithmetic, reasoning_gym, stepwise  # noqa: F401  (registration)
import ebpo.data  # noqa: F401  (registers the 'dataset' task)

__all__ = ["TASKS", "Problem", "Task"]
