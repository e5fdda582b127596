"""Verifiers: completion + reference -> reward (see ``ebpo.verifiers.base``).

Importing this package registers ``exact``, ``gsm8k``, ``math`` (needs the
``math`` extra), ``code`` and ``reasoning_gym`` (needs the ``gym`` extra).
"""

from ebpo.verifiers import code, exact, gsm8k, math_verifier  # noqa: F401  (registration)
import ebpo.tasks.reasoning_gym  # noqa: F401,E402  (registers the reasoning_gym verifier)
from ebpo.verifiers.base import VERIFIERS, VerifierResult, build_verifier, list_verifiers

__all__ = ["VERIFIERS", "VerifierResult", "build_verifier", "list_verifiers"]
