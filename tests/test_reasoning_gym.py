"""reasoning-gym datasets as tasks, generated offline and scored by each dataset's own scorer."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("reasoning_gym")

from ebpo.tasks import TASKS  # noqa: E402
from ebpo.tasks.build import build_task  # noqa: E402
from ebpo.verifiers import build_verifier  # noqa: E402
from ebpo.verifiers.reasoning_gym import extract_final  # noqa: E402


def _gold(problem) -> str:
    return json.loads(problem.answer)["entry"]["answer"]


def test_task_generates_offline_and_its_verifier_scores_the_datasets_answer():
    task = TASKS.get("reasoning_gym")("chain_sum", size=50, eval_size=10)
    assert task.name == "reasoning_gym:chain_sum" and task.verifier == "reasoning_gym"
    assert len(task.eval_problems()) == 10 and 0 < len(task.train_problems()) <= 50
    assert not {p.prompt for p in task.train_problems()} & {p.prompt for p in task.eval_problems()}
    verifier = build_verifier(task.verifier)
    for problem in task.eval_problems()[:5]:
        answer = _gold(problem)
        assert verifier(f"let me think\n{answer}", problem.answer).reward == 1.0  # last line
        assert verifier(f"<answer>{answer}</answer> trailing", problem.answer).reward == 1.0  # tagged
        assert verifier("<answer>999999999</answer>", problem.answer).reward == 0.0  # wrong
    assert verifier("", task.eval_problems()[0].answer).info == {"parse_error": 1.0}


def test_the_trainer_resolves_name_colon_dataset_with_options():
    task = build_task(
        "reasoning_gym:chain_sum", {"size": 20, "eval_size": 5, "seed": 3, "min_terms": 2, "max_terms": 2}
    )
    assert len(task.eval_problems()) == 5
    # the dataset's own option reached the generator: two terms, one operator
    assert all(len(json.loads(p.answer)["entry"]["metadata"]["expression"].split()) == 3 for p in task.train_problems())
    again = build_task(
        "reasoning_gym:chain_sum", {"size": 20, "eval_size": 5, "seed": 3, "min_terms": 2, "max_terms": 2}
    )
    assert [p.prompt for p in again.train_problems()] == [p.prompt for p in task.train_problems()]  # seeded


@pytest.mark.parametrize(
    "dataset", ["chain_sum", "basic_arithmetic", "leg_counting", "spell_backward", "word_sorting", "letter_counting"]
)
def test_own_answers_survive_the_json_reference(dataset):
    # The reference round-trips the entry through JSON (tuples -> lists); the scorer must still accept its own answer.
    task = TASKS.get("reasoning_gym")(dataset, size=8, eval_size=4)
    verifier = build_verifier("reasoning_gym")
    for problem in task.eval_problems():
        assert verifier(f"<answer>{_gold(problem)}</answer>", problem.answer).reward == 1.0
        assert verifier("<answer>definitely not it 12345</answer>", problem.answer).reward < 1.0


def test_extract_final():
    assert extract_final("a\n<answer>1</answer>\n<answer> 2 </answer>") == "2"
    assert extract_final("work\n\n  17  \n") == "17"
    assert extract_final("   ") == ""


def test_errors():
    with pytest.raises(ValueError, match="cannot create dataset 'no_such_gym'"):
        TASKS.get("reasoning_gym")("no_such_gym")
    with pytest.raises(ValueError, match="cannot create dataset 'chain_sum'"):
        TASKS.get("reasoning_gym")("chain_sum", not_an_option=1)
    with pytest.raises(ValueError, match="must differ"):
        TASKS.get("reasoning_gym")("chain_sum", seed=1, eval_seed=1)
    with pytest.raises(ValueError, match="must be JSON with 'dataset' and 'entry'"):
        build_verifier("reasoning_gym")("<answer>1</answer>", "1")
