"""The warm start teaches what a correct completion says, fits the model, and reports progress.

The table test runs over every registered task (``ebpo.tasks.TASKS``): a task
added later is covered without editing this file when it builds with no
arguments; one that needs arguments fails here until it gets a row in
``TASK_CASES``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ebpo.models.loading import TinyLlamaSpec, load_policy
from ebpo.tasks.base import TASKS, Problem
from ebpo.tasks.build import build_task, build_verifier_for, register_builtin_components
from ebpo.train.warmstart import cached_warmstart, fitting_problems, supervised_batch, train_data_id, train_supervised

FIXTURES = Path(__file__).parent / "fixtures" / "data"

register_builtin_components()

# reasoning-gym datasets checked in the default suite: short answers, multi-line answers (tagged),
# tuple-valued metadata (rearc), and one that stores no reference answer (graph_color: empty target).
RG_SAMPLE = (
    "basic_arithmetic",
    "simple_equations",
    "chain_sum",
    "leg_counting",
    "spiral_matrix",
    "rearc",
    "graph_color",
)
# Datasets whose entries carry no reference answer (the scorer checks validity): nothing to teach.
RG_NO_REFERENCE = {"boxnet", "graph_color", "propositional_logic", "rubiks_cube", "rush_hour"}

TASK_CASES: dict[str, list[tuple[str, dict]]] = {
    "arithmetic": [("arithmetic", {"num_train": 300, "num_eval": 30})],
    # stepwise demonstrations slip on purpose (tests/test_stepwise.py); without slips every target is right
    "stepwise": [("stepwise", {"num_train": 300, "num_eval": 30, "slip_rate": 0.0, "plain_slip_rate": 0.0})],
    "reasoning_gym": [(f"reasoning_gym:{name}", {"size": 6, "eval_size": 3}) for name in RG_SAMPLE],
    "dataset": [(f"dataset:{path.stem}", {"path": str(path)}) for path in sorted(FIXTURES.glob("*.jsonl"))],
}


def _cases() -> list[tuple[str, dict]]:
    return [case for name in TASKS.names() for case in TASK_CASES.get(name, [(name, {})])]


def _build(name: str, options: dict):
    if name.startswith("reasoning_gym:"):
        pytest.importorskip("reasoning_gym")
    try:
        return build_task(name, options)
    except (TypeError, ValueError) as exc:
        pytest.fail(f"task {name!r} does not build with {options}: {exc}; give it a row in TASK_CASES")


def _check_targets(task, verifier, *, allow_empty: bool) -> int:
    """Every problem's warm-start target scores 1.0; returns how many were checked."""
    checked = 0
    for problem in [*task.train_problems(), *task.eval_problems()]:
        if not problem.completion_target:
            assert allow_empty, f"{problem.id}: empty warm-start target"
            continue
        result = verifier(problem.completion_target, problem.answer)
        assert result.reward == 1.0, f"{problem.id}: target {problem.completion_target[:80]!r} scores {result}"
        checked += 1
    return checked


@pytest.mark.parametrize(("name", "options"), _cases(), ids=[c[0] for c in _cases()])
def test_every_tasks_warmstart_target_scores_full_reward(name, options):
    task = _build(name, options)
    verifier = build_verifier_for(task, None)
    no_reference = name.partition(":")[2] in RG_NO_REFERENCE and name.startswith("reasoning_gym:")
    checked = _check_targets(task, verifier, allow_empty=no_reference)
    assert checked > 0 or no_reference


@pytest.mark.slow
def test_every_reasoning_gym_datasets_target_scores_full_reward():
    pytest.importorskip("reasoning_gym")
    from reasoning_gym.factory import DATASETS

    verifier = build_verifier_for(build_task("reasoning_gym:chain_sum", {"size": 2, "eval_size": 1}), None)
    for name in sorted(set(DATASETS) - {"composite"}):  # composite needs a list of datasets to mix
        task = build_task(f"reasoning_gym:{name}", {"size": 3, "eval_size": 2})
        _check_targets(task, verifier, allow_empty=name in RG_NO_REFERENCE)


def test_reasoning_gym_target_is_the_answer_not_the_json_reference():
    pytest.importorskip("reasoning_gym")
    problem = build_task("reasoning_gym:simple_equations", {"size": 4, "eval_size": 2}).train_problems()[0]
    entry = json.loads(problem.answer)["entry"]
    assert problem.completion_target == entry["answer"] and len(problem.completion_target) < 10


