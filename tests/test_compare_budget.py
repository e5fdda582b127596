"""ebpo compare at equal samples: the sample budget, the pool, allocations, the logged sample axis and the shared
plot axis (run directories written here as fixtures; no training)."""

from __future__ import annotations

import doctest
import json
import shutil
from pathlib import Path

import pytest

from ebpo import compare
from ebpo.compare import (
    RunSpec,
    _command,
    _method_styles,
    _plot,
    _read_run,
    _resolve,
    _x_caption,
    aggregate_runs,
    build_parser,
    headline,
    steps_for_budget,
    write_report,
)


def logged_run(
    path: Path,
    evals: dict[int, float],
    *,
    samples: list[float] | None,
    all_equal: list[float] | None = None,
    allocation: list[float] | None = None,
    before: float = 0.2,
    wall: float = 10.0,
    total: bool = True,
) -> Path:
    """A run directory whose steps log what ``ebpo train`` logs; ``samples=None``: a run made before the sample
    metrics existed (no ``rollout/samples``, ``rollout/all_equal_samples`` or ``time/allocation_seconds``).

    ``evals`` maps a step to the held-out accuracy evaluated after it (the last one is the final evaluation)."""
    path.mkdir(parents=True)
    steps = max(evals)
    rows, cumulative = [], 0.0
    for step in range(1, steps + 1):
        row: dict = {"step": step, "time/step_seconds": 0.5, "rollout/completion_length": 20.0}
        if samples is not None:
            cumulative += samples[step - 1]
            row["rollout/samples"] = samples[step - 1]
            if total:
                row["rollout/samples_total"] = cumulative
        if all_equal is not None:
            row["rollout/all_equal_samples"] = all_equal[step - 1]
        if allocation is not None:
            row["time/allocation_seconds"] = allocation[step - 1]
        if step in evals:
            row["eval/accuracy"] = evals[step]
        rows.append(row)
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = {"accuracy_before": before, "accuracy_after": evals[steps], "wall_seconds": wall}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_the_budget_sets_each_gs_steps_and_every_runs_max_samples(tmp_path):
    assert doctest.testmod(compare, optionflags=doctest.ELLIPSIS).failed == 0  # steps_for_budget's examples
    assert steps_for_budget(15360, 128, 2) == 60  # the default grid's G = 2 runs: 60 x 128 x 2
    assert steps_for_budget(15361, 128, 2) == 61  # one sample more: one step more (the trainer stops inside it)
    assert steps_for_budget(30720, 128, 8) == 30
    args = _resolve(build_parser().parse_args(["--sample-budget", "1000", "--prompts-per-step", "32"]))
    assert args.steps is None  # derived per G
    for g, steps in ((2, 16), (4, 8), (8, 4)):  # ceil(1000 / (32 g))
        flags = _command(RunSpec("dapo", g, 0), args, tmp_path)
        assert flags[flags.index("--steps") + 1] == str(steps)
        assert flags[flags.index("--max-samples") + 1] == "1000"  # DAPO stops on samples, before its steps
    plain = _command(RunSpec("grpo", 4, 0), _resolve(build_parser().parse_args([])), tmp_path)
    assert "--max-samples" not in plain and plain[plain.index("--steps") + 1] == "60"
    with pytest.raises(SystemExit, match="drop --steps"):
        _resolve(build_parser().parse_args(["--sample-budget", "1000", "--steps", "5"]))
    with pytest.raises(SystemExit, match="--sample-budget must be >= 1"):
        _resolve(build_parser().parse_args(["--sample-budget", "0"]))


def test_pool_gives_every_run_the_task_options_and_allocations_add_method_at_alloc(tmp_path):
    args = _resolve(
        build_parser().parse_args(
            ["--methods", "grpo", "ebpo-running", "--pool", "2000", "--allocations", "eb", "knapsack"]
        )
    )
    assert args.methods == [
        "grpo",
        "ebpo-running",
        "grpo@eb",
        "ebpo-running@eb",
        "grpo@knapsack",
        "ebpo-running@knapsack",
    ]
    flags = _command(RunSpec("ebpo-running@eb", 4, 0), args, tmp_path)
    train = flags[flags.index("train") + 1 :]
    # the variant's own flags, then the allocation
    assert train[:6] == ["--method", "ebpo", "--estimator-options", "{prior: running}", "--allocation", "eb"]
    assert train[train.index("--task-options") + 1] == "{num_train: 2000}"
    assert RunSpec("grpo@eb", 4, 0).name == "grpo@eb-G4-s0"
    # DAPO's dynamic sampling redraws whole groups of G, which the trainer refuses beside an allocation: left out
    dapo = _resolve(build_parser().parse_args(["--methods", "grpo", "dapo", "--allocations", "eb"]))
    assert dapo.methods == ["grpo", "dapo", "grpo@eb"]
    with pytest.raises(SystemExit, match="set --allocation already"):
        _resolve(
            build_parser().parse_args(["--variant", "x", "--method ebpo --allocation skip", "--allocations", "eb"])
        )
    with pytest.raises(SystemExit, match="--pool must be >= 1"):
        _resolve(build_parser().parse_args(["--pool", "0"]))


