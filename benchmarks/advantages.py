"""Time every advantage estimator on contiguous and on shuffled group ids.

    python benchmarks/advantages.py                            # N = 2k, 64k, 1M; G = 4; 1 thread
    python benchmarks/advantages.py --sizes 2048 --repeats 5 --json out.json

Each estimator is timed on one batch laid out two ways: ``contiguous``
(group ids 0,0,0,0,1,1,1,1,...: what the trainer, TRL and verl produce, the
fast path of :class:`ebpo.grouping.Grouping`) and ``shuffled`` (the same
responses in a random order: the general path). Before anything is timed the
two results are compared (advantages un-shuffled, and every metric), and for
N <= ``--loop-max`` both are checked against the per-sample loop oracles of
``tests/oracles.py``, whose time is reported too; a fast wrong answer cannot
enter the table. Prints a markdown table (median wall-clock milliseconds per
call over ``--repeats`` calls, their interquartile range as the noise, and
the median process CPU milliseconds, which a busy machine inflates less) and
writes every number to JSON.

Timings default to one torch thread (``--threads``): on a shared machine
that is the most stable comparison.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import oracles  # noqa: E402

from ebpo import build_estimator  # noqa: E402

Loop = Callable[[list[float], list[int], list[int]], list[float]]


def _loop_hadw(rewards: list[float], group_ids: list[int], topic_ids: list[int]) -> list[float]:
    advantages = oracles.LoopEBPO(decay=0.0).step(rewards, group_ids)[0]
    weights = oracles.LoopHADW("soft", lam=1.3).step(advantages, rewards, group_ids)
    return [a * w for a, w in zip(advantages, weights)]


# label -> (build_estimator arguments, loop oracle of the first call)
CASES: dict[str, tuple[dict[str, Any], Loop]] = {
    "grpo": ({"name": "grpo"}, lambda r, g, t: oracles.grpo(r, g)),
    "grpo scale=batch": ({"name": "grpo", "scale": "batch"}, lambda r, g, t: oracles.grpo(r, g, scale="batch")),
    "grpo scale=none": ({"name": "grpo", "scale": "none"}, lambda r, g, t: oracles.grpo(r, g, scale="none")),
    "dr_grpo": ({"name": "dr_grpo"}, lambda r, g, t: oracles.grpo(r, g, scale="none")),
    "rloo": ({"name": "rloo"}, lambda r, g, t: oracles.rloo(r, g)),
    "ebpo prior=batch": ({"name": "ebpo"}, lambda r, g, t: oracles.LoopEBPO(decay=0.0).step(r, g)[0]),
    "ebpo prior=running": (
        {"name": "ebpo", "prior": "running"},
        lambda r, g, t: oracles.LoopEBPO(decay=1.0).step(r, g)[0],
    ),
    "ebpo prior=ema": ({"name": "ebpo", "prior": "ema"}, lambda r, g, t: oracles.LoopEBPO(decay=0.9).step(r, g)[0]),
    "ebpo hierarchical": (
        {"name": "ebpo", "hierarchical": True},
        lambda r, g, t: oracles.LoopHierEBPO(decay=0.0).step(r, g, t)[0],
    ),
    "ebpo+ha_dw": ({"name": "ebpo", "weighting": "ha_dw"}, _loop_hadw),
}
NUM_TOPICS = 8


def make_batch(n: int, g: int, seed: int) -> dict[str, torch.Tensor]:
    """Contiguous float32 0/1 rewards, group ids and topic ids (N,), and a permutation that shuffles them."""
    gen = torch.Generator().manual_seed(seed)
    m = n // g
    p = torch.rand(m, generator=gen).repeat_interleave(g)
    return {
        "rewards": (torch.rand(m * g, generator=gen) < p).float(),
        "group_ids": torch.arange(m).repeat_interleave(g),
        "topic_ids": torch.randint(0, NUM_TOPICS, (m,), generator=gen).repeat_interleave(g),
        "perm": torch.randperm(m * g, generator=gen),
    }


def time_call(fn: Callable[[], object], repeats: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of each call (CPU time is less sensitive to a shared machine)."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start)
    return wall, cpu


def quartiles(times: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return q1, median, q3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 65536, 1048576], help="batch sizes N")
    parser.add_argument("--group-size", type=int, default=4, help="responses per prompt G")
    parser.add_argument("--repeats", type=int, default=21, help="timed calls per cell (median and quartiles)")
    parser.add_argument(
        "--loop-max", type=int, default=65536, help="largest N checked against (and timed with) the loop oracles"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: most stable on a shared machine)")
    parser.add_argument("--estimators", nargs="+", default=list(CASES), choices=list(CASES), metavar="LABEL")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/advantages.json"), help="output file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = []
    print(
        "| estimator | N | contiguous ms | shuffled ms | loop ms | contiguous IQR ms | shuffled IQR ms | contiguous CPU ms | shuffled CPU ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        batch = make_batch(n, args.group_size, seed=n)
        perm = batch["perm"]
        layouts = {
            "contiguous": (batch["rewards"], batch["group_ids"], batch["topic_ids"]),
            "shuffled": (batch["rewards"][perm], batch["group_ids"][perm], batch["topic_ids"][perm]),
        }
        for label in args.estimators:
            spec, loop_fn = CASES[label]
            spec = dict(spec)
            name = spec.pop("name")
            results, row = {}, {"estimator": label, "N": n, "G": args.group_size}
            for layout, (rewards, group_ids, topic_ids) in layouts.items():
                estimator = build_estimator(name, **spec)
                advantages, metrics = estimator(rewards, group_ids, topic_ids=topic_ids)  # first call (checked)
                results[layout] = (advantages, metrics)
                wall, cpu = time_call(
                    lambda e=estimator, r=rewards, g=group_ids, t=topic_ids: e(r, g, topic_ids=t, training=False),
                    args.repeats,
                )
                q1, median, q3 = quartiles(wall)
                row[f"{layout}_ms"], row[f"{layout}_iqr_ms"] = median * 1e3, (q3 - q1) * 1e3
                row[f"{layout}_cpu_ms"] = statistics.median(cpu) * 1e3
            (contiguous, contiguous_metrics), (shuffled, shuffled_metrics) = results["contiguous"], results["shuffled"]
            unshuffled = torch.empty_like(shuffled).index_copy_(0, perm, shuffled)
            row["path_max_abs_diff"] = float((contiguous.double() - unshuffled.double()).abs().max())
            if row["path_max_abs_diff"] > 1e-6 or any(
                abs(contiguous_metrics[k] - shuffled_metrics[k]) > 1e-9 * max(1.0, abs(shuffled_metrics[k]))
                for k in contiguous_metrics
            ):
                raise SystemExit(f"{label} N={n}: the contiguous and shuffled layouts disagree")
            row["loop_ms"] = None
            if n <= args.loop_max:
                rewards, group_ids, topic_ids = layouts["shuffled"]
                r_list, g_list, t_list = rewards.double().tolist(), group_ids.tolist(), topic_ids.tolist()
                start = time.perf_counter()
                expected = torch.tensor(loop_fn(r_list, g_list, t_list), dtype=torch.float64)
                row["loop_ms"] = (time.perf_counter() - start) * 1e3
                row["loop_max_abs_diff"] = float((shuffled.double() - expected).abs().max())
                if row["loop_max_abs_diff"] > 1e-4:  # float32 output; a real mismatch is O(1)
                    raise SystemExit(f"{label} N={n}: differs from the loop oracle by {row['loop_max_abs_diff']}")
            rows.append(row)
            loop = f"{row['loop_ms']:.1f}" if row["loop_ms"] is not None else "-"
            print(
                f"| {label} | {n} | {row['contiguous_ms']:.2f} | {row['shuffled_ms']:.2f} | {loop} "
                f"| {row['contiguous_iqr_ms']:.2f} | {row['shuffled_iqr_ms']:.2f} "
                f"| {row['contiguous_cpu_ms']:.2f} | {row['shuffled_cpu_ms']:.2f} |",
                flush=True,
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": args.threads,
        "repeats": args.repeats,
        "group_size": args.group_size,
        "dtype": "float32",
    }
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
