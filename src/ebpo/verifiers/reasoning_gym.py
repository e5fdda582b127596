"""``reasoning_gym``: score with a reasoning-gym dataset's own ``score_answer``.

A reasoning-gym scorer needs the whole dataset entry (question, answer,
metadata), not only the answer string, so the reference is JSON::

    {"dataset": "chain_sum", "options": {...}, "entry": {"question": ..., "answer": ..., "metadata": {...}}}

(:class:`ebpo.tasks.reasoning_gym.ReasoningGymTask` writes it into
``Problem.answer``; ``options`` is the dataset configuration the entry was
generated with, optional, since a few scorers read their configuration). The
completion's answer is the text inside the last ``<answer>...</answer>``
(reasoning-gym's convention), else its last non-empty line. Rewards are the
scorer's, in [0, 1] (some datasets give partial credit). An empty answer is
a parse error (``info["parse_error"]``); a malformed reference raises.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from ebpo.verifiers.base import VERIFIERS, BadReference, VerifierResult

__all__ = ["ReasoningGymVerifier", "extract_final", "encode_reference", "require_reasoning_gym"]

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def require_reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError as exc:
        raise ValueError("reasoning-gym tasks need the reasoning-gym package: pip install 'ebpo[gym]'") from exc
    return reasoning_gym


def encode_reference(dataset: str, entry: dict[str, Any], options: dict[str, Any] | None = None) -> str:
    """The reference string for one entry (tuples kept as ``{"__tuple__": [...]}``; other objects become their ``str``).

    Tuples survive the round trip because some scorers compare with ``==``
    against metadata tuples (``arc_agi``/``rearc`` boards: a list never equals
    the parsed tuple board, and the right answer scored 0.05).
    """
    return json.dumps(
        {"dataset": dataset, "options": options or {}, "entry": _tag_tuples(entry)}, default=str, sort_keys=True
    )


def _tag_tuples(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": [_tag_tuples(v) for v in value]}
    if isinstance(value, list):
        return [_tag_tuples(v) for v in value]
    if isinstance(value, dict):
        return {k: _tag_tuples(v) for k, v in value.items()}
    return value


def _untag_tuples(obj: dict[str, Any]) -> Any:
    return tuple(obj["__tuple__"]) if set(obj) == {"__tuple__"} else obj


def extract_final(completion: str) -> str:
    """The last ``<answer>...</answer>``, else the last non-empty line.

    >>> extract_final("thinking...\\n<answer> 42 </answer>")
    '42'
    """
    tagged = _ANSWER_TAG.findall(completion)
    if tagged:
        return tagged[-1].strip()
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@lru_cache(maxsize=256)
def _scorer(dataset: str, options_json: str) -> Callable[[str, dict[str, Any]], float]:
    # Building a dataset is cheap (entries are generated on access); cache one per configuration.
    rg = require_reasoning_gym()
    try:
        return rg.create_dataset(dataset, size=1, seed=0, **json.loads(options_json)).score_answer
    except (KeyError, TypeError) as exc:
        raise BadReference(f"reasoning-gym cannot build dataset {dataset!r} to score with: {exc}") from exc


@VERIFIERS.register("reasoning_gym")
class ReasoningGymVerifier:
    """Scores with the dataset's own ``score_answer`` (rewards in [0, 1]); see the module docstring."""

    def __call__(self, completion: str, reference: str) -> VerifierResult:
        try:
            spec = json.loads(reference, object_hook=_untag_tuples)
            dataset, entry = spec["dataset"], spec["entry"]
            options = {k: v for k, v in spec.get("options", {}).items() if k not in ("size", "seed")}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise BadReference(
                f"reasoning_gym reference must be JSON with 'dataset' and 'entry': {reference[:200]!r}"
            ) from exc
        answer = extract_final(completion)
        if not answer:
            return VerifierResult(0.0, {"parse_error": 1.0})
        return VerifierResult(float(_scorer(dataset, json.dumps(options, sort_keys=True))(answer, entry)))
