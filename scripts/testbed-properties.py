"""Properties of a built-in task at the start of RL: is it in the regime the papers talk about?

    python scripts/testbed-properties.py --task stepwise --out runs/testbed-properties.json

Builds the built-in model, warm-starts it exactly as ``ebpo train`` does
(same cache key: a following ``ebpo train`` with the same task and warm-start
settings reuses it), then samples from it and prints:

* mean completion length (tokens, EOS not counted) of the held-out samples;
* held-out avg@4, sampled as ``ebpo train`` evaluates (seed + 7919, the
  rollout temperature), and avg@1 / pass@16 from 16 samples per problem;
* the share of all-fail groups among training prompts at G = 4 (and 8);
* held-out accuracy per topic, and the spread between easiest and hardest.

Each property is checked against the testbed's targets (docs/testbed.md)
and the table says which pass. Writes everything to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import yaml

from ebpo.eval_metrics import pass_at_k
from ebpo.models.loading import TinyLlamaSpec, load_policy
from ebpo.sampling import EVAL_SEED_OFFSET, sample_correctness
from ebpo.tasks.build import build_task, build_verifier_for
from ebpo.train.warmstart import cached_warmstart, train_data_id

TARGETS = {
    "mean_completion_tokens": (">=", 15.0),
    "avg@4": ("in", (0.15, 0.45)),
    "pass@16 / avg@1": (">=", 1.8),
    "all_fail_frac@G4": (">=", 0.30),
    "topic_spread": (">=", 0.40),
}


def _check(name: str, value: float) -> str:
    kind, bound = TARGETS[name]
    ok = bound[0] <= value <= bound[1] if kind == "in" else value >= bound  # type: ignore[index,operator]
    return "yes" if ok else "NO"


def _commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def measure(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    task_options = yaml.safe_load(args.task_options) if args.task_options else {}
    task = build_task(args.task, task_options)
    verifier = build_verifier_for(task, None)
    recommended = getattr(task, "recommended", {})
    max_new_tokens = args.max_new_tokens or recommended.get("max_new_tokens", 12)
    for name, default in (("warmstart_steps", 300), ("warmstart_lr", 3e-3), ("warmstart_batch_size", 128)):
        if getattr(args, name) is None:
            setattr(args, name, recommended.get(name, default))
    spec = TinyLlamaSpec()
    model, tokenizer = load_policy("builtin:tiny", device=torch.device("cpu"), spec=spec, seed=args.warmstart_seed)
    problems = task.train_problems()
    started = time.time()
    if args.warmstart_steps > 0:
        model, _ = cached_warmstart(
            model,
            tokenizer,
            problems,
            spec=spec,
            task_id=train_data_id(args.task, problems),
            steps=args.warmstart_steps,
            lr=args.warmstart_lr,
            batch_size=args.warmstart_batch_size,
            seed=args.warmstart_seed,
        )
    warmstart_s = time.time() - started
    model.eval()
    sampling = dict(
        max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, chat_template="never", generation_batch_size=0
    )
    held_out = list(task.eval_problems())
    # avg@4 exactly as the trainer's evaluation samples it (same seed offset).
    rewards4, _ = sample_correctness(
        model, tokenizer, held_out, verifier, samples=4, seed=args.seed + EVAL_SEED_OFFSET, **sampling
    )
    rewards16, texts16 = sample_correctness(
        model, tokenizer, held_out, verifier, samples=16, seed=args.seed + 1, **sampling
    )
    correct16 = (rewards16 >= 1.0).double()  # (P, 16)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for row in texts16 for t in row]
    train = [
        problems[i]
        for i in torch.randperm(len(problems), generator=torch.Generator().manual_seed(args.seed))[
            : args.train_groups
        ].tolist()
    ]
    rewards_train, _ = sample_correctness(model, tokenizer, train, verifier, samples=8, seed=args.seed + 2, **sampling)
    correct_train = rewards_train >= 1.0  # (N, 8): the first 4 columns are a G = 4 group
    per_topic: dict[str, dict[str, float]] = {}
    for topic in dict.fromkeys(p.topic for p in held_out):
        rows = torch.tensor([p.topic == topic for p in held_out])
        per_topic[str(topic)] = {
            "problems": int(rows.sum()),
            "avg@16": float(correct16[rows].mean()),
            "pass@16": pass_at_k(correct16[rows], 16),
        }
    accuracies = [v["avg@16"] for v in per_topic.values()]
    avg1 = float(correct16.mean())
    return {
        "argv": sys.argv,
        "commit": _commit(),
        "task": args.task,
        "task_options": task_options,
        "model": "builtin:tiny",
        "spec": vars(spec) if hasattr(spec, "__dict__") else str(spec),
        "warmstart": {
            "steps": args.warmstart_steps,
            "lr": args.warmstart_lr,
            "batch_size": args.warmstart_batch_size,
            "seed": args.warmstart_seed,
            "seconds": warmstart_s,
        },
        "max_new_tokens": max_new_tokens,
        "held_out_problems": len(held_out),
        "train_groups": len(train),
        "mean_completion_tokens": sum(lengths) / len(lengths),
        "truncated_frac": sum(n >= max_new_tokens for n in lengths) / len(lengths),
        "avg@4": float((rewards4 >= 1.0).double().mean()),
        "avg@1": avg1,
        "pass@16": pass_at_k(correct16, 16),
        "pass@16 / avg@1": pass_at_k(correct16, 16) / max(avg1, 1e-9),
        "all_fail_frac@G4": float((~correct_train[:, :4].any(dim=1)).double().mean()),
        "all_fail_frac@G8": float((~correct_train.any(dim=1)).double().mean()),
        "all_pass_frac@G4": float(correct_train[:, :4].all(dim=1).double().mean()),
        "per_topic": per_topic,
        "topic_spread": max(accuracies) - min(accuracies),
    }


def table(result: dict) -> str:
    lines = ["| property | value | target | met |", "|---|---|---|---|"]
    for name, (kind, bound) in TARGETS.items():
        target = f"{kind} {bound[0]}-{bound[1]}" if kind == "in" else f">= {bound}"  # type: ignore[index]
        lines.append(f"| {name} | {result[name]:.3f} | {target} | {_check(name, result[name])} |")
    for name in ("avg@1", "pass@16", "all_fail_frac@G8", "all_pass_frac@G4", "truncated_frac"):
        lines.append(f"| {name} | {result[name]:.3f} | | |")
    lines += ["", "| topic | problems | avg@16 | pass@16 |", "|---|---|---|---|"]
    lines += [
        f"| {t} | {v['problems']} | {v['avg@16']:.3f} | {v['pass@16']:.3f} |" for t, v in result["per_topic"].items()
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="stepwise")
    parser.add_argument("--task-options", default=None, help="task options as YAML")
    parser.add_argument(
        "--warmstart-steps", type=int, default=None, help="default: the task's recommendation, else ebpo train's (300)"
    )
    parser.add_argument(
        "--warmstart-lr", type=float, default=None, help="default: the task's recommendation, else ebpo train's (3e-3)"
    )
    parser.add_argument(
        "--warmstart-batch-size",
        type=int,
        default=None,
        help="default: the task's recommendation, else ebpo train's (128)",
    )
    parser.add_argument("--warmstart-seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0 = the task's recommendation (else 12)")
    parser.add_argument("--train-groups", type=int, default=256, help="training prompts sampled for the all-fail share")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args)
    print(table(result))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
