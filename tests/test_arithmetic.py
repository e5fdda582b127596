"""The built-in arithmetic task and the ``exact`` verifier."""

from __future__ import annotations

import operator
from functools import reduce

import pytest

from ebpo.tasks.arithmetic import ArithmeticTask
from ebpo.tasks.base import TASKS
from ebpo.verifiers.base import VERIFIERS
from ebpo.verifiers.exact import ExactMatch


def _oracle(prompt: str) -> str:
    """Independent evaluation of 'a+b+c=' / 'a*b=' by splitting on the operator."""
    body = prompt.rstrip("=")
    op = "*" if "*" in body else "+"
    numbers = [int(x) for x in body.split(op)]
    return str(reduce(operator.mul if op == "*" else operator.add, numbers))


def test_answers_match_an_independent_evaluation():
    task = ArithmeticTask(num_train=2000, num_eval=200)
    for problem in task.train_problems() + task.eval_problems():
        assert problem.answer == _oracle(problem.prompt), problem


def test_shapes_cover_the_declared_range_and_difficulty_spreads():
    task = ArithmeticTask(num_train=3000, num_eval=10)
    problems = task.train_problems()
    terms = {p.prompt.count("+") + p.prompt.count("*") + 1 for p in problems}
    assert terms == {1, 2, 3}
    digits = {len(n) for p in problems for n in p.prompt.rstrip("=").replace("*", "+").split("+")}
    assert digits == {1, 2, 3}
    difficulties = sorted({p.difficulty for p in problems})
    assert difficulties[0] == 0.0 and difficulties[-1] == 1.0 and len(difficulties) == 6
    # Hardest shape: a product of three 3-digit numbers.
    hardest = [p for p in problems if p.difficulty == 1.0]
    assert all(p.topic == "mul-3x3" for p in hardest)


def test_held_out_set_is_fixed_and_disjoint_from_training():
    a = ArithmeticTask(num_train=3000, num_eval=100, seed=1)
    b = ArithmeticTask(num_train=3000, num_eval=100, seed=2)
    assert [p.prompt for p in a.eval_problems()] == [
        p.prompt for p in b.eval_problems()
    ]  # independent of the train seed
    assert [p.prompt for p in a.train_problems()] != [p.prompt for p in b.train_problems()]
    held_out = {p.prompt for p in a.eval_problems()}
    assert not held_out & {p.prompt for p in a.train_problems()}


def test_registered_and_bad_options_rejected():
    assert "arithmetic" in TASKS.names() and "exact" in VERIFIERS.names()
    with pytest.raises(ValueError, match="ops"):
        ArithmeticTask(ops="-")
    with pytest.raises(ValueError, match="max_terms"):
        ArithmeticTask(max_terms=0)


@pytest.mark.parametrize(
    ("completion", "reference", "reward"),
    [
        ("42", "42", 1.0),
        (" 42 \n", "42", 1.0),
        ("42\n7", "42", 1.0),
        ("420", "42", 0.0),
        ("4 2", "42", 0.0),
        ("-42", "42", 0.0),
    ],
)
def test_exact_verifier(completion, reference, reward):
    assert ExactMatch()(completion, reference).reward == reward


def test_exact_verifier_counts_empty_answers_as_parse_errors():
    result = ExactMatch()("  \n", "3")
    assert result.reward == 0.0 and result.info == {"parse_error": 1.0}


def test_excluded_held_out_sets_leave_both_splits_and_fix_the_training_set():
    validation = ArithmeticTask(num_train=300, eval_seed=424_242, exclude_eval_seeds=(1_000_003,))
    final = ArithmeticTask(num_train=300, exclude_eval_seeds=(424_242,))
    plain = ArithmeticTask(num_train=300)
    final_prompts = {p.prompt for p in plain.eval_problems()}
    assert [p.prompt for p in final.eval_problems()] == [
        p.prompt
        for p in plain.eval_problems()
        if p.prompt not in {q.prompt for q in ArithmeticTask(num_train=300, eval_seed=424_242).eval_problems()}
    ]
    assert not final_prompts & {p.prompt for p in validation.eval_problems()}  # validation never sees the final set
    assert not {p.prompt for p in validation.eval_problems()} & {p.prompt for p in final.train_problems()}
    assert [p.prompt for p in validation.train_problems()] == [p.prompt for p in final.train_problems()]
    assert not final_prompts & {p.prompt for p in plain.train_problems()}