def test_pool_is_refused_beside_a_variant_or_train_args_that_set_task_options(tmp_path, capsys, monkeypatch):
    def run_all(*_):  # were the refusal missing, fail here instead of training
        raise AssertionError("runs started")

    monkeypatch.setattr(compare, "run_all", run_all)
    base = ["--task", "arithmetic", "--steps", "2", "--group-sizes", "2", "--pool", "100", "--out", str(tmp_path / "c")]
    variant = ["--variant", "hard", "--method grpo --task-options '{num_train: 50}'"]
    assert compare.main([*base, *variant]) == 2
    assert "--variant hard sets --task-options, which ebpo compare sets itself" in capsys.readouterr().err
    assert compare.main([*base, "--methods", "grpo", "--train-args", "--task-options '{num_eval: 50}'"]) == 2
    assert "--train-args sets --task-options" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before anything is written


def _fake_runs(monkeypatch, calls):
    def run_all(specs, args, out):
        calls.append([s.name for s in specs])
        for s in specs:
            if not (out / "runs" / s.name / "summary.json").exists():
                logged_run(out / "runs" / s.name, {1: 0.3, 2: 0.4}, samples=[8.0, 8.0])
        return {s: out / "runs" / s.name for s in specs}

    monkeypatch.setattr(compare, "run_all", run_all)


def test_compare_json_records_the_budget_and_the_pool_and_refuses_a_slice_that_differs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    calls: list = []
    _fake_runs(monkeypatch, calls)
    base = ["--methods", "grpo", "--task", "arithmetic", "--final-samples", "0", "--group-sizes", "2"]
    base += ["--prompts-per-step", "4", "--eval-every", "1", "--seeds", "1", "--out", str(out)]
    assert compare.main([*base, "--sample-budget", "16", "--pool", "300"]) == 0
    recorded = json.loads((out / "compare.json").read_text())
    assert (recorded["sample_budget"], recorded["pool"], recorded["steps"]) == (16, 300, None)
    for other in (["--sample-budget", "24", "--pool", "300"], ["--sample-budget", "16", "--pool", "400"]):
        assert compare.main([*base, *other]) == 2
        assert "other settings (" in capsys.readouterr().err
    assert len(calls) == 1
    report = json.loads((out / "report.json").read_text())
    assert (report["sample_budget"], report["pool"]) == (16, 300)
    # a compare.json written before the budget and the pool existed takes a slice without them
    old = tmp_path / "old"
    shutil.copytree(out, old)
    settings = {**json.loads((old / "compare.json").read_text()), "steps": 2}
    (old / "compare.json").write_text(
        json.dumps({k: v for k, v in settings.items() if k not in ("sample_budget", "pool")})
    )
    assert compare.main([*base[:-1], str(old), "--steps", "2"]) == 0
    assert compare.main([*base[:-1], str(old), "--steps", "2", "--pool", "300"]) == 2


