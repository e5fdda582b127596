"""``ebpo meta``: evolution strategies search GBMPO's neural mirror map (docs/methods.md#es-meta-learning).

    ebpo meta --quick --out runs/meta-quick
    ebpo meta --out runs/meta --population 10 --iterations 15 --inner-steps 100
    ebpo meta --out runs/meta --resume                   # continue an interrupted search
    ebpo meta --task arithmetic --out runs/meta-arith    # another generated task
    ebpo train --method gbmpo-mirror --mirror-params runs/meta/mirror_params.json \
        --task-options '{exclude_eval_seeds: [424242]}'

Each ES member is an ordinary ``ebpo train`` run (``--method gbmpo-mirror``
with the member's 380 parameters) for ``--inner-steps`` steps on ``--task``
(default: ``ebpo train``'s, the built-in stepwise task; any task that draws
seeded held-out splits, i.e. takes ``eval_seed`` and ``exclude_eval_seeds``),
scored by its held-out accuracy (avg@k) on the first ``--eval-problems`` of a
*validation* split: the task's held-out set drawn with its own seed (424242)
and with the final held-out set excluded from both of its splits, so the
final evaluation never sees what the search optimised. Members train on the
same problems as a final run with ``--task-options '{exclude_eval_seeds:
[424242]}'`` (the validation set is kept out of training either way), so they
share its cached warm start: the map is searched for the policy it will be
used with. ``--train-args`` may add ``ebpo train`` flags but not repeat one
that meta sets for every member (an error says which). All members of an
iteration train from the same seed (common random numbers:
the fitness differences come from the mirror maps, not from sampling noise).
Members run ``--workers`` at a time; a member whose run fails is dropped from
the gradient estimate and counted (``failed`` in the log), never scored 0.

The ES update (:mod:`ebpo.meta.es`): antithetic population, sigma decay, step
size, elites and patience as in the GBMPO paper. Parameters are kept
non-negative by default (``--no-project-nonneg`` to reproduce the released
code, which can lose convexity and so D >= 0).

After every iteration the search state is written atomically to
``OUT/es_state.pt`` (with ``--resume`` the search continues from it and ends
with the same parameters as an uninterrupted search), and ``OUT/es_log.json``
and ``OUT/fitness.png`` are updated. At the end ``OUT/mirror_params.json``
holds the final ES parameters, for ``ebpo train --method gbmpo-mirror
--mirror-params FILE`` (or ``build_divergence("neural_mirror", params_path=FILE)``).

While a search runs, ``OUT`` is locked (a second ``ebpo meta`` on it is
refused, naming the PID). SIGTERM or Ctrl-C is passed to the running members;
the search then stops with one line and exit status 143 / 130, and
``--resume`` reruns the interrupted iteration from its start.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from ebpo.divergences import NeuralMirror
from ebpo.fileio import RunLock, check_output_dir, load_tensors, make_output_dir
from ebpo.meta.es import ESConfig, ESState, es_iteration
from ebpo.tasks.build import DEFAULT_TASK, task_factory
from ebpo.train.cli import check_extra_train_args, check_train_args, parse_yaml_mapping
from ebpo.train.procs import Stopped, run_parallel

__all__ = ["main"]

VALIDATION_SEED = 424_242
FINAL_EVAL_SEED = 1_000_003  # the built-in generated tasks' default held-out seed (arithmetic, stepwise)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ebpo meta", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="runs/meta", help="output directory (state, log, plot, parameters, member runs)"
    )
    parser.add_argument("--resume", action="store_true", help="continue the search saved in --out")
    parser.add_argument(
        "--quick", action="store_true", help="a small search (population 4, 2 iterations, 10 inner steps)"
    )
    parser.add_argument("--population", type=int, default=None, help="members per iteration, even (default 10)")
    parser.add_argument("--iterations", type=int, default=None, help="most ES iterations (default 15)")
    parser.add_argument("--sigma", type=float, default=0.01, help="initial perturbation scale")
    parser.add_argument("--sigma-decay", type=float, default=0.99, help="sigma is multiplied by this every iteration")
    parser.add_argument("--step-size", type=float, default=0.01, help="ES learning rate")
    parser.add_argument("--elite-frac", type=float, default=0.25, help="elites kept when an iteration does not improve")
    parser.add_argument("--patience", type=int, default=5, help="stop after this many iterations without improvement")
    parser.add_argument("--min-improvement", type=float, default=0.001, help="improvement that resets the patience")
    parser.add_argument(
        "--project-nonneg",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep parameters >= 0 (convex mirror map)",
    )
    parser.add_argument(
        "--inner-steps", type=int, default=None, help="RL steps each member trains (default 100, as the released code)"
    )
    parser.add_argument("--eval-problems", type=int, default=None, help="validation problems per member (default 256)")
    parser.add_argument("--init-seed", type=int, default=0, help="seed of the initial random mirror map (U(0, 0.01))")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the ES perturbations and of every member's training"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="member runs at once")
    parser.add_argument(
        "--task",
        default=DEFAULT_TASK,
        help=f"task the members train on (default {DEFAULT_TASK}, as ebpo train); it must draw seeded held-out splits, as the built-in generated tasks do",
    )
    parser.add_argument(
        "--task-options",
        type=parse_yaml_mapping,
        default={},
        help="the task's options, as a YAML mapping (not the split options, which meta sets)",
    )
    parser.add_argument("--train-args", default="", help="extra flags for every member's ebpo train, as one string")
    return parser


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    args.population = args.population or (4 if args.quick else 10)
    args.iterations = args.iterations or (2 if args.quick else 15)
    args.inner_steps = args.inner_steps or (10 if args.quick else 100)
    args.eval_problems = args.eval_problems or (64 if args.quick else 256)
    return args


def _member_command(args: argparse.Namespace, params_file: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ebpo",
        "train",
        *_own_flags(args, params_file, run_dir),
        *shlex.split(args.train_args),
    ]


def _own_flags(args: argparse.Namespace, params_file: Path, run_dir: Path) -> list[str]:
    """The ``ebpo train`` flags of a member that meta sets (``--train-args`` may not set them again)."""
    task_options = {**args.task_options, **_split_options()}
    return [
        "--method",
        "gbmpo-mirror",
        "--divergence-options",
        json.dumps({"params_path": str(params_file), "project_nonneg": args.project_nonneg}),
        "--task",
        args.task,
        "--task-options",
        json.dumps(task_options),
        "--max-eval-problems",
        str(args.eval_problems),
        "--steps",
        str(args.inner_steps),
        "--seed",
        str(args.seed),
        "--threads",
        "1",
        "--no-progress",
        "--no-tensorboard",
        "--save-every",
        "0",
        "--out",
        str(run_dir),
        "--overwrite",
    ]


def _split_options() -> dict[str, Any]:
    """The task options that draw the members' validation split: its own seed, the final held-out set kept out.

    The split keeps the task's ``num_eval`` (the final run's), and members
    score only its first ``--eval-problems`` (``--max-eval-problems``): the
    sets a task excludes are drawn with its ``num_eval``, so a smaller split
    would leave part of the final held-out set in training and give members
    other training problems (and another warm start) than the final runs.
    """
    return {"eval_seed": VALIDATION_SEED, "exclude_eval_seeds": [FINAL_EVAL_SEED]}


def _check_task(args: argparse.Namespace) -> None:
    """ValueError unless ``--task`` draws a seeded validation split (the options of :func:`_split_options`)."""
    clash = sorted(set(args.task_options) & set(_split_options()))
    if clash:
        raise ValueError(f"--task-options may not set {clash}: ebpo meta sets them to draw its validation split")
    factory = task_factory(args.task)  # an unknown task fails here, naming the registered ones
    try:  # the same introspection as the registries' option check (ebpo.registry.call_with_options)
        inspect.signature(factory).bind_partial(**_split_options())
    except TypeError:
        raise ValueError(
            f"task {args.task!r} does not take {list(_split_options())}: ebpo meta scores members on a validation "
            "split drawn with its own seed and without the final held-out set, which needs a generated task such "
            "as 'stepwise' or 'arithmetic'"
        ) from None
    except ValueError:  # no introspectable signature: building the task will speak
        pass


def _fitness(args: argparse.Namespace, out: Path, iteration: int):
    def evaluate(members: torch.Tensor) -> list[float | None]:
        folder = out / "members" / f"iter-{iteration:03d}"
        if folder.exists():
            shutil.rmtree(folder)  # a resumed iteration reruns its members from scratch
        jobs = []
        for i, params in enumerate(members):
            params_file = folder / f"member-{i:02d}.json"
            params_file.parent.mkdir(parents=True, exist_ok=True)
            NeuralMirror(params, project_nonneg=args.project_nonneg).save(params_file)
            jobs.append(
                (
                    f"member-{i:02d}",
                    _member_command(args, params_file, folder / f"member-{i:02d}"),
                    folder / f"member-{i:02d}.log",
                )
            )
        codes = run_parallel(jobs, args.workers)
        scores: list[float | None] = []
        for i in range(members.shape[0]):
            summary = folder / f"member-{i:02d}" / "summary.json"
            ok = codes.get(f"member-{i:02d}") == 0 and summary.exists()
            scores.append(float(json.loads(summary.read_text())["accuracy_after"]) if ok else None)
        return scores

    return evaluate


RESUMABLE_CHANGES = ("iterations", "patience")
"""Settings a resumed search may change (to extend it or stop it later); any other change is refused."""


def _search_settings(args: argparse.Namespace, config: ESConfig) -> dict[str, Any]:
    """Everything that decides the search's result: the ES settings and what every member trains and is scored on."""
    members = {
        "task": args.task,
        "task_options": args.task_options,
        "inner_steps": args.inner_steps,
        "eval_problems": args.eval_problems,
        "train_args": shlex.split(args.train_args),
        "init_seed": args.init_seed,
    }
    return {**config.__dict__, **members}


