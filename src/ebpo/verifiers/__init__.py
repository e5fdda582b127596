"""Verifiers: completion + reference -> reward (see ``ebpo.verifiers.base``).

Importing this package registers ``exact``, ``gsm8k``, ``math`` (needs the
``math`` extra) and ``code``.
"""

from ebpo.verifiers import code, exact, gsm8k, math_verifier  # noqa: F401  (registration)
from ebpo.verifiers.base import VERIFIERS, VerifierResult, build_verifier, list_verifiers

__all__ = ["VERIFIERS", "VerifierResult", "build_verifier", "list_verifiers"]