def test_the_sample_axis_is_what_the_run_logged(tmp_path):
    # 10 samples at step 1, 30 at step 2 (a resampling step), 10 at step 3; the computed axis would say 8 per step
    run = _read_run(
        logged_run(
            tmp_path / "a",
            {2: 0.3, 3: 0.4},
            samples=[10.0, 30.0, 10.0],
            all_equal=[6.0, 6.0, 8.0],
            allocation=[0.1, 0.2, 0.3],
        ),
        prompts_per_step=4,
        group_size=2,
    )
    assert run["curve"] == [(0.0, 0.2), (40.0, 0.3), (50.0, 0.4)]
    assert run["all_equal_share"] == pytest.approx(20 / 50) and run["allocation_seconds"] == pytest.approx(0.6)
    assert run["samples"] == 50.0 and run["samples_logged"]
    # the logged cumulative total is what counts: a run resumed from a checkpoint whose earlier metrics lines were
    # lost still starts its axis at the samples it had spent (the per-step sum would restart at 0)
    resumed = logged_run(tmp_path / "r", {2: 0.3}, samples=[10.0, 30.0])
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row["rollout/samples_total"] += 100.0
    (resumed / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert _read_run(resumed, 4, 2)["curve"][-1] == (140.0, 0.3)
    # without the cumulative total, the per-step counts are summed
    summed = _read_run(logged_run(tmp_path / "b", {2: 0.3}, samples=[10.0, 30.0], total=False), 4, 2)
    assert summed["curve"][-1] == (40.0, 0.3)
    # a run made before the metrics existed: prompts x G per step, and no share or allocation time
    old = _read_run(logged_run(tmp_path / "c", {2: 0.3}, samples=None), 4, 2)
    assert old["curve"][-1] == (16.0, 0.3) and not old["samples_logged"]
    assert old["all_equal_share"] is None and old["allocation_seconds"] is None


def test_report_columns_at_the_budget_and_for_runs_without_the_new_metrics(tmp_path):
    budget = 32
    runs = {  # grpo: 16 samples a step, evaluated at 16 and 32; ebpo ends past the budget (48) and is interpolated
        RunSpec("grpo", 2, 0): logged_run(
            tmp_path / "g0", {1: 0.3, 2: 0.4}, samples=[16.0, 16.0], all_equal=[12.0, 8.0], allocation=[0.5, 0.5]
        ),
        RunSpec("grpo", 2, 1): logged_run(
            tmp_path / "g1", {1: 0.3, 2: 0.5}, samples=[16.0, 16.0], all_equal=[8.0, 4.0], allocation=[0.5, 1.5]
        ),
        RunSpec("ebpo", 2, 0): logged_run(tmp_path / "e0", {1: 0.4, 2: 0.6}, samples=[24.0, 24.0], wall=30.0),
        RunSpec("ebpo", 2, 1): logged_run(tmp_path / "e1", {1: 0.4, 2: 0.5}, samples=[24.0, 24.0], wall=50.0),
        RunSpec("rloo", 2, 0): logged_run(tmp_path / "r0", {1: 0.3, 2: 0.4}, samples=None),  # an old run
    }
    result = aggregate_runs({s: _read_run(d, 8, 2) for s, d in runs.items()}, 0.9, "grpo", sample_budget=budget)
    rows = result["rows"]
    # ebpo at 32 samples: a third of the way from 0.4 (24) to 0.6 (48) for seed 0, to 0.5 for seed 1
    assert rows["ebpo|G=2"]["accuracy_at_budget"]["mean"] == pytest.approx((0.4 + 0.2 / 3 + 0.4 + 0.1 / 3) / 2)
    assert rows["ebpo|G=2"]["final_accuracy"]["mean"] == pytest.approx(0.55)  # the final stays the last evaluation
    assert result["paired"]["ebpo|G=2"]["at_budget"]["diffs"] == pytest.approx([0.2 / 3 + 0.0, 0.1 / 3 - 0.1])
    assert rows["grpo|G=2"]["all_equal_share"]["mean"] == pytest.approx((20 / 32 + 12 / 32) / 2)
    assert rows["grpo|G=2"]["allocation_seconds"]["mean"] == pytest.approx(1.5)
    assert rows["ebpo|G=2"]["wall_seconds"]["mean"] == pytest.approx(40.0)
    assert rows["ebpo|G=2"]["all_equal_share"] is None and rows["rloo|G=2"]["allocation_seconds"] is None
    # samples to grpo's accuracy at 32 samples, paired: seed 0 aims at 0.4 (ebpo reaches it at 24, 0.75 of 32);
    # seed 1 at 0.5 (ebpo at 48, 1.5 of it)
    reach = rows["ebpo|G=2"]["to_baseline_final"]
    assert reach["samples"] == pytest.approx(36.0) and reach["fraction_of_budget"] == pytest.approx((0.75 + 1.5) / 2)
    assert reach["reached"] == "2/2" and reach["accuracy"] == pytest.approx(0.45)
    text = write_report(result, tmp_path, "ebpo compare --sample-budget 32")
    assert (
        "| accuracy at 32 samples | samples per run | all-equal share | wall s per run | allocation s per run |" in text
    )
    assert "| 0.450 ± 0.635 | 32 | 0.500 | 10 | 1.50 |" in text  # grpo: at 32 it ended; share, wall, allocation
    assert "| 2 | ebpo | 2 | 0.550 ± 0.635 |" in text and "| 48 | - | 40 | - |" in text
    assert (
        "| 32 (computed) | - | 10 | - |" in text
    )  # the old run (8 prompts x 2 x 2 steps): computed samples, no share, no allocation time
    assert "minus grpo at 32 samples" in text and "| 36 (2/2) | 1.12 |" in text


def test_every_method_shares_the_sample_axis(tmp_path):
    runs = {
        RunSpec("grpo", 2, 0): _read_run(logged_run(tmp_path / "g", {2: 0.3, 4: 0.4}, samples=[8.0] * 4), 4, 2),
        RunSpec("dapo", 2, 0): _read_run(logged_run(tmp_path / "d", {2: 0.35, 4: 0.5}, samples=[32.0] * 4), 4, 2),
        RunSpec("grpo", 4, 0): _read_run(logged_run(tmp_path / "g4", {2: 0.3, 4: 0.4}, samples=[16.0] * 4), 4, 4),
    }
    result = aggregate_runs(runs, target=0.9)
    # without a budget: cut at the fewest samples any method used, DAPO's 128 cut to GRPO's 32
    assert result["x_range"] == {
        "2": {"max": 32.0, "by": "grpo", "cut": ["dapo"]},
        "4": {"max": 64.0, "by": "grpo", "cut": []},
    }
    assert _plot(result, tmp_path / "a.png") == {2: (0.0, 32.0), 4: (0.0, 64.0)}
    assert "G = 2: 0 to 32, the fewest samples any method used (grpo); cut there: dapo" in _x_caption(result)
    budgeted = aggregate_runs(runs, target=0.9, sample_budget=48)  # with a budget: 0 to it, for every G
    assert _plot(budgeted, tmp_path / "b.png") == {2: (0.0, 48.0), 4: (0.0, 48.0)}
    assert "G = 2: 0 to the sample budget, 48; cut there: dapo" in _x_caption(budgeted)  # report.md's caption


def test_the_headline_says_whether_the_interval_excludes_zero(tmp_path):
    def result(diffs):
        runs = {}
        for seed, diff in enumerate(diffs):
            runs[RunSpec("grpo", 2, seed)] = _read_run(
                logged_run(tmp_path / f"g{seed}-{len(diffs)}-{diffs[0]}", {1: 0.3}, samples=[8.0]), 4, 2
            )
            runs[RunSpec("ebpo", 2, seed)] = _read_run(
                logged_run(tmp_path / f"e{seed}-{len(diffs)}-{diffs[0]}", {1: 0.3 + diff}, samples=[8.0]), 4, 2
            )
        return aggregate_runs(runs, target=0.9, baseline="grpo")

    (line,) = headline(result([0.02, 0.01, 0.015, 0.02]))
    assert line.startswith("ebpo minus grpo at G = 2: +0.016 ± 0.008 (final accuracy, 95% CI over 4 seeds)")
    assert "better in 4/4 seeds; the 95% CI excludes 0: ebpo is better here" in line
    assert "includes 0: not resolved" in headline(result([0.02, -0.01, 0.0]))[0]
    assert "ebpo is worse here" in headline(result([-0.02, -0.01, -0.015]))[0]
    assert "one seed: no confidence interval" in headline(result([0.02]))[0]


def test_paired_differences_at_the_budget_interpolate_both_runs(tmp_path):
    """With a budget, the baseline is read at N too (not at its last evaluation, which lies past N)."""
    runs = {  # both evaluated at 16 and 32 samples; the budget, 24, lies between
        RunSpec("grpo", 2, 0): _read_run(logged_run(tmp_path / "g", {1: 0.3, 2: 0.5}, samples=[16.0, 16.0]), 8, 2),
        RunSpec("ebpo", 2, 0): _read_run(logged_run(tmp_path / "e", {1: 0.4, 2: 0.5}, samples=[16.0, 16.0]), 8, 2),
    }
    result = aggregate_runs(runs, target=0.9, baseline="grpo", sample_budget=24)
    # at 24: ebpo 0.45, grpo 0.40 (their last evaluations tie at 0.5)
    assert result["paired"]["ebpo|G=2"]["at_budget"]["diffs"] == pytest.approx([0.05])
    assert result["paired"]["ebpo|G=2"]["diffs"] == pytest.approx([0.0])
    reach = result["rows"]["ebpo|G=2"]["to_baseline_final"]  # grpo's 0.40 at 24: ebpo has it at 16, 2/3 of 24
    assert reach["accuracy"] == pytest.approx(0.4) and reach["fraction_of_budget"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("count", [3, 10, 11, 20, 23])
def test_every_method_of_a_plot_gets_its_own_style(count):
    """11 methods (the pool's grid) drew two in the same colour under matplotlib's 10-colour cycle."""
    methods = [f"m{i}" for i in range(count)]
    styles = _method_styles(methods)
    assert list(styles) == methods
    assert len({(tuple(s["color"]), s["linestyle"]) for s in styles.values()}) == count
    if count <= 20:  # up to 20 methods the colours alone tell them apart
        assert len({tuple(s["color"]) for s in styles.values()}) == count
