"""The built-in reasoning task ``stepwise`` and its final-answer verifier."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from ebpo.models.loading import TinyLlamaSpec
from ebpo.models.tokenizer import CharTokenizer
from ebpo.tasks.base import TASKS
from ebpo.tasks.build import build_task, build_verifier_for
from ebpo.tasks.stepwise import DEFAULT_PLAIN_SLIP_RATE, DEFAULT_SLIP_RATE, TOPICS, StepwiseTask, StepwiseVerifier
from ebpo.verifiers.base import VERIFIERS

SMALL = dict(
    num_train=2000, num_eval=200, slip_rate=0.0, plain_slip_rate=0.0
)  # clean derivations; slips are tested on their own


@pytest.fixture(scope="module")
def task() -> StepwiseTask:
    return StepwiseTask(**SMALL)


def _oracle(prompt: str) -> int:
    """Independent left-to-right evaluation of 'a*b+c-d=' by tokenising numbers and operators."""
    tokens = re.findall(r"\d+|[-+*]", prompt.rstrip("="))
    value = int(tokens[0])
    for op, number in zip(tokens[1::2], tokens[2::2]):
        value = {"+": value + int(number), "-": value - int(number), "*": value * int(number)}[op]
    return value


def _checked_steps(target: str) -> bool:
    """Every step 'a op b = c' of a derivation holds, and each step starts from the previous result."""
    *steps, final = target.split(";")
    previous = None
    for step in steps:
        left, result = step.split("=")
        a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)", left).groups()
        if previous is not None and int(a) != previous:
            return False
        if {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] != int(result):
            return False
        previous = int(result)
    return final == f"#{previous}"


def test_generation_is_deterministic_by_seed():
    a, b, c = StepwiseTask(**SMALL), StepwiseTask(**SMALL), StepwiseTask(**SMALL, seed=1)
    assert a.train_problems() == b.train_problems() and a.eval_problems() == b.eval_problems()
    assert [p.prompt for p in a.train_problems()] != [p.prompt for p in c.train_problems()]


def test_answers_and_derivations_match_an_independent_evaluation(task):
    for problem in task.train_problems() + task.eval_problems():
        assert int(problem.answer) == _oracle(problem.prompt) >= 0, problem
        assert _checked_steps(problem.target), problem
        assert problem.target.endswith(f"#{problem.answer}")


def test_every_target_scores_one_with_the_task_verifier(task):
    verifier = build_verifier_for(task, None)
    assert isinstance(verifier.verifier, StepwiseVerifier)  # inside the registry's error guard
    for problem in task.train_problems() + task.eval_problems():
        assert verifier(problem.completion_target, problem.answer).reward == 1.0, problem


def _steps(problem) -> list[tuple[int, str, int, int]]:
    """(a, op, b, written result) of each step of the problem's derivation."""
    out = []
    for step in problem.target.split(";")[:-1]:
        left, result = step.split("=")
        a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)", left).groups()
        out.append((int(a), op, int(b), int(result)))
    return out


def _column_carries(a: int, b: int, op: str) -> bool:
    """Independent check: does the written sum or difference carry or borrow in some digit column?"""
    if op == "+":
        return any((a % 10**k) + (b % 10**k) >= 10**k for k in range(1, 4))
    return any((a % 10**k) < (b % 10**k) for k in range(1, 4))


def test_slipped_demonstrations_are_off_by_one_on_carrying_steps_and_answers_stay_true():
    slipped = StepwiseTask(num_train=4000, num_eval=200, slip_rate=0.6, plain_slip_rate=0.1)
    clean = StepwiseTask(num_train=4000, num_eval=200, slip_rate=0.0, plain_slip_rate=0.0)
    assert slipped.eval_problems() == clean.eval_problems()  # the held-out set and its targets are clean
    hard, easy = [], []
    for problem in slipped.train_problems():
        assert int(problem.answer) == _oracle(problem.prompt), problem  # the answer is the true value
        steps = _steps(problem)
        for (a, op, b, written), following in zip(steps, steps[1:] + [None]):
            slip = written - {"+": a + b, "-": a - b, "*": a * b}[op]
            (hard if op == "*" or _column_carries(a, b, op) else easy).append(slip)
            assert written >= 0 and (following is None or following[0] == written), (
                problem
            )  # chained from the written value
        assert problem.target.endswith(f"#{steps[-1][3]}")
    for slips, expected in ((hard, 0.6), (easy, 0.1)):  # carrying, borrowing or multiplying steps slip more
        rate = sum(s != 0 for s in slips) / len(slips)
        assert abs(rate - expected) < 4 * (expected * (1 - expected) / len(slips)) ** 0.5, (expected, rate)
        assert set(slips) == {-1, 0, 1}
    verifier = build_verifier_for(slipped, None)
    scored = sum(verifier(p.target, p.answer).reward for p in slipped.train_problems()) / len(slipped.train_problems())
    assert 0.25 < scored < 0.7, scored  # the warm start imitates a sloppy solver


def test_default_demonstrations_slip():
    default = StepwiseTask(num_train=10, num_eval=5)
    assert default.slip_rate == DEFAULT_SLIP_RATE > default.plain_slip_rate == DEFAULT_PLAIN_SLIP_RATE > 0
    for name in ("slip_rate", "plain_slip_rate"):
        with pytest.raises(ValueError, match=name):
            StepwiseTask(num_train=10, num_eval=5, **{name: 0.7})


