"""The verifier interface and its registry.

A verifier turns one completion and its reference answer into a reward.
Signature: ``verifier(completion: str, reference: str) -> VerifierResult``.
``reward`` is a float (usually 0.0 or 1.0), or ``None`` to skip the sample
(as TRL reward functions may return ``None``). ``info`` carries diagnostics
(``{"parse_error": 1.0}``, ``{"timeout": 1.0}``) that the trainer sums into
``verifier/*`` metrics. Verifiers catch only the errors they expect (parse
failures, time-outs) and count them; anything else raises (STYLE.md #9).

Every verifier built through the registry (:func:`build_verifier`,
``VERIFIERS.build``, so the trainer's, the evaluator's and a user's own
``package.module:attr`` ones alike) is wrapped in :class:`GuardedVerifier`: an
exception that the *completion* triggers becomes reward 0, counted as
``info["error"]`` (``verifier/error`` in the trainer's metrics) and sampled in
the log, so no completion can end a training run. A reference the verifier
cannot use is the dataset's problem, not the policy's: verifiers raise
:class:`BadReference` (a ``ValueError``) for it, and a call that can never work
(a misuse) :class:`VerifierMisuse` (a ``RuntimeError``); those two are re-raised. A
verifier that errors on more than half of the last 200 completions logs a
warning every 200 calls: that is a verifier bug, not a policy failure.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from ebpo.registry import Registry

__all__ = [
    "VerifierResult",
    "Verifier",
    "NotTheCompletion",
    "BadReference",
    "VerifierMisuse",
    "GuardedVerifier",
    "VERIFIERS",
    "build_verifier",
    "list_verifiers",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifierResult:
    """One completion's score."""

    reward: float | None
    """Usually 0.0 or 1.0; None skips the sample (as a TRL reward function may)."""
    info: dict[str, float] = field(default_factory=dict)
    """Diagnostics the trainer sums into ``verifier/*`` metrics (``{"parse_error": 1.0}``)."""


class Verifier(Protocol):
    """What a registered verifier implements: any callable with this signature (a function will do).

    Registered with ``@VERIFIERS.register("name")`` or named by import path (``--verifier
    package.module:attr``); the registry wraps it in :class:`GuardedVerifier` (see the module docstring for
    which exceptions end a run and which score 0).
    """

    def __call__(self, completion: str, reference: str) -> VerifierResult:
        """Score ``completion`` (the model's text, without the prompt) against ``reference`` (the problem's
        ``answer``); raise :class:`BadReference` when the reference, not the completion, is unusable."""
        ...


class NotTheCompletion(Exception):
    """Scoring failed for a reason no completion caused: :class:`GuardedVerifier` re-raises these."""


class BadReference(NotTheCompletion, ValueError):
    """The reference (not the completion) cannot be scored."""


class VerifierMisuse(NotTheCompletion, RuntimeError):
    """The verifier is called in a way that can never work (e.g. a SIGALRM limit outside the main thread)."""


class GuardedVerifier:
    """A verifier whose completion-triggered exceptions become reward 0 (see the module docstring).

    Attributes of the wrapped verifier stay reachable (``guarded.layers``, ``guarded.close()``).

    >>> def picky(completion, reference):
    ...     if not reference.isdigit():
    ...         raise BadReference(f"not a number: {reference!r}")
    ...     return VerifierResult(float(int(completion) == int(reference)))
    >>> guarded = GuardedVerifier(picky, "picky")
    >>> guarded("7", "7"), guarded("seven", "7")
    (VerifierResult(reward=1.0, info={}), VerifierResult(reward=0.0, info={'error': 1.0}))
    >>> guarded("7", "seven")
    Traceback (most recent call last):
    ebpo.verifiers.base.BadReference: not a number: 'seven'
    """

    def __init__(
        self, verifier: Verifier, name: str, window: int = 200, warn_error_rate: float = 0.5, logged_samples: int = 5
    ) -> None:
        self.verifier, self.name = verifier, name
        self.window, self.warn_error_rate, self.logged_samples = window, warn_error_rate, logged_samples
        self.calls = self.errors = 0
        self._recent: deque[bool] = deque(maxlen=window)

    def __call__(self, completion: str, reference: str) -> VerifierResult:
        self.calls += 1
        try:
            result = self.verifier(completion, reference)
        except NotTheCompletion:
            raise
        except Exception as error:  # noqa: BLE001  (counted, logged, and loud when frequent)
            self._record(True)
            self.errors += 1
            if self.errors <= self.logged_samples or self.errors % 100 == 0:
                logger.warning(
                    "verifier %r raised %s: %s on a completion (reward 0, counted in verifier/error; %d so far); completion starts %r",
                    self.name,
                    type(error).__name__,
                    str(error)[:300],
                    self.errors,
                    completion[:200],
                )
            return VerifierResult(0.0, {"error": 1.0})
        self._record(False)
        return result

    def _record(self, errored: bool) -> None:
        self._recent.append(errored)
        if len(self._recent) == self.window and self.calls % self.window == 0:
            rate = sum(self._recent) / self.window
            if rate > self.warn_error_rate:
                logger.warning(
                    "verifier %r raised on %.0f%% of the last %d completions: that points at the verifier or the "
                    "references, not the policy (see the samples logged above)",
                    self.name,
                    100 * rate,
                    self.window,
                )

    def __getattr__(self, name: str) -> Any:
        if name == "verifier" or name.startswith("__"):  # unpickling and copying look these up before __init__
            raise AttributeError(name)
        return getattr(self.verifier, name)


class _VerifierRegistry(Registry[Verifier]):
    """The verifier registry: whatever it builds comes out wrapped in :class:`GuardedVerifier`."""

    def build(self, name: str, **options: Any) -> Verifier:
        verifier = super().build(name, **options)
        return verifier if isinstance(verifier, GuardedVerifier) else GuardedVerifier(verifier, name)


VERIFIERS: Registry[Verifier] = _VerifierRegistry("verifier")


def build_verifier(name: str, **options: object) -> Verifier:
    return VERIFIERS.build(name, **options)


def list_verifiers() -> list[str]:
    return VERIFIERS.names()