def _check_resumed_settings(recorded: dict[str, Any], args: argparse.Namespace, config: ESConfig) -> None:
    """ValueError if ``--resume`` asks for other settings than the ``recorded`` ones the search was made with."""
    now = json.loads(json.dumps(_search_settings(args, config)))  # compared as saved: JSON values
    changed = [
        f"{k} ({recorded[k]!r} -> {now[k]!r})"
        for k in now
        if k in recorded and k not in RESUMABLE_CHANGES and recorded[k] != now[k]
    ]
    if changed:
        raise ValueError(
            f"--resume with other settings than the search was started with: {', '.join(changed)}; resume with the "
            f"same flags (only {', '.join('--' + k for k in RESUMABLE_CHANGES)} may change) or start a new --out"
        )


def _save_state(state: ESState, config: ESConfig, out: Path, settings: dict[str, Any]) -> None:
    tmp = out / "es_state.pt.tmp"
    torch.save({"config": config.__dict__, "state": state.state_dict(), "settings": json.dumps(settings)}, tmp)
    os.replace(tmp, out / "es_state.pt")  # atomic: a kill mid-write keeps the previous iteration's state
    (out / "es_log.json").write_text(
        json.dumps({"config": config.__dict__, "settings": settings, "history": state.history}, indent=2)
    )
    _plot(state.history, out / "fitness.png")


