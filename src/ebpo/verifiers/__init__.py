"""Verifiers: completion + reference -> reward (see ``ebpo.verifiers.base``).

Importing this package registers ``gsm8k``, ``math`` (needs the ``math``
extra at call time), ``code``, ``reasoning_gym`` (needs the ``gym`` extra at
call time) and, when present, ``exact``.
"""

import importlib
import importlib.util

from ebpo.verifiers import code, gsm8k, math_verifier, reasoning_gym  # noqa: F401  (registration)
from ebpo.verifiers.base import VERIFIERS, VerifierResult, build_verifier, list_verifiers

# ``exact`` belongs to the built-in task and may be absent from a partial install.
if importlib.util.find_spec("ebpo.verifiers.exact") is not None:
    importlib.import_module("ebpo.verifiers.exact")

__all__ = ["VERIFIERS", "VerifierResult", "build_verifier", "list_verifiers"]
