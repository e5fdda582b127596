"""``ebpo compare``: methods x group sizes x seeds of ``ebpo train``, aggregated with confidence intervals.

    ebpo compare --quick --out runs/compare-quick
    ebpo compare --methods grpo ebpo --group-sizes 2 4 8 --seeds 5 --out runs/compare
    ebpo compare --methods gbmpo-probl2 --variant es_mirror "--method gbmpo-mirror --mirror-params runs/meta/mirror_params.json"

Every run is an ordinary ``ebpo train`` subprocess with its own run
directory under ``OUT/runs/``; ``--workers`` of them run at once, each with
one torch thread, so the CPU budget is used by parallel processes rather
than by threads that contend for two cores. A run whose ``summary.json``
already exists is reused, and a run that was stopped part-way (SIGTERM or
Ctrl-C to compare, which passes it to every running run; each saves a
checkpoint and stops) is resumed from its checkpoint, so an interrupted
comparison continues where it stopped (``--rerun`` forces fresh runs). While
it runs, ``OUT`` is locked: a second ``ebpo compare`` on it is refused.

A method is a ``--method`` preset, or a ``--variant LABEL "FLAGS"``: any
``ebpo train`` flags under a label of your choosing (the flags should name
a ``--method``), so settings that no preset covers (a learned mirror map, a
different prior) are compared with the same machinery.

Aggregation, per method and group size, over seeds: held-out accuracy
against samples consumed (responses generated; DAPO's resampling rounds
count; the k-th evaluation of every seed is one point, at the seeds' mean
sample count), mean and 95% Student-t CI; final accuracy and its gain over the
starting accuracy; samples needed to reach ``--target`` accuracy; mean step
time; run-to-run standard deviation of the final accuracy; mean completion
length over training. Written as ``report.md``, ``report.json`` and PNG plots in ``OUT``.

The final accuracy is measured once more after training with more samples per
problem (``--final-samples``, default 32; ``ebpo eval`` on the run's last
checkpoint, written to ``RUN/final-eval-kK/``): with the in-training avg@4 on
256 problems, the sampling noise of one evaluation (about 0.01) is as large as
the differences the comparison looks for. Paired by seed, both runs use the
same sampling seed. The curves keep the in-training evaluations.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ebpo.fileio import RunLock, check_output_dir, make_output_dir, step_dirs
from ebpo.stats_report import mean_ci, samples_to_target
from ebpo.train.cli import check_extra_train_args, check_train_args
from ebpo.train.procs import Stopped, run_parallel
from ebpo.train.tracking import read_metrics

__all__ = ["main", "RunSpec", "aggregate_runs"]

DEFAULT_METHODS = [
    "grpo",
    "dr_grpo",
    "rloo",
    "dapo",
    "ebpo",
    "ebpo-running",
    "ebpo-hier",
    "ha_dw",
    "ebpo+ha_dw",
    "gbmpo-probl2",
]
DEFAULT_VARIANTS = {
    "ebpo-running": ["--method", "ebpo", "--estimator-options", "{prior: running}"],
    "ebpo-hier": ["--method", "ebpo", "--estimator-options", "{hierarchical: true}"],
}
"""Methods that are not presets but settings of one: EBPO with the running (Welford over all steps) prior, and
EBPO with the hierarchical (per-topic, partially pooled) prior of docs/hierarchical-prior.md."""

# The default budget: the stepwise testbed with its recommended RL settings (docs/testbed.md), equal for every
# method at a given G; ``--quick`` keeps the small arithmetic comparison that fits in about 5 minutes.
DEFAULT_BUDGET: dict[str, Any] = {
    "task": "stepwise",
    "group_sizes": [2, 4, 8],
    "seeds": 10,
    "steps": 60,
    "prompts_per_step": 128,
    "eval_every": 10,
    "max_eval_problems": 0,
    "final_samples": 32,
}
QUICK_BUDGET: dict[str, Any] = {
    "task": "arithmetic",
    "group_sizes": [2, 4],
    "seeds": 2,
    "steps": 15,
    "prompts_per_step": 16,
    "eval_every": 5,
    "max_eval_problems": 128,
    "final_samples": 0,
}

SETTINGS_FILE = "compare.json"
"""Records the settings every run of a comparison shares, so that slices run later aggregate honestly."""


@dataclass(frozen=True)
class RunSpec:
    method: str
    group_size: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-G{self.group_size}-s{self.seed}".replace("+", "_")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ebpo compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--methods", nargs="+", default=None, help=f"--method presets to compare (default: {' '.join(DEFAULT_METHODS)})"
    )
    parser.add_argument("--group-sizes", nargs="+", type=int, default=None, help="group sizes G (default: 2 4 8)")
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per method and group size: 0 .. N-1 (default: 10)"
    )
    parser.add_argument("--steps", type=int, default=None, help="RL steps per run (default: 60)")
    parser.add_argument(
        "--prompts-per-step", type=int, default=None, help="prompts per RL step, the same for every G (default: 128)"
    )
    parser.add_argument(
        "--eval-every", type=int, default=None, help="held-out evaluation every this many steps (default: 10)"
    )
    parser.add_argument(
        "--task", default=None, help="task passed to ebpo train (default: stepwise; --quick: arithmetic)"
    )
    parser.add_argument(
        "--max-eval-problems",
        type=int,
        default=None,
        help="held-out problems per evaluation (default: all; --quick: 128)",
    )
    parser.add_argument(
        "--final-samples",
        type=int,
        default=None,
        help="samples per held-out problem of the final evaluation after training (0 = use the last in-training one; default: 32)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: aggregate the finished runs of the grid in OUT (a slice of a larger comparison so far); "
        "their final evaluations are run if missing",
    )
    parser.add_argument(
        "--target", type=float, default=None, help="accuracy whose samples-to-reach is reported (default: midway)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="runs at once (one torch thread each)")
    parser.add_argument("--out", default="runs/compare", help="output directory (runs/, report.md, report.json, PNGs)")
    parser.add_argument(
        "--quick", action="store_true", help="a small comparison that finishes in about 5 minutes on 2 cores"
    )
    parser.add_argument(
        "--rerun", action="store_true", help="rerun runs whose summary.json already exists (asks nothing: deletes them)"
    )
    parser.add_argument(
        "--baseline", default="grpo", help="method that paired differences are taken against (if compared)"
    )
    parser.add_argument("--train-args", default="", help="extra flags for every ebpo train run, as one string")
    parser.add_argument(
        "--variant",
        nargs=2,
        action="append",
        default=[],
        metavar=("LABEL", "FLAGS"),
        help="an extra method: LABEL in the report, FLAGS (one quoted string) passed to ebpo train; repeatable",
    )
    return parser


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    quick = args.quick
    args.variants = {}
    for label, flags in args.variant:
        if label in args.variants or (args.methods and label in args.methods):
            raise SystemExit(f"ebpo compare: method label {label!r} given twice")
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", label):
            raise SystemExit(f"ebpo compare: variant label {label!r} may use only letters, digits and _ . + -")
        args.variants[label] = shlex.split(flags)
    if args.variants and not args.methods:
        args.methods = []  # only the variants, unless presets are named too
    else:
        args.methods = args.methods or (["grpo", "ebpo"] if quick else DEFAULT_METHODS)
    for label in args.methods:  # a default variant named in --methods (ebpo-running) runs its flags
        if label in DEFAULT_VARIANTS and label not in args.variants:
            args.variants[label] = list(DEFAULT_VARIANTS[label])
    args.methods = list(dict.fromkeys(list(args.methods) + list(args.variants)))
    budget = QUICK_BUDGET if quick else DEFAULT_BUDGET
    for key, value in budget.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.prompts_per_step < 1 or args.eval_every < 1 or args.seeds < 1:
        raise SystemExit("ebpo compare: --steps, --prompts-per-step, --eval-every and --seeds must be >= 1")
    if args.final_samples < 0:
        raise SystemExit(f"ebpo compare: --final-samples must be >= 0, got {args.final_samples}")
    return args


def shared_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every run of the comparison shares; slices (other methods, G or seeds) must agree on it."""
    return {
        "task": args.task,
        "steps": args.steps,
        "prompts_per_step": args.prompts_per_step,
        "eval_every": args.eval_every,
        "max_eval_problems": args.max_eval_problems,
        "train_args": args.train_args,
        "variants": {label: args.variants[label] for label in sorted(args.variants)},
    }


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Raise ValueError when ``out`` holds runs made with other shared settings (a slice must match)."""
    path = out / SETTINGS_FILE
    if not path.exists():
        return
    recorded = json.loads(path.read_text())
    variants = {**recorded.get("variants", {}), **settings["variants"]}  # a slice may add variants
    clash = [k for k in settings if k != "variants" and recorded.get(k) != settings[k]]
    clash += [
        f"variant {label}"
        for label in settings["variants"]
        if recorded.get("variants", {}).get(label, variants[label]) != variants[label]
    ]
    if clash:
        detail = ", ".join(
            f"{k}: {recorded.get(k)!r} there, {settings.get(k)!r} now" for k in clash if not k.startswith("variant ")
        )
        raise ValueError(
            f"{out} holds a comparison made with other settings ({', '.join(clash)}{'; ' + detail if detail else ''}); "
            "a slice must use the same ones, or another --out"
        )


def record_settings(out: Path, settings: dict[str, Any]) -> None:
    path = out / SETTINGS_FILE
    if path.exists():
        settings = {
            **settings,
            "variants": {**json.loads(path.read_text()).get("variants", {}), **settings["variants"]},
        }
    path.write_text(json.dumps(settings, indent=2) + "\n")


def _command(spec: RunSpec, args: argparse.Namespace, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "ebpo", "train", *_own_flags(spec, args, run_dir), *shlex.split(args.train_args)]


def _own_flags(spec: RunSpec, args: argparse.Namespace, run_dir: Path, *, method: bool = True) -> list[str]:
    """The ``ebpo train`` flags compare sets for ``spec`` (``--train-args`` may not set them again); ``method``:
    with the method's flags (a variant's own flags may not set the others either)."""
    method_flags = (args.variants.get(spec.method) or ["--method", spec.method]) if method else []
    return [
        *method_flags,
        "--group-size",
        str(spec.group_size),
        "--seed",
        str(spec.seed),
        "--steps",
        str(args.steps),
        "--task",
        args.task,
        "--prompts-per-step",
        str(args.prompts_per_step),
        "--eval-every",
        str(args.eval_every),
        "--max-eval-problems",
        str(args.max_eval_problems),
        "--threads",
        "1",
        "--no-progress",
        "--save-every",
        "0",
        "--out",
        str(run_dir),
        "--overwrite",
    ]


def run_all(specs: list[RunSpec], args: argparse.Namespace, out: Path) -> dict[RunSpec, Path]:
    """Run every spec (``workers`` at a time); returns each spec's run directory."""
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    pending = [s for s in specs if args.rerun or not (runs_dir / s.name / "summary.json").exists()]
    if len(pending) < len(specs):
        print(f"reusing {len(specs) - len(pending)} finished runs in {runs_dir}")
    done = [len(specs) - len(pending)]

    def report(name: str, code: int, seconds: float) -> None:
        done[0] += 1
        status = "ok" if code == 0 else f"FAILED (exit {code}, see {runs_dir / name}.log)"
        if code in (130, 143):  # the run stopped cleanly on the signal we passed on; it resumes next time
            status = f"stopped by {'SIGINT' if code == 130 else 'SIGTERM'} (checkpoint saved; it resumes next time)"
        print(f"[{done[0]}/{len(specs)}] {name}: {status} ({seconds:.0f}s)", flush=True)

    def command(spec: RunSpec) -> list[str]:
        run_dir = runs_dir / spec.name
        if not args.rerun and (run_dir / "config.yaml").is_file() and step_dirs(str(run_dir / "checkpoints")):
            return [sys.executable, "-m", "ebpo", "train", "--resume", str(run_dir)]  # stopped part-way: continue
        return _command(spec, args, run_dir)

    jobs = [(s.name, command(s), runs_dir / f"{s.name}.log") for s in pending]
    codes = run_parallel(jobs, args.workers, on_done=report)
    failed = sorted(name for name, code in codes.items() if code != 0)
    if failed:  # a failed run is reported, never silently averaged in as 0
        raise SystemExit(f"ebpo compare: {len(failed)} run(s) failed: {', '.join(failed)}")
    return {s: runs_dir / s.name for s in specs}


