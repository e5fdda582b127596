"""One registry per kind of component.

Every component kind (advantage estimators, weightings, policy losses, loss
aggregations, divergences, verifiers, tasks) is looked up by name through a
:class:`Registry`. A name is either a registered short name (``"ebpo"``) or an
import path ``"package.module:attr"`` naming a user's own factory, so users can
plug in components without touching ebpo. There is exactly one dispatch path:
``registry.build(name, **options)``; nothing is special-cased before it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "import_from_path", "call_with_options"]


def import_from_path(path: str) -> Any:
    """Import ``"package.module:attr"`` and return ``attr``.

    Raises ``ValueError`` (not ImportError/AttributeError) so that bad user
    input always surfaces as one error type with a message naming the path.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"import path must look like 'package.module:attr', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} from {path!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (from {path!r})") from exc
    return obj


class Registry(Generic[T]):
    """Maps names to factories (classes or functions returning a component).

    >>> reg: Registry[int] = Registry("number")
    >>> @reg.register("two")
    ... def make_two() -> int:
    ...     return 2
    >>> reg.build("two")
    2
    >>> reg.names()
    ['two']
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def get(self, name: str) -> Callable[..., T]:
        """Return the factory for ``name`` (short name or ``module:attr`` path)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._factories:
            return self._factories[name]
        if ":" in name:
            factory = import_from_path(name)
            if not callable(factory):
                raise ValueError(f"{self.kind} {name!r} is not callable")
            return factory
        raise ValueError(
            f"unknown {self.kind} {name!r}; choose one of {self.names()} or give an import path 'package.module:attr'"
        )

    def build(self, name: str, **options: Any) -> T:
        return call_with_options(self.get(name), options, f"{self.kind} {name!r}")


def call_with_options(factory: Callable[..., T], options: dict[str, Any], what: str) -> T:
    """``factory(**options)``, with an unknown or missing option reported as a ValueError naming ``what``."""
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        # An unknown or missing keyword is a user error: say which component rejected it.
        raise ValueError(f"bad options for {what}: {exc}") from exc
    except ValueError:  # no introspectable signature (some builtins): let the call speak
        pass
    return factory(**options)
