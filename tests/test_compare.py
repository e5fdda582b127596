"""ebpo compare: aggregation over seeds from run directories (written here as fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ebpo.compare import RunSpec, _command, _read_run, _resolve, aggregate_runs, build_parser, write_report


def make_run(path: Path, before: float, evals: list[float], after: float, rounds: float = 1.0) -> Path:
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
    (path / "summary.json").write_text(json.dumps({"accuracy_before": before, "accuracy_after": after}))
    return path


def test_read_run_counts_samples_including_resampling_rounds(tmp_path):
    run = _read_run(make_run(tmp_path / "a", 0.2, [0.3, 0.4], 0.5), prompts_per_step=4, group_size=2)
    assert run["curve"] == [(0.0, 0.2), (16.0, 0.3), (32.0, 0.4), (48.0, 0.5)]
    dapo = _read_run(make_run(tmp_path / "b", 0.2, [0.3, 0.4], 0.5, rounds=2.0), prompts_per_step=4, group_size=2)
    assert dapo["curve"][-1] == (96.0, 0.5)  # two sampling rounds per step: twice the samples
    assert run["completion_length"] == pytest.approx(3.5)  # mean over steps 1..6


def test_variants_run_their_own_flags_under_their_label(tmp_path):
    args = _resolve(
        build_parser().parse_args(
            ["--methods", "grpo", "--variant", "es_mirror", "--method gbmpo-mirror --mirror-params 'dir with space/m.json'", "--train-args", "--lr 0.5"]
        )
    )
    assert args.methods == ["grpo", "es_mirror"]
    variant = _command(RunSpec("es_mirror", 4, 1), args, tmp_path / "r")
    assert variant[variant.index("train") + 1 :][:4] == ["--method", "gbmpo-mirror", "--mirror-params", "dir with space/m.json"]
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
    runs = {RunSpec(m, 2, s): _read_run(make_run(tmp_path / f"{m}{s}", 0.2, [0.2, 0.2], a), 4, 2) for (m, s), a in finals.items()}
    result = aggregate_runs(runs, target=0.9, baseline="grpo")
    row = result["paired"]["ebpo|G=2"]
    assert row["diffs"] == pytest.approx([0.05, -0.02]) and row["better"] == 1
    assert row["mean"] == pytest.approx(0.015) and "grpo|G=2" not in result["paired"]
    assert "| 2 | ebpo | +0.015 ±" in write_report(result, tmp_path, "ebpo compare") and "1/2 |" in write_report(result, tmp_path, "x")
    assert aggregate_runs(runs, target=0.9, baseline="rloo")["paired"] == {}  # baseline not compared: no table