def final_eval_dir(run_dir: Path, samples: int) -> Path:
    return run_dir / f"final-eval-k{samples}"


def evaluate_finals(dirs: dict[RunSpec, Path], samples: int, workers: int) -> None:
    """``ebpo eval`` of each finished run's last checkpoint with ``samples`` per problem, where not done yet."""
    pending = [d for d in dirs.values() if not (final_eval_dir(d, samples) / "eval.json").is_file()]
    if not pending:
        return
    print(f"ebpo compare: final evaluation (avg@{samples}) of {len(pending)} runs, {workers} at a time", flush=True)

    def report(name: str, code: int, seconds: float) -> None:
        print(
            f"  final evaluation of {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} ({seconds:.0f}s)",
            flush=True,
        )

    jobs = [
        (
            d.name,
            [
                sys.executable,
                "-m",
                "ebpo",
                "eval",
                "--model",
                str(d),
                "--samples",
                str(samples),
                "--k",
                "1",
                "--threads",
                "1",
                "--out",
                str(final_eval_dir(d, samples)),
            ],
            d.parent / f"{d.name}.final-eval-k{samples}.log",
        )
        for d in pending
    ]
    failed = sorted(name for name, code in run_parallel(jobs, workers, on_done=report).items() if code != 0)
    if failed:
        raise SystemExit(f"ebpo compare: the final evaluation of {len(failed)} run(s) failed: {', '.join(failed)}")


