"""Final-answer extraction shared by the ``math`` and ``gsm8k`` verifiers.

Order of preference (the conventions of MATH / DAPO-Math and GSM8K):
the last ``\\boxed{...}`` (nested braces balanced), else ``#### X``, else
"the answer is X" / "final answer: X", else the last number in the text.

Extraction is linear in the text's length (no regular expression here can
backtrack quadratically), and callers check the completion's length against
their size guard before extracting. :func:`normalize_digits` turns every
Unicode decimal digit (fullwidth ``１``, Arabic-Indic ``١``, mathematical bold
``𝟏``, ...) into its ASCII digit first, so no digit can reach a parser that
chokes on it.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal, InvalidOperation

__all__ = ["last_boxed", "extract_answer", "parse_number", "normalize_digits"]

# One run of separators after "is"/":" ([:\s]*), not two adjacent ones (\s*[:\s]*) that could
# split a run of n newlines n ways: that made "The answer is" + "\n" * 40000 take ~30 s.
_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:)[:\s]*([^\n]+)", re.IGNORECASE)
_HASHES = re.compile(r"####\s*([^\n]+)")
_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_digits(text: str) -> str:
    """NFKC (fullwidth digits and punctuation become ASCII), then any remaining Unicode decimal digit to ASCII.

    >>> normalize_digits("１２．５ ١٢٣ 𝟒𝟐")
    '12.5 123 42'
    """
    if text.isascii():
        return text
    text = unicodedata.normalize("NFKC", text)
    if text.isascii():
        return text
    return "".join(
        str(unicodedata.decimal(c)) if not c.isascii() and unicodedata.category(c) == "Nd" else c for c in text
    )


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, else None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):  # a scan over characters: brace matching is inherently sequential
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None  # unbalanced: malformed output


def extract_answer(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_HASHES, _ANSWER_IS):
        matches = pattern.findall(text)
        if matches:
            return matches[-1].strip().rstrip(".").strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].strip() if numbers else None


_UNITS = re.compile(
    r"(?i)\b(dollars?|cents?|usd|percent|hours?|minutes?|meters?|km|kg|pounds?|miles?|units?|years?|days?)\b"
)


def parse_number(text: str) -> Decimal | None:
    """A number from an answer string: ``$1,234.50`` -> 1234.50, ``-7.`` -> -7, ``45%`` -> 45; else None."""
    cleaned = _UNITS.sub("", text)
    cleaned = cleaned.replace(",", "").replace("$", "").replace("%", "").replace("\\%", "").strip()
    cleaned = cleaned.rstrip(".").strip()
    if cleaned.startswith("\\text{") or not cleaned:
        return None
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None
