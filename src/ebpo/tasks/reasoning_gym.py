"""Any reasoning-gym dataset as a task: ``ebpo train --task reasoning_gym:chain_sum``.

`reasoning-gym <https://pypi.org/project/reasoning-gym/>`_ generates
procedural reasoning problems offline, each dataset with its own scorer.
Training and held-out problems come from two seeds (``seed``,
``eval_seed``); held-out prompts that also occur in the training draw are
dropped from training. ``Problem.answer`` carries the whole entry as JSON
(:func:`ebpo.verifiers.reasoning_gym.encode_reference`), which the
``reasoning_gym`` verifier decodes to call the dataset's own ``score_answer``;
``Problem.target`` (what the warm start teaches) is the entry's answer string
as a completion would write it: bare when it is one line, else inside
``<answer>...</answer>`` (the verifier reads the last line or the tag); it is
empty for datasets that store no reference answer (their scorers check a
completion's validity), and the warm start leaves such problems out.
Extra keyword options are the dataset's configuration (``min_terms=2`` for
``chain_sum``), passed to ``reasoning_gym.create_dataset``.
"""

from __future__ import annotations

from typing import Any

from ebpo.tasks.base import TASKS, Problem
from ebpo.verifiers.reasoning_gym import ReasoningGymVerifier, encode_reference, extract_final, require_reasoning_gym

__all__ = [
    "ReasoningGymTask",
    "ReasoningGymVerifier",
    "extract_final",
    "completion_text",
]  # the verifier re-exported for old imports


def completion_text(answer: str) -> str:
    """A completion that states ``answer`` so that :func:`extract_final` reads it back.

    The bare answer when it is one line (short, so it fits a tiny model's
    positions), else wrapped in reasoning-gym's ``<answer>`` tag.

    >>> completion_text("62"), completion_text("1 2\\n3 4")
    ('62', '<answer>1 2\\n3 4</answer>')
    """
    answer = answer.strip()
    return answer if "\n" not in answer else f"<answer>{answer}</answer>"


@TASKS.register("reasoning_gym")
class ReasoningGymTask:
    """Problems of reasoning-gym dataset ``name``.

    Args:
        name: a reasoning-gym dataset name (``chain_sum``, ``leg_counting``, ...).
        size: training problems drawn (before removing overlaps with the held-out set).
        eval_size: held-out problems.
        seed: generator seed of the training set (must differ from ``eval_seed``).
        eval_seed: generator seed of the held-out set.
        template: prompt format with a ``{question}`` field.
        **options: the dataset's own configuration.
    """

    verifier = "reasoning_gym"
    recommended = {"warmstart_steps": 100}
    """``ebpo train`` settings (applied under the preset, YAML and flags): reasoning-gym prompts are several
    times longer than the built-in task's, so the default 300-step warm start took ~3.5 CPU-minutes before the
    first RL step; 100 steps (6 passes over the default 2,000 problems at batch 128) teach the answer format."""

    def __init__(
        self,
        name: str,
        size: int = 2000,
        eval_size: int = 128,
        seed: int = 0,
        eval_seed: int = 1_000_003,
        template: str = "{question}",
        **options: Any,
    ) -> None:
        rg = require_reasoning_gym()
        if not name:
            raise ValueError(
                "reasoning_gym needs a dataset name: --task reasoning_gym:<name>, e.g. reasoning_gym:chain_sum"
            )
        if seed == eval_seed:
            raise ValueError(
                f"reasoning_gym: seed and eval_seed must differ (both {seed}), or held-out problems repeat training ones"
            )
        if size < 1 or eval_size < 1:
            raise ValueError(f"reasoning_gym: size and eval_size must be >= 1, got {size} and {eval_size}")
        self.dataset, self.options, self.template = name, dict(options), template
        self.name = f"reasoning_gym:{name}"
        try:
            train = rg.create_dataset(name, size=size, seed=seed, **options)
            held = rg.create_dataset(name, size=eval_size, seed=eval_seed, **options)
        except (KeyError, TypeError, ValueError) as exc:  # reasoning-gym's "not registered" / bad config errors
            raise ValueError(f"reasoning-gym cannot create dataset {name!r} with options {options}: {exc}") from exc
        self._eval = [self._problem(entry, "eval", i) for i, entry in enumerate(held)]
        seen = {p.prompt for p in self._eval}
        self._train = [
            p for p in (self._problem(entry, "train", i) for i, entry in enumerate(train)) if p.prompt not in seen
        ]
        if not self._train:
            raise ValueError(
                f"reasoning_gym:{name}: every training problem also occurs in the held-out set; raise size"
            )

    def _problem(self, entry: dict[str, Any], split: str, index: int) -> Problem:
        prompt = self.template.format(question=entry["question"])
        return Problem(
            id=f"{self.dataset}-{split}-{index}",
            prompt=prompt,
            answer=encode_reference(self.dataset, entry, self.options),
            # Some datasets (graph_color, rush_hour, ...) accept many answers and store none: no supervised text ("").
            target="" if entry.get("answer") is None else completion_text(str(entry["answer"])),
        )

    def train_problems(self) -> list[Problem]:
        return self._train

    def eval_problems(self) -> list[Problem]:
        return self._eval