def _read_run(run_dir: Path, prompts_per_step: int, group_size: int, final_samples: int = 0) -> dict[str, Any]:
    """A run's curves and final accuracy; the final one from its ``final_samples`` evaluation when that is given."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(str(run_dir / "metrics.jsonl"))  # file and line named if a row is broken
    samples, curve, step_times, lengths = 0.0, [(0.0, summary["accuracy_before"])], [], []
    length_curve: list[tuple[float, float]] = []
    seen_steps: set[int] = set()
    for row in rows:
        if row["step"] not in seen_steps and "time/step_seconds" in row:
            seen_steps.add(row["step"])
            samples += prompts_per_step * group_size * row.get("dapo/rounds", 1.0)
            step_times.append(row["time/step_seconds"])
            if "rollout/completion_length" in row:
                lengths.append(row["rollout/completion_length"])
                length_curve.append((samples, row["rollout/completion_length"]))
        if "eval/accuracy" in row:
            curve.append((samples, row["eval/accuracy"]))
    final, by_topic = (
        summary["accuracy_after"],
        {topic: row["after"] for topic, row in summary.get("accuracy_by_topic", {}).items()},
    )
    eval_seconds = 0.0
    if final_samples:
        path = final_eval_dir(run_dir, final_samples) / "eval.json"
        if not path.is_file():
            raise ValueError(f"{run_dir} has no final evaluation with {final_samples} samples ({path} is missing)")
        evaluation = json.loads(path.read_text())
        ((suite, metrics),) = evaluation["results"].items()
        final = metrics[f"avg@{final_samples}"]
        by_topic = {topic: row["avg"] for topic, row in evaluation.get("by_topic", {}).get(suite, {}).items()}
        eval_seconds = evaluation.get("wall_seconds", 0.0)
    return {
        "summary": summary,
        "final": final,
        "curve": curve,
        "length_curve": length_curve,
        "step_seconds": sum(step_times) / max(len(step_times), 1),
        "completion_length": sum(lengths) / len(lengths) if lengths else float("nan"),
        "by_topic": by_topic,
        "run_seconds": summary.get("wall_seconds", 0.0) + eval_seconds,
    }


def _accuracy_within(curve: list[tuple[float, float]], budget: float) -> float:
    """Held-out accuracy after ``budget`` samples: linear between the evaluations around it, else the last one."""
    for (s0, a0), (s1, a1) in zip(curve, curve[1:]):
        if s0 <= budget <= s1:
            return a0 if s1 == s0 else a0 + (a1 - a0) * (budget - s0) / (s1 - s0)
    return curve[-1][1]


def paired_differences(runs: dict[RunSpec, dict[str, Any]], baseline: str) -> dict[str, Any]:
    """Final accuracy minus ``baseline``'s, seed by seed (same seed: same start and prompt stream), per (method, G).

    ``at_budget``: the same at the baseline's sample budget (the method's accuracy interpolated at the samples the
    baseline's run consumed): different from the final difference only for methods that sample more (DAPO).
    """
    out: dict[str, Any] = {}
    final = {s: r["final"] for s, r in runs.items()}
    for method, g in sorted(
        {(s.method, s.group_size) for s in runs if s.method != baseline}, key=lambda k: (k[1], k[0])
    ):
        pairs = [
            (s, RunSpec(baseline, g, s.seed))
            for s in sorted(final, key=lambda s: s.seed)
            if s.method == method and s.group_size == g and RunSpec(baseline, g, s.seed) in final
        ]
        if pairs:
            diffs = [final[s] - final[b] for s, b in pairs]
            # on the in-training evaluations (the curves): the method's, interpolated, minus the baseline's last
            at_budget = [
                _accuracy_within(runs[s]["curve"], runs[b]["curve"][-1][0]) - runs[b]["curve"][-1][1] for s, b in pairs
            ]
            out[f"{method}|G={g}"] = {
                "method": method,
                "group_size": g,
                "diffs": diffs,
                "better": sum(d > 0 for d in diffs),
                **mean_ci(diffs),
                "at_budget": {"diffs": at_budget, "better": sum(d > 0 for d in at_budget), **mean_ci(at_budget)},
            }
    return out


def aggregate_runs(
    runs: dict[RunSpec, dict[str, Any]], target: float | None, baseline: str | None = None
) -> dict[str, Any]:
    """Mean and CI over seeds for every (method, G); paired differences against ``baseline`` when given."""
    table: dict[str, Any] = {}
    befores = [r["summary"]["accuracy_before"] for r in runs.values()]
    if target is None:
        finals = [r["curve"][-1][1] for r in runs.values()]
        target = (sum(befores) / len(befores) + max(finals)) / 2
    keys = sorted({(s.method, s.group_size) for s in runs}, key=lambda k: (k[1], k[0]))
    for method, g in keys:
        seeds = [r for s, r in runs.items() if s.method == method and s.group_size == g]
        finals = [r["final"] for r in seeds]
        gains = [r["final"] - r["summary"]["accuracy_before"] for r in seeds]
        reach = [samples_to_target([p[0] for p in r["curve"]], [p[1] for p in r["curve"]], target) for r in seeds]
        reached = [x for x in reach if x is not None]
        # Seeds evaluate at the same steps; with dynamic sampling (DAPO) the samples consumed by then differ
        # per seed, so the k-th evaluation of every seed is one point at the seeds' mean sample count.
        evaluations = min(len(r["curve"]) for r in seeds)
        curve = []
        for k in range(evaluations):
            xs, ys = [r["curve"][k][0] for r in seeds], [r["curve"][k][1] for r in seeds]
            curve.append({"samples": sum(xs) / len(xs), "samples_min": min(xs), "samples_max": max(xs), **mean_ci(ys)})
        steps = min(len(r.get("length_curve", [])) for r in seeds)
        length_curve = [
            {
                "samples": sum(r["length_curve"][k][0] for r in seeds) / len(seeds),
                **mean_ci([r["length_curve"][k][1] for r in seeds]),
            }
            for k in range(steps)
        ]
        topics = sorted(set.intersection(*(set(r.get("by_topic", {})) for r in seeds)))
        table[f"{method}|G={g}"] = {
            "method": method,
            "group_size": g,
            "seeds": len(seeds),
            "final_accuracy": mean_ci(finals),
            "gain": mean_ci(gains),
            "samples_to_target": (sum(reached) / len(reached)) if reached else None,
            "reached_target": f"{len(reached)}/{len(seeds)}",
            "step_seconds": mean_ci([r["step_seconds"] for r in seeds]),
            "completion_length": mean_ci([r["completion_length"] for r in seeds]),
            "curve": curve,
            "length_curve": length_curve,
            "by_topic": {t: mean_ci([r["by_topic"][t] for r in seeds]) for t in topics},
            "run_seconds": sum(r["run_seconds"] for r in seeds),
        }
    paired = paired_differences(runs, baseline) if baseline and any(s.method == baseline for s in runs) else {}
    if paired:  # samples each method needs to reach the baseline's last in-training accuracy (seed mean) at the same G
        for row in table.values():
            base = table.get(f"{baseline}|G={row['group_size']}")
            if base is None:
                continue
            goal = base["curve"][-1]["mean"]  # on the curves' scale: the in-training evaluations
            seeds = [r for s, r in runs.items() if s.method == row["method"] and s.group_size == row["group_size"]]
            reach = [samples_to_target([p[0] for p in r["curve"]], [p[1] for p in r["curve"]], goal) for r in seeds]
            reached = [x for x in reach if x is not None]
            budget = base["curve"][-1]["samples"] if base["curve"] else float("nan")
            row["to_baseline_final"] = {
                "accuracy": goal,
                "reached": f"{len(reached)}/{len(seeds)}",
                "samples": sum(reached) / len(reached) if reached else None,
                "fraction_of_budget": (sum(reached) / len(reached) / budget) if reached and budget else None,
            }
    compute = sum(r["run_seconds"] for r in runs.values())
    return {
        "target": target,
        "rows": table,
        "baseline": baseline,
        "paired": paired,
        "runs": len(runs),
        "run_seconds": compute,
    }


def _fmt(ci: dict[str, float]) -> str:
    half = ci["ci_half_width"]
    return f"{ci['mean']:.3f} ± {half:.3f}" if half == half else f"{ci['mean']:.3f}"


def _paired(row: dict[str, Any]) -> str:
    half = f" ± {row['ci_half_width']:.3f}" if row["ci_half_width"] == row["ci_half_width"] else ""
    return f"{row['mean']:+.3f}{half} ({row['better']}/{len(row['diffs'])})"


def _goals(result: dict[str, Any]) -> str:
    """The accuracy each G's samples-to-reach column aims at, e.g. ``G = 2: 0.377, G = 4: 0.492``."""
    goals = {
        row["group_size"]: row["to_baseline_final"]["accuracy"]
        for row in result["rows"].values()
        if "to_baseline_final" in row
    }
    return ", ".join(f"G = {g}: {a:.3f}" for g, a in sorted(goals.items()))