def _tokenizer():
    return load_policy("builtin:tiny", device="cpu", dtype="float32", spec=TinyLlamaSpec(), seed=0)[1]


def test_long_problems_are_left_out_and_none_fitting_is_an_error():
    tokenizer = _tokenizer()
    short = Problem(id="s", prompt="1+2=", answer="3")
    long = Problem(id="l", prompt="9" * 70 + "=", answer="3")
    no_target = Problem(id="n", prompt="1+1=", answer="{}", target="")
    assert fitting_problems([short, long, no_target], tokenizer, 64) == [short]
    with pytest.raises(ValueError, match="64 positions.*--warmstart-steps 0"):
        fitting_problems([long], tokenizer, 64)
    with pytest.raises(ValueError, match="no training problem has a target"):
        fitting_problems([no_target], tokenizer, 64)


def test_reasoning_gym_warm_start_batches_fit_the_model(tmp_path, monkeypatch):
    pytest.importorskip("reasoning_gym")
    monkeypatch.setenv("EBPO_CACHE_DIR", str(tmp_path))
    spec = TinyLlamaSpec()
    model, tokenizer = load_policy("builtin:tiny", device="cpu", dtype="float32", spec=spec, seed=0)
    problems = build_task("reasoning_gym:basic_arithmetic", {"size": 200, "eval_size": 4}).train_problems()
    fitting = fitting_problems(problems, tokenizer, spec.max_positions)
    assert 0.8 * len(problems) < len(fitting) < len(problems)  # a few long ones left out, most kept
    input_ids, _, _ = supervised_batch(fitting, tokenizer)
    assert input_ids.shape[1] <= spec.max_positions
    # A dataset none of whose problems fits: a clear error, not a silent 200-token batch.
    long_task = build_task("reasoning_gym:leg_counting", {"size": 20, "eval_size": 2})
    lines: list[str] = []
    with pytest.raises(ValueError, match="fits the model's 64 positions"):
        cached_warmstart(
            model,
            tokenizer,
            long_task.train_problems(),
            spec=spec,
            task_id=train_data_id("x", long_task.train_problems()),
            steps=2,
            lr=1e-3,
            batch_size=4,
            seed=0,
            log=lines.append,
        )


def test_warm_start_prints_progress_with_the_mean_loss():
    model, tokenizer = load_policy("builtin:tiny", device="cpu", dtype="float32", spec=TinyLlamaSpec(), seed=0)
    problems = [Problem(id=str(i), prompt=f"{i}+1=", answer=str(i + 1)) for i in range(20)]
    lines: list[str] = []
    losses = train_supervised(
        model, tokenizer, problems, steps=5, lr=1e-3, batch_size=4, seed=0, log=lines.append, log_every=2
    )
    assert [line.split("|")[0].strip() for line in lines] == [
        "warm start: step 2/5",
        "warm start: step 4/5",
        "warm start: step 5/5",
    ]
    shown = [float(line.split("loss ")[1].split(" ")[0]) for line in lines]
    expected = [sum(losses[0:2]) / 2, sum(losses[2:4]) / 2, losses[4]]
    assert shown == pytest.approx(expected, abs=1e-3)


@pytest.mark.slow  # about a minute of warm start and evaluation: too long for the default suite
def test_reasoning_gym_run_reaches_its_first_rl_step_quickly(tmp_path):
    """The default warm start on a reasoning-gym task (fresh cache) is bounded: first RL step within 2 minutes.

    (It took > 8 minutes and 3.5-4 GB when the warm start taught the JSON reference.)
    """
    pytest.importorskip("reasoning_gym")
    started = time.time()
    process = subprocess.Popen(
        [
            sys.executable,
            "-u",
            "-m",
            "ebpo",
            "train",
            "--task",
            "reasoning_gym:basic_arithmetic",
            "--steps",
            "1",
            "--no-progress",
            "--no-tensorboard",
            "--threads",
            "2",
            "--max-eval-problems",
            "16",
            "--out",
            str(tmp_path / "run"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**_env(), "EBPO_CACHE_DIR": str(tmp_path / "cache")},
    )
    first_step, output = None, []
    assert process.stdout is not None
    for line in process.stdout:
        output.append(line)
        if line.startswith("step 1/1") and first_step is None:
            first_step = time.time() - started
    assert process.wait(timeout=300) == 0, "".join(output)
    assert first_step is not None and first_step < 120, f"first RL step after {first_step} s:\n{''.join(output)}"
    assert any(line.startswith("warm start: step 100/100") for line in output)  # the task's recommended warm start


def _env() -> dict[str, str]:
    import os

    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
