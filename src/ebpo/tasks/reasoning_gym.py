"""Any reasoning-gym dataset as a task: ``ebpo train --task reasoning_gym:chain_sum``.

`reasoning-gym <https://pypi.org/project/reasoning-gym/>`_ generates
procedural reasoning problems offline, each dataset with its own scorer.
Training and held-out problems come from two seeds. A scorer needs the whole
dataset entry (question, answer, metadata), not just the answer string, so
``Problem.answer`` carries the entry as JSON (``{"dataset": name, "entry":
{...}}``) and the ``reasoning_gym`` verifier decodes it and calls the
dataset's own ``score_answer``. The completion's answer is the text inside
``<answer>...</answer>`` when present, else its last non-empty line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ebpo.tasks.base import TASKS, Problem
from ebpo.verifiers.base import VERIFIERS, VerifierResult

__all__ = ["ReasoningGymTask", "ReasoningGymVerifier"]

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _require() -> Any:
    try:
        import reasoning_gym
    except ImportError as exc:
        raise ValueError("reasoning-gym tasks need the reasoning-gym package: pip install 'ebpo[gym]'") from exc
    return reasoning_gym


@TASKS.register("reasoning_gym")
@dataclass
class ReasoningGymTask:
    """Problems of reasoning-gym dataset ``dataset`` (options go to ``reasoning_gym.create_dataset``)."""

    dataset: str
    size: int = 2000
    eval_size: int = 128
    seed: int = 0
    eval_seed: int = 1_000_003
    options: dict[str, Any] = field(default_factory=dict)
    verifier: str = field(default="reasoning_gym", init=False)

    def __post_init__(self) -> None:
        rg = _require()
        if not self.dataset:
            raise ValueError("reasoning_gym needs a dataset name: --task reasoning_gym:<name>, e.g. reasoning_gym:chain_sum")
        self.name = f"reasoning_gym:{self.dataset}"
        try:
            train = rg.create_dataset(self.dataset, size=self.size, seed=self.seed, **self.options)
            held = rg.create_dataset(self.dataset, size=self.eval_size, seed=self.eval_seed, **self.options)
        except (KeyError, ValueError) as exc:  # reasoning-gym's own "no such dataset" / bad option errors
            raise ValueError(f"reasoning-gym cannot create dataset {self.dataset!r}: {exc}") from exc
        self._eval = [self._problem(e, "eval", i) for i, e in enumerate(held)]
        seen = {p.prompt for p in self._eval}
        self._train = [p for p in (self._problem(e, "train", i) for i, e in enumerate(train)) if p.prompt not in seen]

    def _problem(self, entry: dict[str, Any], split: str, index: int) -> Problem:
        reference = json.dumps({"dataset": self.dataset, "entry": entry}, default=str)
        return Problem(id=f"{self.dataset}-{split}-{index}", prompt=str(entry["question"]), answer=reference)

    def train_problems(self) -> list[Problem]:
        return self._train

    def eval_problems(self) -> list[Problem]:
        return self._eval


@lru_cache(maxsize=64)
def _scorer(dataset: str) -> Any:
    return _require().get_score_answer_fn(dataset)


def extract_final(completion: str) -> str:
    tagged = _ANSWER_TAG.findall(completion)
    if tagged:
        return tagged[-1].strip()
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@VERIFIERS.register("reasoning_gym")
class ReasoningGymVerifier:
    """Scores with the dataset's own ``score_answer`` (rewards in [0, 1])."""

    def __call__(self, completion: str, reference: str) -> VerifierResult:
        try:
            spec = json.loads(reference)
            dataset, entry = spec["dataset"], spec["entry"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"reasoning_gym reference must be JSON with 'dataset' and 'entry': {reference[:200]!r}") from exc
        answer = extract_final(completion)
        if not answer:
            return VerifierResult(0.0, {"parse_error": 1.0})
        return VerifierResult(float(_scorer(dataset)(answer, entry)))