def write_report(result: dict[str, Any], out: Path, command: str) -> str:
    lines = [
        "# ebpo compare",
        "",
        f"Command: `{command}`",
        "",
        f"Held-out accuracy (mean ± 95% CI over seeds). Target for samples-to-reach: {result['target']:.3f}. "
        f"{result.get('runs', 0)} runs, {result.get('run_seconds', 0.0) / 3600:.2f} h of run time in all (each run one thread).",
        "",
        (
            f"Final accuracy: avg@{result['final_samples']} on the held-out set after the last step (each run's "
            f"final-eval-k{result['final_samples']}/); curves and samples-to-reach: the in-training evaluations."
            if result.get("final_samples")
            else "Final accuracy: the last in-training evaluation."
        ),
        "",
        "| G | method | seeds | final accuracy | run-to-run std | gain over start | samples to target (reached) | completion length | step s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"].values():
        reach = f"{row['samples_to_target']:.0f}" if row["samples_to_target"] is not None else "-"
        lines.append(
            f"| {row['group_size']} | {row['method']} | {row['seeds']} | {_fmt(row['final_accuracy'])} | "
            f"{row['final_accuracy']['std']:.3f} | {_fmt(row['gain'])} | {reach} ({row['reached_target']}) | "
            f"{row['completion_length']['mean']:.2f} | {row['step_seconds']['mean']:.2f} |"
        )
    if result.get("paired"):
        lines += [
            "",
            f"Paired by seed (each seed starts from the same checkpoint and sees the same prompts): final accuracy "
            f"minus {result['baseline']}'s, mean ± 95% CI, and the seeds where the method did better.",
            "",
            f"The at-budget and samples-to-reach columns are on the curves' scale (the in-training evaluations), not "
            f"the final avg@k. "
            f"At {result['baseline']}'s sample budget: the method's in-training accuracy interpolated (linearly between "
            f"evaluations) at the samples {result['baseline']}'s run of the same seed consumed, minus that run's last "
            f"in-training accuracy (the same as the final difference up to evaluation noise, except for methods that "
            f"sample more, such as DAPO). Samples to reach {result['baseline']}'s last in-training accuracy, mean over "
            f"seeds ({_goals(result)}): mean over the seeds that reach it, and as a share of the budget.",
            "",
            f"| G | method | minus {result['baseline']} | seeds better | minus {result['baseline']} at its sample budget | "
            f"samples to {result['baseline']}'s last in-training accuracy (reached) | share of budget |",
            "|---|---|---|---|---|---|---|",
        ]
        rows = result["rows"]
        for row in result["paired"].values():
            reach = rows.get(f"{row['method']}|G={row['group_size']}", {}).get("to_baseline_final") or {}
            samples = f"{reach['samples']:.0f}" if reach.get("samples") is not None else "-"
            share = f"{reach['fraction_of_budget']:.2f}" if reach.get("fraction_of_budget") is not None else "-"
            lines.append(
                f"| {row['group_size']} | {row['method']} | {_paired(row).rsplit(' (', 1)[0]} | "
                f"{row['better']}/{len(row['diffs'])} | {_paired(row['at_budget'])} | {samples} ({reach.get('reached', '-')}) | {share} |"
            )
    topics = sorted({t for row in result["rows"].values() for t in row.get("by_topic", {})})
    if topics:
        lines += [
            "",
            "Final held-out accuracy per topic (mean over seeds).",
            "",
            "| G | method | " + " | ".join(topics) + " |",
            "|---|---|" + "---|" * len(topics),
        ]
        for row in result["rows"].values():
            cells = [f"{row['by_topic'][t]['mean']:.3f}" if t in row.get("by_topic", {}) else "-" for t in topics]
            lines.append(f"| {row['group_size']} | {row['method']} | " + " | ".join(cells) + " |")
    lines += ["", "![accuracy vs samples](accuracy_vs_samples.png)", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps({"command": command, **result}, indent=2))
    _plot(result, out / "accuracy_vs_samples.png")
    return text


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({row["group_size"] for row in result["rows"].values()})
    fig, axes = plt.subplots(2, len(sizes), figsize=(5 * len(sizes), 7.5), squeeze=False, sharey="row")
    for ax, g in zip(axes[1], sizes):  # completion length over training
        for row in result["rows"].values():
            if row["group_size"] == g and row.get("length_curve"):
                ax.plot(
                    [p["samples"] for p in row["length_curve"]],
                    [p["mean"] for p in row["length_curve"]],
                    "-",
                    label=row["method"],
                )
        ax.set_xlabel("samples consumed")
        ax.grid(alpha=0.3)
    axes[1][0].set_ylabel("completion length (tokens, mean over seeds)")
    for ax, g in zip(axes[0], sizes):
        for row in result["rows"].values():
            if row["group_size"] != g or not row["curve"]:
                continue
            xs = [p["samples"] for p in row["curve"]]
            ys = [p["mean"] for p in row["curve"]]
            half = [p["ci_half_width"] if p["ci_half_width"] == p["ci_half_width"] else 0.0 for p in row["curve"]]
            (line,) = ax.plot(xs, ys, "o-", label=row["method"])
            ax.fill_between(
                xs,
                [y - h for y, h in zip(ys, half)],
                [y + h for y, h in zip(ys, half)],
                color=line.get_color(),
                alpha=0.15,
            )
        ax.set_title(f"G = {g}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy (mean, 95% CI)")
    axes[0][-1].legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _resolve(build_parser().parse_args(argv))
    out = Path(args.out)
    try:  # checked before any run starts or anything is written
        for method, g in itertools.product(args.methods, sorted(args.group_sizes)):  # seeds differ only in --seed
            # components are built once per method, at the smallest G (estimators state a minimum group size)
            spec, check_dir, first = RunSpec(method, g, 0), out / "runs" / "check", g == min(args.group_sizes)
            check_train_args(_command(spec, args, check_dir)[4:], build=first)
            if first:  # which flags compare sets does not depend on G: once per method
                check_extra_train_args(_own_flags(spec, args, check_dir), shlex.split(args.train_args), "ebpo compare")
            if first and method in args.variants:
                own = _own_flags(spec, args, check_dir, method=False)
                check_extra_train_args(own, args.variants[method], "ebpo compare", source=f"--variant {method}")
        check_output_dir(out, "ebpo compare", reuse=True)
        holder = None if args.report_only else RunLock.holder(out)
        if holder is not None:
            raise ValueError(f"{out} is in use by {holder}; wait for it to finish or stop it (SIGTERM), then rerun")
        check_settings(out, shared_settings(args))
    except ValueError as exc:
        print(f"ebpo compare: error: {exc}", file=sys.stderr)
        return 2
    try:
        return _run_and_report(args, argv, out)
    except Stopped as stop:
        print(f"ebpo compare: stopped by {stop.name}; rerun the same command to continue (stopped runs resume)")
        return stop.exit_code


