"""``exact``: the completion, stripped of surrounding whitespace, must equal the reference.

The built-in arithmetic task uses it. Only the first line of the completion
counts, so a model that keeps writing after its answer is judged on the
answer (it still pays for the extra tokens through the length of its
output). An empty answer counts as a parse error (``info["parse_error"]``).
"""

from __future__ import annotations

from ebpo.verifiers.base import VERIFIERS, VerifierResult

__all__ = ["ExactMatch"]


@VERIFIERS.register("exact")
class ExactMatch:
    """Reward 1.0 when the first line of the completion equals the reference, else 0.0.

    >>> ExactMatch()(" 42\\nmore", "42").reward
    1.0
    """

    def __call__(self, completion: str, reference: str) -> VerifierResult:
        lines = completion.strip().splitlines()
        answer = lines[0].strip() if lines else ""
        if not answer:
            return VerifierResult(0.0, {"parse_error": 1.0})
        return VerifierResult(1.0 if answer == reference.strip() else 0.0)
