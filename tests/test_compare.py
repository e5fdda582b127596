"""ebpo compare: aggregation over seeds from run directories (written here as fixtures)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from ebpo import compare
from ebpo.compare import (
    DEFAULT_METHODS,
    RunSpec,
    _command,
    _read_run,
    _resolve,
    aggregate_runs,
    build_parser,
    write_report,
)


def make_run(
    path: Path, before: float, evals: list[float], after: float, rounds: float = 1.0, by_topic: dict | None = None
) -> Path:
    path.mkdir(parents=True)
    rows = []
    for step in range(1, 7):
        row = {"step": step, "time/step_seconds": 0.5, "reward/mean": 0.3, "rollout/completion_length": float(step)}
        if rounds != 1.0:
            row["dapo/rounds"] = rounds
        if step % 2 == 0 and step < 6:
            row["eval/accuracy"] = evals[step // 2 - 1]
        rows.append(row)
    rows.append({"step": 6, "eval/accuracy": after})  # the final evaluation, logged after the last step
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = {"accuracy_before": before, "accuracy_after": after, "wall_seconds": 10.0}
    if by_topic:
        summary["accuracy_by_topic"] = {t: {"problems": 5, "before": before, "after": a} for t, a in by_topic.items()}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_the_report_names_the_start_the_runs_share_and_flags_runs_from_different_starts(tmp_path):
    def runs(starts):
        out, group = {}, len(list(tmp_path.iterdir()))
        for seed, sha in enumerate(starts):
            path = make_run(tmp_path / f"{group}-{seed}", 0.2, [0.3, 0.4], 0.5)
            summary = json.loads((path / "summary.json").read_text())
            if sha:
                summary["start"] = {"model": "/cache/warmstart/x", "weights_sha256": sha * 64, "cpu": "some cpu"}
            (path / "summary.json").write_text(json.dumps(summary))
            out[RunSpec("grpo", 2, seed)] = _read_run(path, 4, 2)
        return aggregate_runs(out, target=0.4)

    same = runs(["a", "a"])
    assert same["starts"] == {"a" * 64: 2}
    text = write_report(same, tmp_path, "ebpo compare --test")
    assert f"all 2 runs that record it began from the same model (sha256 {'a' * 16}" in text
    assert "Starting weights differ" not in text and "made before summaries" not in text
    mixed = runs(["a", "b", "a"])
    assert mixed["starts"] == {"a" * 64: 2, "b" * 64: 1}
    text = write_report(mixed, tmp_path, "ebpo compare --test")
    assert "**Starting weights differ**: the runs began from 2 different models" in text
    assert f"{'b' * 16}… (1 runs)" in text
    partly = runs(["a", ""])  # a run from before summaries recorded the start is not counted as one of them
    text = write_report(partly, tmp_path, "ebpo compare --test")
    assert "all 1 runs that record it began from the same model" in text and "(1 runs made before" in text
    assert "Starting weights differ" not in text
    assert "(1 runs made before" in write_report(runs(["a", "b", ""]), tmp_path, "ebpo compare --test")
    path = make_run(tmp_path / "malformed", 0.2, [0.3, 0.4], 0.5)  # a hand-edited summary reads as unrecorded
    for bad in ("a string", {"weights_sha256": 7}, {"weights_sha256": ""}):
        (path / "summary.json").write_text(
            json.dumps({**json.loads((path / "summary.json").read_text()), "start": bad})
        )
        assert _read_run(path, 4, 2)["start"] is None
    old = runs(["", ""])
    assert "Starting weights" not in write_report(old, tmp_path, "ebpo compare --test")


def test_read_run_counts_samples_including_resampling_rounds(tmp_path):
    run = _read_run(make_run(tmp_path / "a", 0.2, [0.3, 0.4], 0.5), prompts_per_step=4, group_size=2)
    assert run["curve"] == [(0.0, 0.2), (16.0, 0.3), (32.0, 0.4), (48.0, 0.5)]
    dapo = _read_run(make_run(tmp_path / "b", 0.2, [0.3, 0.4], 0.5, rounds=2.0), prompts_per_step=4, group_size=2)
    assert dapo["curve"][-1] == (96.0, 0.5)  # two sampling rounds per step: twice the samples
    assert run["completion_length"] == pytest.approx(3.5)  # mean over steps 1..6


def test_variants_run_their_own_flags_under_their_label(tmp_path):
    args = _resolve(
        build_parser().parse_args(
            [
                "--methods",
                "grpo",
                "--variant",
                "es_mirror",
                "--method gbmpo-mirror --mirror-params 'dir with space/m.json'",
                "--train-args",
                "--lr 0.5",
            ]
        )
    )
    assert args.methods == ["grpo", "es_mirror"]
    variant = _command(RunSpec("es_mirror", 4, 1), args, tmp_path / "r")
    assert variant[variant.index("train") + 1 :][:4] == [
        "--method",
        "gbmpo-mirror",
        "--mirror-params",
        "dir with space/m.json",
    ]
    assert variant[-2:] == ["--lr", "0.5"]
    preset = _command(RunSpec("grpo", 4, 1), args, tmp_path / "r")
    assert preset[preset.index("train") + 1 :][:2] == ["--method", "grpo"]
    only = _resolve(build_parser().parse_args(["--variant", "kl_k3", "--method gbmpo-probl2 --divergence kl"]))
    assert only.methods == ["kl_k3"]  # variants alone do not pull in the default presets
    with pytest.raises(SystemExit, match="given twice"):
        _resolve(build_parser().parse_args(["--methods", "grpo", "--variant", "grpo", "--method ebpo"]))
    with pytest.raises(SystemExit, match="may use only"):
        _resolve(build_parser().parse_args(["--variant", "a/b", "--method ebpo"]))


def test_aggregate_mean_ci_and_samples_to_target(tmp_path):
    runs = {
        RunSpec("grpo", 2, 0): _read_run(make_run(tmp_path / "g0", 0.2, [0.25, 0.3], 0.35), 4, 2),
        RunSpec("grpo", 2, 1): _read_run(make_run(tmp_path / "g1", 0.2, [0.3, 0.4], 0.45), 4, 2),
        RunSpec("ebpo", 2, 0): _read_run(make_run(tmp_path / "e0", 0.2, [0.4, 0.5], 0.6), 4, 2),
        RunSpec("ebpo", 2, 1): _read_run(make_run(tmp_path / "e1", 0.2, [0.4, 0.6], 0.6), 4, 2),
    }
    result = aggregate_runs(runs, target=0.4)
    grpo, ebpo = result["rows"]["grpo|G=2"], result["rows"]["ebpo|G=2"]
    assert grpo["final_accuracy"]["mean"] == pytest.approx(0.4)
    # t(0.975, 1) = 12.706; std of (0.35, 0.45) = 0.0707; half-width = 12.706 * 0.0707 / sqrt(2)
    assert grpo["final_accuracy"]["ci_half_width"] == pytest.approx(12.706 * 0.070711 / 2**0.5, rel=1e-3)
    assert ebpo["gain"]["mean"] == pytest.approx(0.4)
    assert grpo["samples_to_target"] == pytest.approx(32.0) and grpo["reached_target"] == "1/2"
    assert ebpo["samples_to_target"] == pytest.approx(16.0) and ebpo["reached_target"] == "2/2"
    assert [p["samples"] for p in ebpo["curve"]] == [0.0, 16.0, 32.0, 48.0]
    text = write_report(result, tmp_path, "ebpo compare --test")
    assert "| 2 | ebpo | 2 | 0.600 ± 0.000 | 0.000 |" in text  # mean ± CI, then the run-to-run std
    assert "| 3.50 | 0.50 |" in text  # completion length, step seconds
    assert (tmp_path / "accuracy_vs_samples.png").stat().st_size > 1000
    assert json.loads((tmp_path / "report.json").read_text())["target"] == 0.4


def test_curve_keeps_every_evaluation_when_dynamic_sampling_varies_samples(tmp_path):
    runs = {
        RunSpec("dapo", 2, 0): _read_run(make_run(tmp_path / "d0", 0.2, [0.3, 0.4], 0.5, rounds=1.0), 4, 2),
        RunSpec("dapo", 2, 1): _read_run(make_run(tmp_path / "d1", 0.2, [0.2, 0.3], 0.4, rounds=3.0), 4, 2),
    }
    curve = aggregate_runs(runs, target=0.9)["rows"]["dapo|G=2"]["curve"]
    assert [p["samples"] for p in curve] == [0.0, 32.0, 64.0, 96.0]  # means of (16, 48), (32, 96), (48, 144)
    assert [(p["samples_min"], p["samples_max"]) for p in curve][1] == (16.0, 48.0)
    assert [round(p["mean"], 6) for p in curve] == [0.2, 0.25, 0.35, 0.45]


def test_paired_differences_by_seed(tmp_path):
    finals = {("grpo", 0): 0.30, ("grpo", 1): 0.20, ("ebpo", 0): 0.35, ("ebpo", 1): 0.18}
    runs = {
        RunSpec(m, 2, s): _read_run(make_run(tmp_path / f"{m}{s}", 0.2, [0.2, 0.2], a), 4, 2)
        for (m, s), a in finals.items()
    }
    result = aggregate_runs(runs, target=0.9, baseline="grpo")
    row = result["paired"]["ebpo|G=2"]
    assert row["diffs"] == pytest.approx([0.05, -0.02]) and row["better"] == 1
    assert row["mean"] == pytest.approx(0.015) and "grpo|G=2" not in result["paired"]
    assert "| 2 | ebpo | +0.015 ±" in write_report(result, tmp_path, "ebpo compare") and "1/2 |" in write_report(
        result, tmp_path, "x"
    )
    assert aggregate_runs(runs, target=0.9, baseline="rloo")["paired"] == {}  # baseline not compared: no table


def test_samples_to_the_baselines_final_accuracy_per_topic_and_length_curves(tmp_path):
    runs = {
        RunSpec("grpo", 2, 0): _read_run(
            make_run(tmp_path / "g0", 0.2, [0.25, 0.3], 0.35, by_topic={"a": 0.5, "b": 0.1}), 4, 2
        ),
        RunSpec("grpo", 2, 1): _read_run(
            make_run(tmp_path / "g1", 0.2, [0.3, 0.4], 0.45, by_topic={"a": 0.7, "b": 0.3}), 4, 2
        ),
        RunSpec("ebpo", 2, 0): _read_run(
            make_run(tmp_path / "e0", 0.2, [0.3, 0.5], 0.6, by_topic={"a": 0.9, "b": 0.2}), 4, 2
        ),
        RunSpec("ebpo", 2, 1): _read_run(
            make_run(tmp_path / "e1", 0.2, [0.4, 0.6], 0.6, by_topic={"a": 0.8, "b": 0.4}), 4, 2
        ),
    }
    result = aggregate_runs(runs, target=0.9, baseline="grpo")
    ebpo, grpo = result["rows"]["ebpo|G=2"], result["rows"]["grpo|G=2"]
    # paired by seed: seed 0 aims at grpo seed 0's 0.35 (ebpo: 0.3 at 16 samples, 0.5 at 32), seed 1 at grpo seed 1's
    # 0.45 (ebpo: 0.4 at 16, 0.6 at 32): both reached at 32 of grpo's 48 samples (the mean goal would give 24)
    assert ebpo["to_baseline_final"]["accuracy"] == pytest.approx(0.40) and ebpo["to_baseline_final"]["paired"]
    assert ebpo["to_baseline_final"]["samples"] == pytest.approx(32.0) and ebpo["to_baseline_final"]["reached"] == "2/2"
    assert ebpo["to_baseline_final"]["fraction_of_budget"] == pytest.approx(2 / 3)
    assert grpo["to_baseline_final"]["reached"] == "2/2"  # each seed reaches its own end (the mean goal: 1/2)
    assert ebpo["by_topic"]["a"]["mean"] == pytest.approx(0.85) and grpo["by_topic"]["b"]["mean"] == pytest.approx(0.2)
    assert [p["mean"] for p in ebpo["length_curve"]] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert [p["samples"] for p in ebpo["length_curve"]] == [8.0, 16.0, 24.0, 32.0, 40.0, 48.0]
    assert result["runs"] == 4 and result["run_seconds"] == pytest.approx(40.0)
    text = write_report(result, tmp_path, "ebpo compare")
    assert "| 2 | ebpo | +0.200 ± " in text and "| 32 (2/2) | 0.67 |" in text
    assert "| G | method | a | b |" in text and "| 2 | ebpo | 0.850 | 0.300 |" in text


def test_default_budget_is_the_stepwise_testbed_and_quick_its_g2_grpo_against_ebpo(tmp_path):
    args = _resolve(build_parser().parse_args([]))
    assert (args.task, args.steps, args.prompts_per_step, args.eval_every, args.seeds, args.group_sizes) == (
        "stepwise",
        60,
        128,
        10,
        10,
        [2, 4, 8],
    )
    assert args.methods == DEFAULT_METHODS and len(DEFAULT_METHODS) == 10
    running = _command(RunSpec("ebpo-running", 4, 0), args, tmp_path)
    assert running[running.index("train") + 1 :][:4] == ["--method", "ebpo", "--estimator-options", "{prior: running}"]
    hier = _command(RunSpec("ebpo-hier", 4, 0), args, tmp_path)
    assert hier[hier.index("train") + 1 :][:4] == ["--method", "ebpo", "--estimator-options", "{hierarchical: true}"]
    quick = _resolve(build_parser().parse_args(["--quick"]))
    # where EBPO's effect is known to show: G = 2 on the testbed's own settings, GRPO paired against EBPO
    assert (quick.task, quick.group_sizes, quick.prompts_per_step, quick.methods, quick.baseline) == (
        "stepwise",
        [2],
        128,
        ["grpo", "ebpo"],
        "grpo",
    )
    assert quick.seeds >= 5 and quick.steps >= 10  # fewer seeds give no usable CI; fewer steps no effect yet
    one = _resolve(build_parser().parse_args(["--methods", "grpo", "ebpo-running", "--steps", "7"]))
    assert one.methods == ["grpo", "ebpo-running"] and one.steps == 7 and "ebpo-running" in one.variants


def _fake_runs(monkeypatch, calls):
    def run_all(specs, args, out):
        calls.append([s.name for s in specs])
        for s in specs:
            if not (out / "runs" / s.name / "summary.json").exists():
                make_run(out / "runs" / s.name, 0.2, [0.3, 0.4], 0.5 if s.method == "grpo" else 0.45 + 0.01 * s.seed)
        return {s: out / "runs" / s.name for s in specs}

    monkeypatch.setattr(compare, "run_all", run_all)


def test_slices_resume_under_the_same_settings_and_report_only_aggregates_what_finished(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    calls: list = []
    _fake_runs(monkeypatch, calls)
    base = [
        "--task",
        "arithmetic",
        "--final-samples",
        "0",
        "--group-sizes",
        "2",
        "--steps",
        "6",
        "--eval-every",
        "2",
        "--prompts-per-step",
        "4",
        "--out",
        str(out),
    ]
    assert compare.main(["--methods", "grpo", "ebpo", "--seeds", "2", *base]) == 0
    assert json.loads((out / "compare.json").read_text())["steps"] == 6
    assert calls[0] == [
        "grpo-G2-s0",
        "ebpo-G2-s0",
        "grpo-G2-s1",
        "ebpo-G2-s1",
    ]  # seed-major: a stopped comparison stays paired
    # a slice with another budget would mix incomparable runs: refused before anything runs
    assert (
        compare.main(
            [
                "--methods",
                "grpo",
                "--seeds",
                "3",
                *base[:-4],
                "--steps",
                "8",
                "--prompts-per-step",
                "4",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "other settings (steps" in capsys.readouterr().err and len(calls) == 1
    # report-only over a larger grid: runs nothing, aggregates the 4 finished runs of the 6
    assert compare.main(["--methods", "grpo", "ebpo", "--seeds", "3", "--report-only", *base]) == 0
    assert len(calls) == 1 and "4 of 6 runs of the grid have finished" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["rows"]["ebpo|G=2"]["seeds"] == 2 and report["paired"]["ebpo|G=2"]["diffs"] == pytest.approx(
        [-0.05, -0.04]
    )
    # the next slice (same settings) adds seed 2
    assert compare.main(["--methods", "grpo", "ebpo", "--seeds", "3", *base]) == 0
    assert json.loads((out / "report.json").read_text())["rows"]["ebpo|G=2"]["seeds"] == 3
    assert (
        compare.main(
            ["--methods", "grpo", "--seeds", "1", "--report-only", "--out", str(tmp_path / "none"), *base[:-2]]
        )
        == 2
    )


def test_paired_difference_at_the_baselines_sample_budget(tmp_path):
    """A method that samples twice as much per step (DAPO) is also compared at the samples GRPO used."""
    runs = {
        RunSpec("grpo", 2, 0): _read_run(make_run(tmp_path / "g0", 0.2, [0.3, 0.35], 0.4), 4, 2),  # 48 samples in all
        RunSpec("dapo", 2, 0): _read_run(make_run(tmp_path / "d0", 0.2, [0.32, 0.45], 0.6, rounds=2.0), 4, 2),
        RunSpec("ebpo", 2, 0): _read_run(make_run(tmp_path / "e0", 0.2, [0.3, 0.4], 0.5), 4, 2),
    }
    paired = aggregate_runs(runs, target=0.9, baseline="grpo")["paired"]
    # dapo's evaluations: 0.32 at 32 samples, 0.45 at 64, 0.6 at 96: at grpo's 48 samples, halfway: 0.385
    assert paired["dapo|G=2"]["mean"] == pytest.approx(0.2) and paired["dapo|G=2"]["at_budget"][
        "mean"
    ] == pytest.approx(-0.015)
    assert paired["ebpo|G=2"]["at_budget"]["diffs"] == pytest.approx(
        paired["ebpo|G=2"]["diffs"]
    )  # equal budgets: the final
    text = write_report(aggregate_runs(runs, target=0.9, baseline="grpo"), tmp_path, "x")
    assert "| 2 | dapo | +0.200 | 1/1 | -0.015 (0/1) |" in text


def write_final_eval(run: Path, samples: int, accuracy: float, by_topic: dict[str, float]) -> None:
    path = run / f"final-eval-k{samples}"
    path.mkdir()
    topics = {t: {"problems": 5.0, "avg": a} for t, a in by_topic.items()}
    record = {"results": {"task": {f"avg@{samples}": accuracy}}, "by_topic": {"task": topics}, "wall_seconds": 2.0}
    (path / "eval.json").write_text(json.dumps(record))


def test_the_final_accuracy_comes_from_the_final_evaluation_and_the_curves_stay_in_training(tmp_path):
    runs = {}
    for (method, seed), (after, final) in {
        ("grpo", 0): (0.4, 0.42),
        ("grpo", 1): (0.5, 0.47),
        ("ebpo", 0): (0.5, 0.45),
        ("ebpo", 1): (0.5, 0.52),
    }.items():
        run = make_run(tmp_path / f"{method}{seed}", 0.2, [0.3, 0.35], after, by_topic={"a": 0.1})
        write_final_eval(run, 32, final, {"a": final / 2})
        runs[RunSpec(method, 2, seed)] = _read_run(run, 4, 2, final_samples=32)
    result = aggregate_runs(runs, target=0.9, baseline="grpo")
    assert result["rows"]["ebpo|G=2"]["final_accuracy"]["mean"] == pytest.approx(0.485)
    assert result["rows"]["ebpo|G=2"]["by_topic"]["a"]["mean"] == pytest.approx(0.485 / 2)
    assert result["paired"]["ebpo|G=2"]["diffs"] == pytest.approx([0.03, 0.05])
    assert result["paired"]["ebpo|G=2"]["at_budget"]["diffs"] == pytest.approx(
        [0.1, 0.0]
    )  # in-training: 0.5 - 0.4, 0.5 - 0.5
    assert result["rows"]["grpo|G=2"]["curve"][-1]["mean"] == pytest.approx(
        0.45
    )  # the curve ends at the in-training value
    # samples-to-reach aims at grpo's last in-training accuracy (0.45), and the report says so, not at its avg@32 (0.445)
    assert result["rows"]["ebpo|G=2"]["to_baseline_final"]["accuracy"] == pytest.approx(0.45)
    assert "last in-training accuracy, paired by seed" in write_report(result, tmp_path, "x")
    assert "mean of those goals: G = 2: 0.450" in (tmp_path / "report.md").read_text()
    assert result["run_seconds"] == pytest.approx(4 * (10.0 + 2.0))  # training and final evaluation
    with pytest.raises(ValueError, match="no final evaluation with 16 samples"):
        _read_run(tmp_path / "grpo0", 4, 2, final_samples=16)


def test_compare_runs_the_final_evaluation_once_per_run(tmp_path, monkeypatch):
    """End to end with real runs: a tiny arithmetic grid at a sample budget in a pool of prompts, each run evaluated
    once more after training."""
    monkeypatch.setenv("EBPO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "cmp"
    train = "--warmstart-steps 20 --warmstart-batch-size 16 --no-tensorboard --eval-samples 2"
    argv = [
        "--methods",
        "grpo",
        "--task",
        "arithmetic",
        "--group-sizes",
        "2",
        "--seeds",
        "1",
        "--sample-budget",
        "12",  # 2 steps of 4 prompts x 2 (ceil(12 / 8)); the second ends past the budget, at 16
        "--pool",
        "40",
        "--prompts-per-step",
        "4",
        "--eval-every",
        "2",
        "--max-eval-problems",
        "12",
        "--final-samples",
        "6",
        "--workers",
        "1",
        "--train-args",
        train,
        "--out",
        str(out),
    ]
    assert compare.main(argv) == 0
    evaluation = json.loads((out / "runs" / "grpo-G2-s0" / "final-eval-k6" / "eval.json").read_text())
    (metrics,) = evaluation["results"].values()
    assert metrics["problems"] == 12 and metrics["samples_per_problem"] == 6
    report = json.loads((out / "report.json").read_text())
    assert report["rows"]["grpo|G=2"]["final_accuracy"]["mean"] == metrics["avg@6"] and report["final_samples"] == 6
    assert "avg@6 on the held-out set after the last step" in (out / "report.md").read_text()
    row = report["rows"]["grpo|G=2"]
    assert row["samples"]["mean"] == 16.0 and row["samples_logged"]  # what the run logged it sampled
    assert row["curve"][-1]["samples"] == 16.0 and row["accuracy_at_budget"] is not None
    assert 0.0 <= row["all_equal_share"]["mean"] <= 1.0 and row["allocation_seconds"] is not None
    assert (report["sample_budget"], report["pool"]) == (12, 40)
    config = (out / "runs" / "grpo-G2-s0" / "config.yaml").read_text()
    assert "max_samples: 12" in config and "num_train: 40" in config and "steps: 2" in config
    assert shlex.split(report["command"]) == [
        "ebpo",
        "compare",
        *argv,
    ]  # the recorded command runs as given (quoted flags)
    stamp = (out / "runs" / "grpo-G2-s0" / "final-eval-k6" / "eval.json").stat().st_mtime_ns
    assert compare.main([*argv, "--report-only"]) == 0  # reused, not evaluated again
    assert (out / "runs" / "grpo-G2-s0" / "final-eval-k6" / "eval.json").stat().st_mtime_ns == stamp


def test_a_negative_final_sample_count_is_refused():
    with pytest.raises(SystemExit, match="--final-samples must be >= 0, got -1"):
        _resolve(build_parser().parse_args(["--final-samples", "-1"]))