def _run_and_report(args: argparse.Namespace, argv: list[str], out: Path) -> int:
    # Seed-major order: a comparison stopped part-way has every method at the same seeds (balanced pairs).
    specs = [RunSpec(m, g, s) for s, g, m in itertools.product(range(args.seeds), args.group_sizes, args.methods)]
    if args.report_only:
        dirs = {s: out / "runs" / s.name for s in specs if (out / "runs" / s.name / "summary.json").is_file()}
        print(f"ebpo compare: {len(dirs)} of {len(specs)} runs of the grid have finished in {out / 'runs'}")
        if not dirs:
            print("ebpo compare: error: no finished run to report", file=sys.stderr)
            return 2
    else:
        make_output_dir(out, "ebpo compare")
        try:
            lock = RunLock(out, "ebpo compare").acquire()  # held until this process ends (released below)
        except ValueError as exc:
            print(f"ebpo compare: error: {exc}", file=sys.stderr)
            return 2
        try:
            record_settings(out, shared_settings(args))
            print(
                f"ebpo compare: {len(specs)} runs ({len(args.methods)} methods x {len(args.group_sizes)} G x {args.seeds} seeds), {args.workers} at a time"
            )
            dirs = run_all(specs, args, out)
            if args.final_samples:
                evaluate_finals(dirs, args.final_samples, args.workers)
        finally:
            lock.release()
    if args.final_samples and args.report_only:
        evaluate_finals(dirs, args.final_samples, args.workers)
    runs = {s: _read_run(d, args.prompts_per_step, s.group_size, args.final_samples) for s, d in dirs.items()}
    result = {**aggregate_runs(runs, args.target, args.baseline), "final_samples": args.final_samples}
    print(write_report(result, out, shlex.join(["ebpo", "compare", *argv])))  # quoted: --variant/--train-args strings
    return 0
