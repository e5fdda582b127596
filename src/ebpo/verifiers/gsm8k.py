"""``gsm8k``: numeric final answers (``#### 1,234``, commas, $ and units, trailing period).

The reference may be a bare number or a full GSM8K solution ending in
``#### N``. The completion's answer is extracted with
:func:`ebpo.verifiers.answers.extract_answer` and compared as an exact
decimal (``3.50`` equals ``3.5``). No number found is a parse error
(``info["parse_error"]``), reward 0. A completion longer than
``max_completion_chars`` is not searched (``info["oversize"]``, reward 0);
Unicode digits become ASCII before extraction (see :mod:`ebpo.verifiers.answers`).
"""

from __future__ import annotations

from ebpo.verifiers.answers import _NUMBER, extract_answer, normalize_digits, parse_number
from ebpo.verifiers.base import VERIFIERS, BadReference, VerifierResult

__all__ = ["GSM8KVerifier"]


@VERIFIERS.register("gsm8k")
class GSM8KVerifier:
    """Reward 1.0 when the completion's final number equals the reference's.

    >>> GSM8KVerifier()("She pays $1,200 in total.", "#### 1200").reward
    1.0
    """

    def __init__(self, max_completion_chars: int = 100_000) -> None:
        if max_completion_chars < 1:
            raise ValueError(f"max_completion_chars must be >= 1, got {max_completion_chars}")
        self.max_completion_chars = max_completion_chars

    def __call__(self, completion: str, reference: str) -> VerifierResult:
        gold_text = extract_answer(reference) if "####" in reference or "boxed" in reference else reference
        gold = parse_number(gold_text or "")
        if gold is None:
            # A reference we cannot read is our bug or the dataset's, never the model's: raise.
            raise BadReference(f"gsm8k reference is not a number: {reference!r}")
        if len(completion) > self.max_completion_chars:  # the guard comes first: extraction never sees a huge input
            return VerifierResult(0.0, {"oversize": 1.0})
        answer = extract_answer(normalize_digits(completion))
        value = parse_number(answer) if answer is not None else None
        if value is None and answer is not None:  # "12 apples and 3 pears": the first number of the answer text
            numbers = _NUMBER.findall(answer)
            value = parse_number(numbers[0]) if numbers else None
        if value is None or not value.is_finite():  # "NaN", "sNaN" (which raises when compared), "Infinity"
            return VerifierResult(0.0, {"parse_error": 1.0})
        return VerifierResult(1.0 if value == gold else 0.0)