def _plot(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [h["iteration"] for h in history if h["mean_fitness"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(its, [h["mean_fitness"] for h in history if h["mean_fitness"] is not None], "o-", label="population mean")
    ax.plot(its, [h["max_fitness"] for h in history if h["mean_fitness"] is not None], "s--", label="best member")
    ax.set(xlabel="ES iteration", ylabel="validation accuracy", title="GBMPO mirror-map search")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _start_or_resume(args: argparse.Namespace, config: ESConfig, out: Path) -> ESState:
    """The search state to continue from (read without unpickling), after checking ``out``; writes only the marker."""
    state_file = out / "es_state.pt"
    if args.resume:
        if not state_file.is_file():
            raise ValueError(f"--resume but {state_file} does not exist")
        saved = load_tensors(state_file, what="ES search state")
        try:
            state = ESState.from_state_dict(saved["state"])
            recorded = {
                **saved.get("config", {}),
                **json.loads(saved.get("settings", "{}")),
            }  # searches before 2026-11 saved only the ES config
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"ES search state {state_file} is not a search state written by ebpo meta ({exc})"
            ) from None
        _check_resumed_settings(recorded, args, config)
        state.done = state.iteration >= config.iterations or state.no_improvement >= config.patience
        print(f"resuming after iteration {state.iteration}")
        return state
    if state_file.exists():
        raise ValueError(f"{out} already holds a search; pass --resume to continue it or choose another --out")
    check_output_dir(out, "ebpo meta", reuse=True)
    make_output_dir(out, "ebpo meta")
    return ESState.start(NeuralMirror(seed=args.init_seed).flat_params, config)


def main(argv: list[str] | None = None) -> int:
    args = _resolve(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    out = Path(args.out)
    try:  # everything is checked before anything is written
        config = ESConfig(
            population=args.population,
            sigma=args.sigma,
            sigma_decay=args.sigma_decay,
            step_size=args.step_size,
            iterations=args.iterations,
            elite_frac=args.elite_frac,
            patience=args.patience,
            min_improvement=args.min_improvement,
            project_nonneg=args.project_nonneg,
            seed=args.seed,
        )
        _check_task(args)
        check_params, check_dir = out / "members" / "check.json", out / "members" / "check"
        check_train_args(_member_command(args, check_params, check_dir)[4:])
        check_extra_train_args(_own_flags(args, check_params, check_dir), shlex.split(args.train_args), "ebpo meta")
        holder = RunLock.holder(out)
        if holder is not None:
            raise ValueError(f"{out} is in use by {holder}; wait for it to finish or stop it (SIGTERM), then rerun")
        state = _start_or_resume(args, config, out)
        lock = RunLock(out, "ebpo meta").acquire()  # held until the search ends (released below)
    except ValueError as exc:
        print(f"ebpo meta: error: {exc}", file=sys.stderr)
        return 2
    try:
        while not state.done:
            state = es_iteration(state, config, _fitness(args, out, state.iteration + 1))
            record = state.history[-1]
            print(
                f"iteration {record['iteration']}: mean fitness {record['mean_fitness']}, best member {record['max_fitness']}, "
                f"failed {record['failed']}/{record['evaluated']}, improved {record['improved']}",
                flush=True,
            )
            _save_state(state, config, out, _search_settings(args, config))
        mirror = NeuralMirror(state.phi, project_nonneg=args.project_nonneg)
        mirror.save(out / "mirror_params.json")
        print(f"wrote {out / 'mirror_params.json'} (best population mean {state.best_mean_fitness:.4f})")
        low = min_divergence_on_grid(mirror)
        log = json.loads((out / "es_log.json").read_text()) if (out / "es_log.json").exists() else {}
        final_options = {**args.task_options, "exclude_eval_seeds": [VALIDATION_SEED]}
        (out / "es_log.json").write_text(
            json.dumps({**log, "min_divergence_on_grid": low, "final_run_task_options": final_options}, indent=2)
        )
        verdict = "D >= 0 holds" if low >= -1e-12 else "D < 0 somewhere: the map is not convex (see --project-nonneg)"
        print(f"min D(p, p_ref) over a 64 x 64 grid in (0, 1]: {low:.3e} ({verdict})")
        print(
            "train with it on the members' training problems and warm start (the validation split stays unseen):\n"
            f"  ebpo train --task {args.task} --method gbmpo-mirror --mirror-params {out / 'mirror_params.json'} --task-options '{json.dumps(final_options)}'"
        )
        return 0
    except Stopped as stop:
        again = shlex.join(["ebpo", "meta", *(a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume")])
        print(
            f"ebpo meta: stopped by {stop.name} in iteration {state.iteration + 1} (its members rerun on resume); "
            f"resume with: {again} --resume"
        )
        return stop.exit_code
    finally:
        lock.release()


def min_divergence_on_grid(mirror: NeuralMirror, points: int = 64) -> float:
    """Smallest D(p, p_ref) over p, p_ref on a log-spaced grid in [1e-6, 1] (the check the docs promise)."""
    grid = torch.logspace(-6, 0, points, dtype=torch.float64)
    p, p_ref = torch.meshgrid(grid, grid, indexing="ij")
    return float(mirror(p.log(), p_ref.log()).min())
