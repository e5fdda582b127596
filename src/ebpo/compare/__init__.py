"""``ebpo compare``: methods x group sizes x seeds of ``ebpo train``, aggregated with confidence intervals.

    ebpo compare --quick --out runs/compare-quick
    ebpo compare --methods grpo ebpo --group-sizes 2 4 8 --seeds 5 --out runs/compare
    ebpo compare --methods grpo dapo ebpo --group-sizes 4 --sample-budget 30720 --pool 2000 --out runs/equal-samples
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
different prior, a rollout allocation with its options) are compared with the
same machinery. ``--allocations A B`` adds, for every method M, the method
``M@A``: M's flags plus ``--allocation A`` (``grpo@eb``, ``ebpo@knapsack``);
methods with dynamic sampling (DAPO) are left out, since it redraws whole
groups of G and takes no allocation.

Equal steps or equal samples. By default every run takes ``--steps`` steps,
so a method that samples more per step (DAPO's resampling rounds) also
spends more samples. ``--sample-budget N`` compares at equal samples
instead: every run gets ``ebpo train --max-samples N`` and ``--steps`` =
ceil(N / (prompts per step x G)), so a run ends after the step at which it
has sampled N completions (DAPO at fewer steps; a run's last step may go
a little past N, which the at-budget columns interpolate away).
``--pool N`` gives every run ``--task-options '{num_train: N}'``: the
training stream cycles through N prompts, so prompts come back and
per-prompt history (``spo``, ``krpo``, the ``skip`` and ``eb`` allocations)
has something to use (2,000 prompts are about 4 epochs of 60 steps x 128).
A variant or ``--train-args`` that sets ``--task-options`` itself is refused
beside ``--pool``: put ``num_train`` in its task options instead. The
budget and the pool are recorded in ``compare.json`` with the other shared
settings, and a later slice that differs is refused.

Aggregation, per method and group size, over seeds: held-out accuracy
against samples consumed (what each run logged it sampled,
``rollout/samples``: every rank and DAPO resampling round; runs made before
that metric existed count prompts x G per step, times DAPO's rounds; the
k-th evaluation of every seed is one point, at the seeds' mean sample
count), mean and 95% Student-t CI; final accuracy and its gain over the
starting accuracy; with a budget, the in-training accuracy at exactly N
samples; samples needed to reach ``--target`` accuracy; samples per run; the
share of samples that sat in all-equal groups (no group-relative signal);
wall time per run (allocation included) and the allocation's own time;
mean step time; run-to-run standard deviation of the final accuracy; mean
completion length over training. Columns that old runs did not log read
"-". Paired by seed against ``--baseline`` (default GRPO): the final
difference with its CI and the seeds where the method did better, the
difference at the common sample budget, and the samples each seed needs to
reach the accuracy the baseline's run of the same seed ends at. Written as
``report.md``, ``report.json`` and PNG plots in ``OUT``, and one line per
paired method, printed last, saying whether its 95% CI excludes zero.

The plots put every method of a G on one sample axis: 0 to the budget, or
without one, 0 to the fewest samples any method used (a method that sampled
more, such as DAPO, is cut there rather than squashing the other curves; the
panel title and the report say so).

The final accuracy is measured once more after training with more samples per
problem (``--final-samples``, default 32; ``ebpo eval`` on the run's last
checkpoint, written to ``RUN/final-eval-kK/``): with the in-training avg@4 on
256 problems, the sampling noise of one evaluation (about 0.01) is as large as
the differences the comparison looks for. Paired by seed, both runs use the
same sampling seed. The curves keep the in-training evaluations.

``--quick`` is GRPO against EBPO on the stepwise testbed at G = 2, where
EBPO's effect is known to show (docs/compare-stepwise.md): 6 seeds of 10
steps of 128 prompts, about five minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import sys
from collections import Counter
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
# method at a given G.
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
# ``--quick``: GRPO against EBPO on the same testbed at G = 2, where EBPO's effect is known to show (about 70% of
# the samples sit in all-equal groups there). Chosen from the 10 seeds of the G = 2 isolation runs (guide.md):
# after 10 steps EBPO led by 1.7 points, standard deviation 1.0 over seeds, every seed better (after 20 steps
# +1.5 with a standard deviation of 2.4; after 60, +5.5). Six seeds of ten steps give a 95% CI of about one point
# and take about five minutes of an idle 2-core machine with the warm start trained on a fresh cache (less with
# the shipped one); measured: docs/compare-stepwise.md.
QUICK_BUDGET: dict[str, Any] = {
    "task": "stepwise",
    "group_sizes": [2],
    "seeds": 6,
    "steps": 10,
    "prompts_per_step": 128,
    "eval_every": 10,
    "max_eval_problems": 0,
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
    parser.add_argument(
        "--steps", type=int, default=None, help="RL steps per run (default: 60; with --sample-budget: derived from it)"
    )
    parser.add_argument(
        "--sample-budget",
        type=int,
        default=None,
        metavar="N",
        help="compare at equal samples: every run stops once it has sampled N completions (ebpo train --max-samples N; "
        "DAPO's resampling rounds count), with --steps = ceil(N / (prompts per step x G)) as the bound for methods "
        "that sample prompts x G per step",
    )
    parser.add_argument(
        "--pool",
        type=int,
        default=None,
        metavar="N",
        help="training pool of N prompts that the stream cycles through (every run gets --task-options "
        "'{num_train: N}'; a variant or --train-args may not set --task-options then); default: the task's own",
    )
    parser.add_argument(
        "--allocations",
        nargs="+",
        default=[],
        metavar="ALLOC",
        help="for each method M and each rollout allocation A listed, add the method M@A: M with --allocation A",
    )
    parser.add_argument(
        "--prompts-per-step", type=int, default=None, help="prompts per RL step, the same for every G (default: 128)"
    )
    parser.add_argument(
        "--eval-every", type=int, default=None, help="held-out evaluation every this many steps (default: 10)"
    )
    parser.add_argument("--task", default=None, help="task passed to ebpo train (default: stepwise)")
    parser.add_argument(
        "--max-eval-problems",
        type=int,
        default=None,
        help="held-out problems per evaluation (default: all)",
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
        "--quick",
        action="store_true",
        help="GRPO against EBPO at G = 2 on the stepwise testbed, 6 seeds of 10 steps, final accuracy from the last in-training evaluation: a real effect in about 5 minutes on 2 cores (the flags above still override it)",
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
    resampling = [m for m in args.methods if args.allocations and _resamples(args.variants.get(m) or ["--method", m])]
    if resampling:
        print(
            f"ebpo compare: --allocations leaves out {', '.join(resampling)}: dynamic sampling (DAPO) redraws whole "
            "groups of G and takes no allocation"
        )
    for alloc in args.allocations:  # METHOD@ALLOC: the method's own flags and the allocation
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", alloc):
            raise SystemExit(f"ebpo compare: --allocations takes allocation names, got {alloc!r}")
        for method in list(args.methods):
            if "@" in method or method in resampling:
                continue
            label = f"{method}@{alloc}"
            if label in args.methods:
                raise SystemExit(f"ebpo compare: method label {label!r} given twice")
            base = args.variants.get(method) or ["--method", method]
            if any(flag == "--allocation" or flag.startswith("--allocation=") for flag in base):
                raise SystemExit(f"ebpo compare: --allocations on {method!r}, whose flags set --allocation already")
            args.variants[label] = [*base, "--allocation", alloc]
            args.methods.append(label)
    if args.sample_budget is not None:
        if args.steps is not None:
            raise SystemExit(
                "ebpo compare: --sample-budget sets each run's --steps (ceil(N / (prompts per step x G))); drop --steps"
            )
        if args.sample_budget < 1:
            raise SystemExit(f"ebpo compare: --sample-budget must be >= 1, got {args.sample_budget}")
    if args.pool is not None and args.pool < 1:
        raise SystemExit(f"ebpo compare: --pool must be >= 1, got {args.pool}")
    budget = QUICK_BUDGET if quick else DEFAULT_BUDGET
    for key, value in budget.items():
        if getattr(args, key) is None and not (key == "steps" and args.sample_budget is not None):
            setattr(args, key, value)
    if (
        (args.steps is not None and args.steps < 1)
        or args.prompts_per_step < 1
        or args.eval_every < 1
        or args.seeds < 1
    ):
        raise SystemExit("ebpo compare: --steps, --prompts-per-step, --eval-every and --seeds must be >= 1")
    if args.final_samples < 0:
        raise SystemExit(f"ebpo compare: --final-samples must be >= 0, got {args.final_samples}")
    return args


def _resamples(flags: list[str]) -> bool:
    """Whether ``ebpo train`` with these flags uses dynamic sampling (DAPO's preset, or the flag), which the
    trainer refuses beside an allocation. Flags that do not parse count as not: compare's checks report them."""
    import contextlib
    import io

    from ebpo.train.cli import build_parser as train_parser
    from ebpo.train.presets import list_methods, preset

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            given = vars(train_parser().parse_args(flags))  # only the flags given: its defaults are suppressed
    except SystemExit:
        return False
    method = given.get("method")
    default = preset(method).get("dynamic_sampling", False) if method in list_methods() else False
    return bool(given.get("dynamic_sampling", default))


def steps_for_budget(sample_budget: int, prompts_per_step: int, group_size: int) -> int:
    """RL steps in which a method that samples ``prompts_per_step x group_size`` completions a step spends
    ``sample_budget``: the last step may go past it (``ebpo train --max-samples`` stops after that step).

    >>> steps_for_budget(15360, 128, 2), steps_for_budget(15361, 128, 2), steps_for_budget(100, 128, 8)
    (60, 61, 1)
    """
    return -(-sample_budget // (prompts_per_step * group_size))


def run_steps(args: argparse.Namespace, group_size: int) -> int:
    """``--steps`` of a run at ``group_size``: the given steps, or those of the sample budget."""
    if args.sample_budget is None:
        return args.steps
    return steps_for_budget(args.sample_budget, args.prompts_per_step, group_size)


def shared_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every run of the comparison shares; slices (other methods, G or seeds) must agree on it.

    ``sample_budget`` and ``pool`` are None when not given, which is also how a ``compare.json`` written before
    they existed reads, so older comparisons still take slices made without them."""
    return {
        "task": args.task,
        "steps": args.steps,
        "sample_budget": args.sample_budget,
        "pool": args.pool,
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
    budget = ["--max-samples", str(args.sample_budget)] if args.sample_budget is not None else []
    pool = ["--task-options", f"{{num_train: {args.pool}}}"] if args.pool is not None else []
    return [
        *method_flags,
        "--group-size",
        str(spec.group_size),
        "--seed",
        str(spec.seed),
        "--steps",
        str(run_steps(args, spec.group_size)),
        *budget,
        *pool,
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


def _start_sha(start: Any) -> str | None:
    """The weights hash of a summary's ``start``; None for a run from before it was recorded, or one malformed."""
    sha = start.get("weights_sha256") if isinstance(start, dict) else None
    return sha if isinstance(sha, str) and sha else None


def _read_run(run_dir: Path, prompts_per_step: int, group_size: int, final_samples: int = 0) -> dict[str, Any]:
    """A run's curves and final accuracy; the final one from its ``final_samples`` evaluation when that is given.

    The sample axis is what the run logged it sampled (``rollout/samples_total``, cumulative over every rank and
    resampling round, or the sum of the per-step ``rollout/samples``); a run that logged neither (made before
    they existed) counts ``prompts_per_step x group_size`` per step, times DAPO's ``dapo/rounds``. The share of
    samples in all-equal groups and the allocation time are None for such runs.
    """
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(str(run_dir / "metrics.jsonl"))  # file and line named if a row is broken
    samples, curve, step_times, lengths = 0.0, [(0.0, summary["accuracy_before"])], [], []
    length_curve: list[tuple[float, float]] = []
    seen_steps: set[int] = set()
    logged: dict[str, list[float]] = {"samples": [], "all_equal": [], "allocation": []}
    for row in rows:
        if row["step"] not in seen_steps and "time/step_seconds" in row:
            seen_steps.add(row["step"])  # a resumed run logs the steps after its checkpoint again: first one counts
            if "rollout/samples_total" in row:
                samples = float(row["rollout/samples_total"])
            elif "rollout/samples" in row:
                samples += row["rollout/samples"]
            else:
                samples += prompts_per_step * group_size * row.get("dapo/rounds", 1.0)
            for key, name in (
                ("samples", "rollout/samples"),
                ("all_equal", "rollout/all_equal_samples"),
                ("allocation", "time/allocation_seconds"),
            ):
                if name in row:
                    logged[key].append(float(row[name]))
            step_times.append(row["time/step_seconds"])
            if "rollout/completion_length" in row:
                lengths.append(row["rollout/completion_length"])
                length_curve.append((samples, row["rollout/completion_length"]))
        if "eval/accuracy" in row:
            curve.append((samples, row["eval/accuracy"]))
    steps = len(step_times)
    # only when every step logged it: a share over part of the run would read as the run's
    complete = {key: len(values) == steps and steps > 0 for key, values in logged.items()}
    all_equal_share = (
        sum(logged["all_equal"]) / sum(logged["samples"])
        if complete["all_equal"] and complete["samples"] and sum(logged["samples"]) > 0
        else None
    )
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
        "samples": samples,
        "samples_logged": complete["samples"],
        "all_equal_share": all_equal_share,
        "allocation_seconds": sum(logged["allocation"]) if complete["allocation"] else None,
        "wall_seconds": summary.get("wall_seconds"),
        "step_seconds": sum(step_times) / max(len(step_times), 1),
        "completion_length": sum(lengths) / len(lengths) if lengths else float("nan"),
        "by_topic": by_topic,
        "run_seconds": summary.get("wall_seconds", 0.0) + eval_seconds,
        "start": _start_sha(summary.get("start")),
    }


def _accuracy_within(curve: list[tuple[float, float]], budget: float) -> float:
    """Held-out accuracy after ``budget`` samples: linear between the evaluations around it, else the last one."""
    for (s0, a0), (s1, a1) in zip(curve, curve[1:]):
        if s0 <= budget <= s1:
            return a0 if s1 == s0 else a0 + (a1 - a0) * (budget - s0) / (s1 - s0)
    return curve[-1][1]


def _budget_of(run: dict[str, Any], sample_budget: int | None) -> float:
    """The samples a run is compared at: the comparison's budget, else what the run itself sampled."""
    return float(sample_budget) if sample_budget is not None else run["curve"][-1][0]


def _baseline_accuracy(run: dict[str, Any], sample_budget: int | None) -> float:
    """A baseline run's in-training accuracy at the comparison's budget (its last evaluation when none is set)."""
    if sample_budget is None:
        return run["curve"][-1][1]
    return _accuracy_within(run["curve"], sample_budget)


def paired_differences(
    runs: dict[RunSpec, dict[str, Any]], baseline: str, sample_budget: int | None = None
) -> dict[str, Any]:
    """Final accuracy minus ``baseline``'s, seed by seed (same seed: same start and prompt stream), per (method, G).

    ``at_budget``: the same on the in-training curves at a common number of samples: ``sample_budget`` for both
    runs when the comparison has one (each curve interpolated there), else the samples the baseline's run consumed
    (the method's accuracy interpolated there, minus the baseline's last): different from the final difference
    only for methods that sample more (DAPO).
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
            at_budget = [
                _accuracy_within(runs[s]["curve"], _budget_of(runs[b], sample_budget))
                - _baseline_accuracy(runs[b], sample_budget)
                for s, b in pairs
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


def _optional_ci(values: list[float | None]) -> dict[str, float] | None:
    """Mean and CI over seeds of a quantity that old runs did not log: None unless every seed has it."""
    if not values or any(v is None for v in values):
        return None
    return mean_ci([float(v) for v in values if v is not None])


def _to_baseline_final(
    runs: dict[RunSpec, dict[str, Any]], method: str, g: int, baseline: str, sample_budget: int | None
) -> dict[str, Any] | None:
    """Samples each seed of ``method`` needs to reach the accuracy ``baseline`` ends at (in-training curves).

    Paired per seed where the baseline ran that seed: the goal is that run's accuracy at the budget (its last
    evaluation without one) and the share is of that run's samples; a seed without a baseline run aims at the
    baseline's mean over seeds. Reaching is the first evaluation at or above the goal.
    """
    base = {s.seed: r for s, r in runs.items() if s.method == baseline and s.group_size == g}
    if not base:
        return None
    mean_goal = sum(_baseline_accuracy(r, sample_budget) for r in base.values()) / len(base)
    mean_budget = sum(_budget_of(r, sample_budget) for r in base.values()) / len(base)
    goals, reached, shares = [], [], []
    seeds = sorted(
        ((s, r) for s, r in runs.items() if s.method == method and s.group_size == g), key=lambda pair: pair[0].seed
    )
    for spec, run in seeds:
        paired = base.get(spec.seed)
        goal = _baseline_accuracy(paired, sample_budget) if paired is not None else mean_goal
        budget = _budget_of(paired, sample_budget) if paired is not None else mean_budget
        goals.append(goal)
        samples = samples_to_target([p[0] for p in run["curve"]], [p[1] for p in run["curve"]], goal)
        if samples is not None:
            reached.append(samples)
            shares.append(samples / budget if budget else float("nan"))
    return {
        "accuracy": sum(goals) / len(goals),
        "paired": all(spec.seed in base for spec, _ in seeds),
        "reached": f"{len(reached)}/{len(seeds)}",
        "samples": sum(reached) / len(reached) if reached else None,
        "fraction_of_budget": sum(shares) / len(shares) if shares else None,
    }


def aggregate_runs(
    runs: dict[RunSpec, dict[str, Any]],
    target: float | None,
    baseline: str | None = None,
    sample_budget: int | None = None,
) -> dict[str, Any]:
    """Mean and CI over seeds for every (method, G); paired differences against ``baseline`` when given.

    ``sample_budget``: the comparison's equal-samples budget; adds each row's in-training accuracy at exactly
    that many samples (interpolated between evaluations for a run that ends past it) and pairs the at-budget
    differences and the samples-to-reach goals there.
    """
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
            "accuracy_at_budget": (
                mean_ci([_accuracy_within(r["curve"], sample_budget) for r in seeds])
                if sample_budget is not None
                else None
            ),
            "gain": mean_ci(gains),
            "samples_to_target": (sum(reached) / len(reached)) if reached else None,
            "reached_target": f"{len(reached)}/{len(seeds)}",
            "samples": mean_ci([r.get("samples", r["curve"][-1][0]) for r in seeds]),
            "samples_logged": all(r.get("samples_logged", False) for r in seeds),
            "all_equal_share": _optional_ci([r.get("all_equal_share") for r in seeds]),
            "wall_seconds": _optional_ci([r.get("wall_seconds") for r in seeds]),
            "allocation_seconds": _optional_ci([r.get("allocation_seconds") for r in seeds]),
            "step_seconds": mean_ci([r["step_seconds"] for r in seeds]),
            "completion_length": mean_ci([r["completion_length"] for r in seeds]),
            "curve": curve,
            "length_curve": length_curve,
            "by_topic": {t: mean_ci([r["by_topic"][t] for r in seeds]) for t in topics},
            "run_seconds": sum(r["run_seconds"] for r in seeds),
        }
    paired = (
        paired_differences(runs, baseline, sample_budget)
        if baseline and any(s.method == baseline for s in runs)
        else {}
    )
    if paired:  # samples each method needs to reach the baseline's accuracy at the budget, at the same G
        for row in table.values():
            reach_row = _to_baseline_final(runs, row["method"], row["group_size"], baseline, sample_budget)
            if reach_row is not None:
                row["to_baseline_final"] = reach_row
    compute = sum(r["run_seconds"] for r in runs.values())
    starts = Counter(r.get("start") or "unrecorded" for r in runs.values())
    return {
        "target": target,
        "sample_budget": sample_budget,
        "x_range": shared_x_range(table, sample_budget),
        "rows": table,
        "baseline": baseline,
        "paired": paired,
        "runs": len(runs),
        "run_seconds": compute,
        "starts": dict(starts.most_common()),
    }


def shared_x_range(rows: dict[str, Any], sample_budget: int | None) -> dict[str, dict[str, Any]]:
    """The sample axis every method's curve is drawn on, per G: 0 to the budget when the comparison has one, else
    0 to the fewest samples any method's curve reaches (a method that samples more, DAPO, is cut there instead of
    squashing the others into the left of the plot). Keys are G as strings (JSON)."""
    out: dict[str, dict[str, Any]] = {}
    for g in sorted({row["group_size"] for row in rows.values()}):
        ends = {
            row["method"]: row["curve"][-1]["samples"]
            for row in rows.values()
            if row["group_size"] == g and row["curve"]
        }
        if not ends:
            continue
        if sample_budget is not None:
            out[str(g)] = {
                "max": float(sample_budget),
                "by": "budget",
                "cut": [m for m, e in ends.items() if e > sample_budget],
            }
            continue
        fewest = min(ends, key=lambda m: ends[m])
        out[str(g)] = {"max": ends[fewest], "by": fewest, "cut": sorted(m for m, e in ends.items() if e > ends[fewest])}
    return out


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


def _opt(ci: dict[str, float] | None, spec: str = ".3f") -> str:
    """A column that runs made before its metric existed leave empty ("-")."""
    return "-" if ci is None else format(ci["mean"], spec)


def _x_caption(result: dict[str, Any]) -> str:
    """What the plots' shared sample axis spans, per G, and which methods' curves it cuts."""
    parts = []
    for g, span in result.get("x_range", {}).items():
        cut = f"; cut there: {', '.join(span['cut'])}" if span["cut"] else ""
        if span["by"] == "budget":
            parts.append(f"G = {g}: 0 to the sample budget, {span['max']:.0f}{cut}")
        elif span["cut"]:
            parts.append(f"G = {g}: 0 to {span['max']:.0f}, the fewest samples any method used ({span['by']}){cut}")
        else:
            parts.append(f"G = {g}: 0 to {span['max']:.0f}, where every method ended")
    return "Every method on the same sample axis (" + "; ".join(parts) + ")." if parts else ""


def headline(result: dict[str, Any]) -> list[str]:
    """One line per method paired against the baseline: the difference, its 95% CI and how many seeds were better,
    and whether the interval excludes zero (what a newcomer reads first)."""
    lines = []
    for row in result.get("paired", {}).values():
        n = len(row["diffs"])
        half = row["ci_half_width"]
        if half != half:  # one seed: no interval
            verdict = "one seed: no confidence interval, run more seeds"
        elif row["mean"] - half > 0:
            verdict = f"the 95% CI excludes 0: {row['method']} is better here"
        elif row["mean"] + half < 0:
            verdict = f"the 95% CI excludes 0: {row['method']} is worse here"
        else:
            verdict = "the 95% CI includes 0: not resolved at this budget (more seeds or steps)"
        ci = f" ± {half:.3f}" if half == half else ""
        lines.append(
            f"{row['method']} minus {result['baseline']} at G = {row['group_size']}: {row['mean']:+.3f}{ci} "
            f"(final accuracy, 95% CI over {n} seeds), better in {row['better']}/{n} seeds; {verdict}"
        )
    return lines


def _starts_line(starts: dict[str, int]) -> list[str]:
    """The report's line on the models the runs began from (``summary.json``'s ``start``); none when no run says."""
    recorded = {sha: n for sha, n in starts.items() if sha != "unrecorded"}
    if not recorded:
        return []
    unrecorded = starts.get("unrecorded", 0)
    rest = f" ({unrecorded} runs made before summaries recorded their start do not say)" if unrecorded else ""
    if len(recorded) == 1:
        ((sha, n),) = recorded.items()
        return [
            f"Starting weights: all {n} runs that record it began from the same model (sha256 {sha[:16]}…, each "
            f"run's summary.json `start`){rest}; the built-in model's warm start is trained on the machine that "
            "first needs it, so compare absolute accuracies only with reports that name the same start.",
            "",
        ]
    listed = ", ".join(f"{sha[:16]}… ({n} runs)" for sha, n in recorded.items())
    return [
        f"**Starting weights differ**: the runs began from {len(recorded)} different models ({listed}){rest}, a "
        "warm start trained on another machine or a changed cache: their accuracies are not on one footing.",
        "",
    ]


def write_report(result: dict[str, Any], out: Path, command: str) -> str:
    budget = result.get("sample_budget")
    at_n = f"accuracy at {budget} samples" if budget is not None else None
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
        *_starts_line(result.get("starts", {})),
    ]
    if budget is not None:
        lines += [
            f"Equal samples: every run stopped after the step at which it had sampled {budget} completions. "
            f"{at_n.capitalize()}: the in-training accuracy interpolated (linearly between evaluations) at exactly "
            f"{budget} samples, for runs whose last step went past it.",
            "",
        ]
    lines += [
        "Samples per run: completions sampled (every resampling round; from the logged `rollout/samples`, else "
        "prompts x G per step). All-equal share: the run's samples that sat in groups whose correctness was "
        "all-equal (no group-relative signal). Wall s per run: the run's wall time (allocation included); "
        "allocation s: the part spent choosing group sizes. '-': runs made before these were logged.",
        "",
        "| G | method | seeds | final accuracy | run-to-run std | gain over start | samples to target (reached) | "
        "completion length | step s | " + (f"{at_n} | " if at_n else "") + "samples per run | all-equal share | "
        "wall s per run | allocation s per run |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if at_n else "") + "---|---|---|---|",
    ]
    for row in result["rows"].values():
        reach = f"{row['samples_to_target']:.0f}" if row["samples_to_target"] is not None else "-"
        at_budget = f"{_fmt(row['accuracy_at_budget'])} | " if at_n else ""
        samples = row.get("samples")
        lines.append(
            f"| {row['group_size']} | {row['method']} | {row['seeds']} | {_fmt(row['final_accuracy'])} | "
            f"{row['final_accuracy']['std']:.3f} | {_fmt(row['gain'])} | {reach} ({row['reached_target']}) | "
            f"{row['completion_length']['mean']:.2f} | {row['step_seconds']['mean']:.2f} | {at_budget}"
            f"{_opt(samples, '.0f')}{'' if row.get('samples_logged') else ' (computed)'} | "
            f"{_opt(row.get('all_equal_share'))} | {_opt(row.get('wall_seconds'), '.0f')} | "
            f"{_opt(row.get('allocation_seconds'), '.2f')} |"
        )
    if result.get("paired"):
        base = result["baseline"]
        where = f"{budget} samples" if budget is not None else "its sample budget"
        goal = f"{base}'s accuracy at {budget} samples" if budget is not None else f"{base}'s last in-training accuracy"
        lines += [
            "",
            f"Paired by seed (each seed starts from the same checkpoint and sees the same prompts): final accuracy "
            f"minus {base}'s, mean ± 95% CI, and the seeds where the method did better.",
            "",
            *(f"* {line}" for line in headline(result)),
            "",
            "The at-budget and samples-to-reach columns are on the curves' scale (the in-training evaluations), not "
            "the final avg@k. "
            + (
                f"At {budget} samples: each run's in-training accuracy interpolated (linearly between evaluations) at "
                f"{budget} samples, minus that of {base}'s run of the same seed. "
                if budget is not None
                else f"At {base}'s sample budget: the method's in-training accuracy interpolated (linearly between "
                f"evaluations) at the samples {base}'s run of the same seed consumed, minus that run's last "
                f"in-training accuracy (the same as the final difference up to evaluation noise, except for methods "
                f"that sample more, such as DAPO). "
            )
            + f"Samples to reach {goal}, paired by seed (each seed aims at the accuracy {base}'s run of the same "
            f"seed reached; mean of those goals: {_goals(result)}): the first evaluation at or above it, mean over the "
            f"seeds that reach it, and as a share of {base}'s samples.",
            "",
            f"| G | method | minus {base} | seeds better | minus {base} at {where} | "
            f"samples to {goal} (reached) | share of budget |",
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
    lines += ["", "![accuracy vs samples](accuracy_vs_samples.png)", "", _x_caption(result), ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps({"command": command, **result}, indent=2))
    _plot(result, out / "accuracy_vs_samples.png")
    return text


def _shared_x(ax: Any, result: dict[str, Any], g: int) -> None:
    span = result.get("x_range", {}).get(str(g))
    if span:
        ax.set_xlim(0, span["max"])


def _method_styles(methods: list[str]) -> dict[str, dict[str, Any]]:
    """A colour (and, past 20 methods, a dash pattern) per method, distinct for every method of the plot and the
    same in both panels. Matplotlib's default cycle has 10 colours, so an 11-method grid drew two methods alike."""
    import matplotlib

    palette = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"].colors
    dashes = ["-", "--", ":", "-."]
    return {
        method: {"color": palette[i % len(palette)], "linestyle": dashes[(i // len(palette)) % len(dashes)]}
        for i, method in enumerate(methods)
    }


def _plot(result: dict[str, Any], path: Path) -> dict[int, tuple[float, float]]:
    """Accuracy and completion length against samples, one column per G, every method on the G's shared sample
    axis (:func:`shared_x_range`); returns each G's x limits as drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({row["group_size"] for row in result["rows"].values()})
    styles = _method_styles(list(dict.fromkeys(row["method"] for row in result["rows"].values())))
    fig, axes = plt.subplots(2, len(sizes), figsize=(5 * len(sizes), 7.5), squeeze=False, sharey="row")
    for ax, g in zip(axes[1], sizes):  # completion length over training
        for row in result["rows"].values():
            if row["group_size"] == g and row.get("length_curve"):
                ax.plot(
                    [p["samples"] for p in row["length_curve"]],
                    [p["mean"] for p in row["length_curve"]],
                    label=row["method"],
                    **styles[row["method"]],
                )
        ax.set_xlabel("samples consumed")
        ax.grid(alpha=0.3)
        _shared_x(ax, result, g)
    axes[1][0].set_ylabel("completion length (tokens, mean over seeds)")
    for ax, g in zip(axes[0], sizes):
        for row in result["rows"].values():
            if row["group_size"] != g or not row["curve"]:
                continue
            xs = [p["samples"] for p in row["curve"]]
            ys = [p["mean"] for p in row["curve"]]
            half = [p["ci_half_width"] if p["ci_half_width"] == p["ci_half_width"] else 0.0 for p in row["curve"]]
            (line,) = ax.plot(xs, ys, marker="o", label=row["method"], **styles[row["method"]])
            ax.fill_between(
                xs,
                [y - h for y, h in zip(ys, half)],
                [y + h for y, h in zip(ys, half)],
                color=line.get_color(),
                alpha=0.15,
            )
        span = result.get("x_range", {}).get(str(g))
        cut = f"\n(axis cut at {span['max']:.0f} samples, the fewest of any method: {', '.join(span['cut'])} sampled more)"
        ax.set_title(f"G = {g}" + (cut if span and span["by"] != "budget" and span["cut"] else ""), fontsize=9)
        ax.grid(alpha=0.3)
        _shared_x(ax, result, g)
    axes[0][0].set_ylabel("held-out accuracy (mean, 95% CI)")
    axes[0][-1].legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    limits = {g: tuple(float(x) for x in ax.get_xlim()) for ax, g in zip(axes[0], sizes)}
    plt.close(fig)
    return limits  # type: ignore[return-value]


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
    result = {
        **aggregate_runs(runs, args.target, args.baseline, args.sample_budget),
        "final_samples": args.final_samples,
        "pool": args.pool,
    }
    print(write_report(result, out, shlex.join(["ebpo", "compare", *argv])))  # quoted: --variant/--train-args strings
    for line in headline(result):  # the answer, last on the screen
        print(line)
    return 0
