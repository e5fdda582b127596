"""reasoning-gym datasets as tasks, scored by their own scorers."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("reasoning_gym")

from ebpo.tasks import TASKS  # noqa: E402
from ebpo.verifiers import build_verifier  # noqa: E402


def test_task_generates_offline_and_its_verifier_scores_the_datasets_answer():
    task = TASKS.get("reasoning_gym")("chain_sum", size=50, eval_size=10)
    assert task.verifier == "reasoning_gym" and len(task.eval_problems()) == 10
    assert not {p.prompt for p in task.train_problems()} & {p.prompt for p in task.eval_problems()}
    verifier = build_verifier("reasoning_gym")
    for problem in task.eval_problems()[:5]:
        answer = json.loads(problem.answer)["entry"]["answer"]
        assert verifier(f"let me think\n{answer}", problem.answer).reward == 1.0
        assert verifier(f"<answer>{answer}</answer> trailing", problem.answer).reward == 1.0
        assert verifier("999999999", problem.answer).reward == 0.0
    assert verifier("", task.eval_problems()[0].answer).info == {"parse_error": 1.0}


def test_unknown_dataset_raises():
    with pytest.raises(ValueError, match="cannot create dataset 'no_such_gym'"):
        TASKS.get("reasoning_gym")("no_such_gym")
