"""Where one ``ebpo train`` step spends its time: phases and the heaviest torch operators.

    python benchmarks/profile_step.py                       # the throughput benchmark's setting (arithmetic, 32 x 8, 12 tokens)
    python benchmarks/profile_step.py --steps 5 -- --task stepwise --group-size 4 --prompts-per-step 128
    python benchmarks/profile_step.py --json benchmarks/results/profile_step.json

Builds a trainer exactly as ``ebpo train`` does (the flags after ``--`` are
``ebpo train`` flags; the run directory is a temporary one), runs
``--warmup`` steps untimed, then ``--steps`` steps under
``torch.profiler`` with the phases wrapped: rollout (generation,
verification), advantages, and the update split into the policy forward
(log-probs and entropy), the loss, the backward pass and the optimiser step.
Prints milliseconds per step for each phase, generation per generated token,
and the operators with the most self CPU time; writes all of it to JSON.
A profiler adds overhead of its own: read the shares, not the totals.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DEFAULT_TRAIN = [
    "--task",
    "arithmetic",
    "--method",
    "grpo",
    "--prompts-per-step",
    "32",
    "--group-size",
    "8",
    "--max-new-tokens",
    "12",
    "--max-eval-problems",
    "8",
    "--eval-samples",
    "1",
    "--eval-every",
    "0",
    "--save-every",
    "0",
    "--no-progress",
    "--no-tensorboard",
]


class Phases:
    """Wall-clock seconds per named phase, accumulated over the profiled steps."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.active = False

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return original(*args, **kwargs)
            started = time.perf_counter()
            with torch.profiler.record_function(label):
                result = original(*args, **kwargs)
            self.seconds[label] += time.perf_counter() - started
            return result

        object.__setattr__(owner, name, timed)  # also on frozen dataclasses (Dist)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, train_flags = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=max(1, min(os.cpu_count() or 1, 8)))
    parser.add_argument("--top", type=int, default=15, help="operators listed")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(own)

    from ebpo.train import cli
    from ebpo.train import trainer as trainer_module
    from ebpo.train.trainer import Trainer, build_components

    torch.set_num_threads(args.threads)
    flags = [*DEFAULT_TRAIN, *train_flags, "--steps", str(args.warmup + args.steps), "--threads", str(args.threads)]
    work = Path(tempfile.mkdtemp(prefix="ebpo-profile-"))
    config = cli.resolve_config(cli.build_parser().parse_args([*flags, "--out", str(work / "run")]))
    cli._quiet_transformers()
    trainer = Trainer(config, str(work / "run"), build_components(config), resume=False, echo=lambda _: None)
    trainer.accuracy_before, trainer.scores_before = 0.0, None  # no evaluation: only steps are profiled

    phases = Phases()
    phases.wrap(trainer_module, "generate", "rollout: generate")
    phases.wrap(trainer_module, "score", "rollout: verify")
    phases.wrap(trainer, "compute_advantages", "advantages")
    phases.wrap(trainer_module, "rows_logprobs", "update: forward")
    phases.wrap(trainer.c, "loss_fn", "update: loss")
    phases.wrap(trainer.dist, "backward", "update: backward")
    phases.wrap(trainer.dist, "clip_grad_norm_", "update: clip")
    phases.wrap(trainer.optimizer, "step", "update: optimiser")
    tokens = [0.0]
    generate_inner = trainer_module.generate

    def counting_generate(*a: Any, **k: Any) -> Any:
        rollout = generate_inner(*a, **k)
        if phases.active:
            tokens[0] += float(rollout.completion_mask.sum())
        return rollout

    trainer_module.generate = counting_generate

    for _ in range(args.warmup):
        _one_step(trainer)
    phases.active = True
    started = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            with torch.profiler.record_function("step"):
                _one_step(trainer)
    total = time.perf_counter() - started
    per_step = {name: 1000 * s / args.steps for name, s in sorted(phases.seconds.items())}
    per_step["other (bookkeeping, metrics)"] = 1000 * total / args.steps - sum(per_step.values())
    ops = [e for e in prof.key_averages() if not e.key.startswith(("step", "rollout:", "update:", "advantages"))]
    ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    top = [
        {
            "op": e.key,
            "calls_per_step": e.count / args.steps,
            "self_ms_per_step": e.self_cpu_time_total / 1000 / args.steps,
        }
        for e in ops[: args.top]
    ]
    result = {
        "train_flags": flags,
        "threads": args.threads,
        "steps": args.steps,
        "ms_per_step": 1000 * total / args.steps,
        "phases_ms_per_step": per_step,
        "generated_tokens_per_step": tokens[0] / args.steps,
        "generate_us_per_token": 1e6 * phases.seconds["rollout: generate"] / max(tokens[0], 1.0),
        "top_ops": top,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    print(
        f"ebpo train step, {args.threads} threads, {args.steps} profiled steps: {result['ms_per_step']:.1f} ms/step (profiler on)\n"
    )
    print("| phase | ms / step | share |\n|---|---|---|")
    for name, ms in per_step.items():
        print(f"| {name} | {ms:.1f} | {ms / result['ms_per_step']:.0%} |")
    print(
        f"\ngeneration: {result['generated_tokens_per_step']:.0f} tokens / step, {result['generate_us_per_token']:.1f} us per token\n"
    )
    print("| operator | calls / step | self ms / step |\n|---|---|---|")
    for row in top:
        print(f"| {row['op']} | {row['calls_per_step']:.0f} | {row['self_ms_per_step']:.1f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _one_step(trainer: Any) -> None:
    """One RL step as :meth:`Trainer.train` runs it (no evaluation, logging or saving)."""
    rollout, rewards, correctness, _ = trainer.rollout_and_score()
    advantages, _ = trainer.compute_advantages(rollout, rewards, correctness)
    trainer.update(rollout, advantages)
    trainer.step += 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
