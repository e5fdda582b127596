"""The verifier interface and its registry.

A verifier turns one completion and its reference answer into a reward.
Signature: ``verifier(completion: str, reference: str) -> VerifierResult``.
``reward`` is a float (usually 0.0 or 1.0), or ``None`` to skip the sample
(as TRL reward functions may return ``None``). ``info`` carries diagnostics
(``{"parse_error": 1.0}``, ``{"timeout": 1.0}``) that the trainer sums into
``verifier/*`` metrics. Verifiers catch only the errors they expect (parse
failures, time-outs) and count them; anything else raises (STYLE.md #9).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ebpo.registry import Registry

__all__ = ["VerifierResult", "Verifier", "VERIFIERS", "build_verifier", "list_verifiers"]


@dataclass(frozen=True)
class VerifierResult:
    reward: float | None
    info: dict[str, float] = field(default_factory=dict)


class Verifier(Protocol):
    def __call__(self, completion: str, reference: str) -> VerifierResult: ...


VERIFIERS: Registry[Verifier] = Registry("verifier")


def build_verifier(name: str, **options: object) -> Verifier:
    return VERIFIERS.build(name, **options)


def list_verifiers() -> list[str]:
    return VERIFIERS.names()