def test_topics_and_difficulty_fields(task):
    problems = task.train_problems()
    assert {p.topic for p in problems} == set(TOPICS)
    assert all(0.0 <= p.difficulty <= 1.0 for p in problems)
    # Topics are ordered by difficulty: each topic's difficulties lie in its own band [rank, rank + 1) / topics.
    for rank, topic in enumerate(TOPICS):
        values = [p.difficulty for p in problems if p.topic == topic]
        assert min(values) >= rank / len(TOPICS) and max(values) < (rank + 1) / len(TOPICS) + 1e-9
        assert len(set(values)) > 1  # carries spread difficulty within a topic
    only = StepwiseTask(num_train=100, num_eval=10, topics=("add1", "add2"), topic_weights=(3.0, 1.0))
    assert {p.topic for p in only.train_problems()} == {"add1", "add2"}


def test_held_out_set_is_fixed_and_disjoint_from_training():
    a, b = StepwiseTask(**SMALL, seed=1), StepwiseTask(**SMALL, seed=2)
    assert [p.prompt for p in a.eval_problems()] == [
        p.prompt for p in b.eval_problems()
    ]  # independent of the train seed
    held_out = {p.prompt for p in a.eval_problems()}
    assert len(held_out) > 100
    assert not held_out & {p.prompt for p in a.train_problems()}
    assert not held_out & {p.prompt for p in b.train_problems()}
    validation = StepwiseTask(**SMALL, eval_seed=424_242, exclude_eval_seeds=(1_000_003,))
    assert not {p.prompt for p in validation.eval_problems()} & held_out
    assert not {p.prompt for p in validation.train_problems()} & held_out


def test_targets_fit_the_model_positions_and_the_recommended_length(task):
    tokenizer = CharTokenizer()
    positions = TinyLlamaSpec().max_positions
    budget = task.recommended["max_new_tokens"]
    for problem in task.train_problems() + task.eval_problems():
        prompt = tokenizer(problem.prompt)["input_ids"]  # with BOS
        target = tokenizer(problem.target, add_special_tokens=False)["input_ids"]
        assert len(target) + 1 <= budget  # the target and its EOS fit max_new_tokens
        assert len(prompt) + budget <= positions  # a full-length completion fits the model's positions
    lengths = [len(p.target) for p in task.train_problems()]
    assert sum(lengths) / len(lengths) >= 15  # a derivation, not a bare answer


def test_tokenizer_covers_the_alphabet(task):
    tokenizer = CharTokenizer()
    text = "".join(p.prompt + p.target for p in task.train_problems() + task.eval_problems())
    assert set(text) <= set(tokenizer.alphabet)
    assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("2+3=5;5*3=15;#15", 1.0),
        ("2+3=6;6*3=99;#15", 1.0),  # wrong derivation, right final answer: only the answer counts
        ("#15", 1.0),
        ("2+3=5;5*3=15;#16", 0.0),  # right derivation, wrong final answer
        ("2+3=5;5*3=15;#15\n#16", 0.0),  # the last marker counts
        ("#16;#15", 1.0),
        ("#15\nmore text", 1.0),  # the marker's line only
        ("#015", 1.0),
        (" #15 ", 1.0),
        ("2+3=5;5*3=15;15", 0.0),  # no marker
        ("2+3=5;5*3=15;#", 0.0),
        ("#15x", 0.0),
        ("#1 5", 0.0),
        ("#-15", 0.0),
        ("#15.0", 0.0),
        ("", 0.0),
        ("\x00#\u00e9\n15", 0.0),
        ("#" * 500, 0.0),
        ("#99999999999999999999999999999999999", 0.0),
    ],
)
def test_verifier_scores_only_the_final_answer(completion, reward):
    assert StepwiseVerifier()(completion, "15").reward == reward


def test_verifier_flags_parse_errors_and_rejects_bad_references():
    assert StepwiseVerifier()("5;15", "15").info == {"parse_error": 1.0}
    assert StepwiseVerifier()("#", "15").info == {"parse_error": 1.0}
    assert StepwiseVerifier()("#16", "15").info == {}
    with pytest.raises(ValueError, match="reference"):
        StepwiseVerifier()("#15", "fifteen")


def test_registered_and_bad_options_rejected():
    assert "stepwise" in TASKS.names() and "stepwise" in VERIFIERS.names()
    assert build_task("stepwise", {"num_train": 50, "num_eval": 10}).verifier == "stepwise"
    with pytest.raises(ValueError, match="topics"):
        StepwiseTask(topics=("nope",))
    with pytest.raises(ValueError, match="topic_weights"):
        StepwiseTask(num_train=10, num_eval=5, topic_weights=(1.0,))
    with pytest.raises(ValueError, match="num_train"):
        StepwiseTask(num_train=0)


def test_docstring_examples():
    import doctest

    import ebpo.tasks.stepwise

    result = doctest.testmod(ebpo.tasks.stepwise)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.slow
def test_grpo_learns_the_task_on_cpu(tmp_path):
    """GRPO at G = 8 with the task's recommended settings gains >= 15 points of held-out avg@4 in under 2 GB
    (the wall time, under 5 minutes on 2 cores, is measured in docs/testbed.md, not asserted here)."""
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "ebpo",
        "train",
        "--task",
        "stepwise",
        "--method",
        "grpo",
        "--group-size",
        "8",
        "--threads",
        "2",
        "--out",
        str(out),
        "--no-progress",
        "--no-tensorboard",
        "--save-every",
        "0",
    ]
    subprocess.run(
        command,
        check=True,
        env={**os.environ, "EBPO_CACHE_DIR": os.environ.get("EBPO_CACHE_DIR", str(tmp_path / "cache"))},
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy_after"] - summary["accuracy_before"] >= 0.15, summary
    assert summary["peak_rss_mb"] < 2048, summary
