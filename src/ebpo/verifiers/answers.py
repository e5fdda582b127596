"""Final-answer extraction shared by the ``math`` and ``gsm8k`` verifiers.

Order of preference (the conventions of MATH / DAPO-Math and GSM8K):
the last ``\\boxed{...}`` (nested braces balanced), else ``#### X``, else
"the answer is X" / "final answer: X", else the last number in the text.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["last_boxed", "extract_answer", "parse_number"]

_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*[:\s]*([^\n]+)", re.IGNORECASE)
_HASHES = re.compile(r"####\s*([^\n]+)")
_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\.\d+")


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


_UNITS = re.compile(r"(?i)\b(dollars?|cents?|usd|percent|hours?|minutes?|meters?|km|kg|pounds?|miles?|units?|years?|days?)\b")


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
