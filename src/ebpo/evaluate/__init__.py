"""``ebpo eval``: Pass@1 as avg@k, unbiased pass@k and maj@k of a checkpoint or a Hugging Face model.

    ebpo eval --model runs/20261122-ebpo                 # a run dir: its latest checkpoint and its own settings
    ebpo eval --model runs/x/checkpoints/step-000200/model --task arithmetic --samples 8
    ebpo eval --model Qwen/Qwen3-8B --benchmark math500=data/math500.jsonl --benchmark aime2025 --samples 32 \\
              --max-new-tokens 4096 --temperature 1.0 --k 1 8 32

Sampling goes through :func:`ebpo.sampling.sample_correctness`, the same function the
trainer evaluates with (same chunking, same seed: ``seed + 7919``), so for
the same checkpoint and sampling settings ``ebpo eval`` reproduces the
held-out accuracy ``ebpo train`` logged. Given a run directory, the run's
``config.yaml`` supplies the task, verifier, lengths, temperature, top-p,
samples and seed (flags override them).

Output: one table per benchmark (avg@k, pass@k for each ``--k``, maj@k) and,
when the problems have topics, avg@k per topic; printed and written to
``OUT/eval.md`` and ``OUT/eval.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ebpo.eval_metrics import avg_at_k, pass_at_k
from ebpo.fileio import check_output_dir, make_output_dir, step_dirs
from ebpo.sampling import EVAL_SEED_OFFSET, sample_correctness
from ebpo.tasks.base import Problem
from ebpo.tasks.build import DEFAULT_TASK, build_task, build_verifier_for

__all__ = ["main"]


def _majority(texts: list[list[str]], rewards: Tensor) -> float:
    """maj@k: the most frequent final answer (first line, stripped) is scored by its own reward."""
    hits = 0.0
    for row_texts, row_rewards in zip(texts, rewards.tolist()):  # strings: a loop over problems
        answers = [_final(t) for t in row_texts]
        counted = Counter(a for a in answers if a)
        if not counted:
            continue
        best = max(counted, key=lambda a: (counted[a], -answers.index(a)))
        reward = row_rewards[answers.index(best)]
        hits += 0.0 if reward != reward else reward
    return hits / max(len(texts), 1)


def _final(text: str) -> str:
    from ebpo.verifiers.answers import extract_answer

    return (extract_answer(text) or text.strip().split("\n")[0]).strip()


def summarise(rewards: Tensor, texts: list[list[str]], ks: Sequence[int]) -> dict[str, float]:
    scored = ~torch.isnan(rewards).any(dim=1)  # problems with every sample scored
    correct = (rewards[scored] >= 1.0).double()  # pass@k counts fully correct samples
    n = rewards.shape[1]
    out = {
        "problems": float(rewards.shape[0]),
        "samples_per_problem": float(n),
        f"avg@{n}": float(torch.nan_to_num(rewards, nan=0.0).sum() / (~torch.isnan(rewards)).sum().clamp_min(1)),
        f"maj@{n}": _majority(texts, rewards),
    }
    for k in ks:
        if 1 <= k <= n and correct.numel():
            out[f"pass@{k}"] = pass_at_k(correct, k)
    if correct.numel():
        out["pass@1 (avg)"] = avg_at_k(correct)
    return out


def by_topic(rewards: Tensor, problems: Sequence[Problem]) -> dict[str, dict[str, float]]:
    """avg@k of each ``Problem.topic`` (problems without a topic are left out): ``{topic: {problems, avg}}``."""
    topics = sorted({p.topic for p in problems if p.topic})
    index = {topic: k for k, topic in enumerate(topics)}
    topic_of = torch.tensor([index.get(p.topic, -1) for p in problems], dtype=torch.long)  # (P,) -1: no topic
    out: dict[str, dict[str, float]] = {}
    for k, topic in enumerate(topics):  # one mask per topic, not one Python pass over the problems per topic
        rows = topic_of == k
        scores = rewards[rows]
        scored = ~torch.isnan(scores)
        out[topic] = {
            "problems": float(rows.sum()),
            "avg": float(torch.nan_to_num(scores, nan=0.0).sum() / scored.sum().clamp_min(1)),
        }
    return out


def _resolve_model(path: str) -> tuple[str, dict[str, Any]]:
    """A run directory -> (its newest complete checkpoint's model dir, its config); else (path, {}).

    A newer checkpoint whose model is corrupt or incomplete is skipped with a warning naming why; a config
    file that is not a YAML mapping is a ValueError naming it.
    """
    from ebpo.models.loading import check_model_dir

    config_file = os.path.join(path, "config.yaml")
    if not os.path.isfile(config_file):
        return path, {}
    import yaml

    try:
        with open(config_file, encoding="utf-8") as handle:
            config = yaml.safe_load(handle) or {}
    except (OSError, ValueError, yaml.YAMLError) as exc:  # UnicodeDecodeError is a ValueError
        reason = " ".join(str(exc).split())[:200]
        raise ValueError(f"run config {config_file} is corrupt or truncated ({reason})") from None
    if not isinstance(config, dict):
        raise ValueError(f"run config {config_file} is not a mapping of field: value; it is corrupt")
    steps = step_dirs(os.path.join(path, "checkpoints"))
    if not steps:
        raise ValueError(f"run directory {path!r} has no checkpoint yet")
    problems = []
    for name in reversed(steps):
        model_dir = os.path.join(path, "checkpoints", name, "model")
        try:
            check_model_dir(model_dir, what=f"checkpoint {name}")
        except ValueError as exc:
            problems.append((name, str(exc)))
            continue
        for skipped, problem in problems:
            print(f"warning: skipped the newer checkpoint {skipped}: {problem}; evaluating {name}", file=sys.stderr)
        return model_dir, config
    reasons = [problem for _, problem in problems]
    raise ValueError(reasons[0] if len(reasons) == 1 else "no complete checkpoint: " + "; ".join(reasons))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ebpo eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="a run directory, a checkpoint's model directory, a HF id, or builtin:tiny"
    )
    parser.add_argument(
        "--task", default=None, help=f"task to evaluate on its held-out split (default: the run's, else {DEFAULT_TASK})"
    )
    parser.add_argument("--task-options", default=None, help="task options as YAML")
    parser.add_argument(
        "--benchmark", action="append", default=[], help="NAME or NAME=PATH of a dataset loader (repeatable)"
    )
    parser.add_argument("--verifier", default=None, help="verifier override (default: the task's or dataset's)")
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help="samples per problem (0 = greedy; default: the run's eval_samples, else 4)",
    )
    parser.add_argument("--k", type=int, nargs="+", default=[1], help="pass@k values to report")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="completion length (default: the run's, else 512)"
    )
    parser.add_argument(
        "--temperature", type=float, default=None, help="sampling temperature (default: the run's, else 1.0)"
    )
    parser.add_argument("--top-p", type=float, default=None, help="nucleus mass (default: the run's, else 1.0)")
    parser.add_argument(
        "--seed", type=int, default=None, help="seed (default: the run's, else 0); sampling uses seed + 7919"
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many problems per benchmark")
    parser.add_argument("--chat-template", default=None, help="auto, always, never (default: the run's, else auto)")
    parser.add_argument("--generation-batch-size", type=int, default=None, help="sequences per generate call (0 = 512)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="directory for eval.md and eval.json (default: print only)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _run(args)
    except ValueError as exc:
        print(f"ebpo eval: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import yaml

    from ebpo.models.loading import load_policy, select_device

    if args.out:  # checked before the model loads; nothing is written until the results are in
        check_output_dir(args.out, "ebpo eval", reuse=True)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model_path, run = _resolve_model(args.model)
    from ebpo.models.loading import check_model_source

    check_model_source(model_path)  # a path that does not exist is named now, never sent to the hub

    def pick(flag: Any, key: str, default: Any) -> Any:
        return flag if flag is not None else run.get(key, default)

    settings = {
        "samples": pick(args.samples, "eval_samples", 4),
        "max_new_tokens": pick(args.max_new_tokens, "max_new_tokens", 512),
        "temperature": pick(args.temperature, "temperature", 1.0),
        "top_p": pick(args.top_p, "top_p", 1.0),
        "chat_template": pick(args.chat_template, "chat_template", "auto"),
        "generation_batch_size": pick(args.generation_batch_size, "generation_batch_size", 0),
        "seed": pick(args.seed, "seed", 0),
    }
    suites: list[tuple[str, list[Problem], Any]] = []
    if args.benchmark:
        from ebpo.data import DATASETS, load_records
        from ebpo.verifiers.base import VERIFIERS

        for item in args.benchmark:
            name, _, path = item.partition("=")
            problems = load_records(name, path or None, limit=args.limit)
            suites.append((name, problems, VERIFIERS.build(args.verifier or DATASETS.build(name).verifier)))
    else:
        task_options = yaml.safe_load(args.task_options) if args.task_options else run.get("task_options", {})
        task = build_task(args.task or run.get("task", DEFAULT_TASK), task_options or {})
        problems = list(task.eval_problems())
        limit = args.limit or run.get("max_eval_problems") or None
        suites.append(
            (
                getattr(task, "name", args.task or "task"),
                problems[:limit] if limit else problems,
                build_verifier_for(task, args.verifier or run.get("verifier")),
            )
        )

    started = time.time()
    device = select_device(args.device)
    model, tokenizer = load_policy(model_path, device=device)
    results, topics = {}, {}
    for name, problems, verifier in suites:
        rewards, texts = sample_correctness(
            model,
            tokenizer,
            problems,
            verifier,
            samples=settings["samples"],
            max_new_tokens=settings["max_new_tokens"],
            temperature=settings["temperature"],
            top_p=settings["top_p"],
            chat_template=settings["chat_template"],
            generation_batch_size=settings["generation_batch_size"],
            seed=settings["seed"] + EVAL_SEED_OFFSET,
        )
        results[name] = summarise(rewards, texts, args.k)
        topics[name] = by_topic(rewards, problems)
    lines = [f"# ebpo eval: {args.model}", "", f"Settings: `{json.dumps(settings)}`", ""]
    for name, metrics in results.items():
        lines += (
            [f"## {name}", "", "| metric | value |", "|---|---|"]
            + [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
            + [""]
        )
        if topics[name]:
            lines += [f"| topic | problems | avg@{metrics['samples_per_problem']:.0f} |", "|---|---|---|"]
            lines += [f"| {t} | {row['problems']:.0f} | {row['avg']:.4f} |" for t, row in topics[name].items()] + [""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        make_output_dir(out, "ebpo eval")
        (out / "eval.md").write_text(text)
        record = {"model": args.model, "settings": settings, "results": results, "by_topic": topics}
        (out / "eval.json").write_text(json.dumps({**record, "wall_seconds": time.time() - started}, indent=2))
    return 0
