"""``gsm8k``: numeric final answers (``#### 1,234``, commas, $ and units, trailing period).

The reference may be a bare number or a full GSM8K solution ending in
``#### N``. The completion's answer is extracted with
:func:`ebpo.verifiers.answers.extract_answer` and compared as an exact
decimal (``3.50`` equals ``3.5``). No number found is a parse error
(``info["parse_error"]``), reward 0.
"""

from __future__ import annotations

from ebpo.verifiers.answers import _NUMBER, extract_answer, parse_number
from ebpo.verifiers.base import VERIFIERS, VerifierResult

__all__ = ["GSM8KVerifier"]


@VERIFIERS.register("gsm8k")
class GSM8KVerifier:
    """Reward 1.0 when the completion's final number equals the reference's.

    >>> GSM8KVerifier()("She pays $1,200 in total.", "#### 1200").reward
    1.0
    """

    def __call__(self, completion: str, reference: str) -> VerifierResult:
        gold_text = extract_answer(reference) if "####" in reference or "boxed" in reference else reference
        gold = parse_number(gold_text or "")
        if gold is None:
            # A reference we cannot read is our bug or the dataset's, never the model's: raise.
            raise ValueError(f"gsm8k reference is not a number: {reference!r}")
        answer = extract_answer(completion)
        value = parse_number(answer) if answer is not None else None
        if value is None and answer is not None:  # "12 apples and 3 pears": the first number of the answer text
            numbers = _NUMBER.findall(answer)
            value = parse_number(numbers[0]) if numbers else None
        if value is None:
            return VerifierResult(0.0, {"parse_error": 1.0})
        return VerifierResult(1.0 if value == gold else 0.0)
