"""Time every advantage estimator against a straightforward per-sample Python loop.

    python benchmarks/advantages.py                       # N = 2k, 64k, 1M; G = 4, 8
    python benchmarks/advantages.py --sizes 2048 --repeats 3 --json out.json

Prints a markdown table (median seconds per call, responses per second and
the speed-up over the loop) and writes every number to JSON. The loop
references are the test oracles in ``tests/oracles.py`` (plain Python floats,
one response at a time), and each vectorised result is checked against its
loop result before it is timed, so a fast wrong answer cannot enter the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import oracles  # noqa: E402

from ebpo import build_estimator  # noqa: E402

CASES: dict[str, tuple[dict, Callable[[list[float], list[int]], list[float]]]] = {
    "grpo": ({"name": "grpo"}, oracles.grpo),
    "dr_grpo": ({"name": "dr_grpo"}, lambda r, g: oracles.grpo(r, g, scale="none")),
    "rloo": ({"name": "rloo"}, oracles.rloo),
    "ebpo": ({"name": "ebpo"}, lambda r, g: oracles.LoopEBPO(decay=0.0).step(r, g)[0]),
    "ebpo+ha_dw": (
        {"name": "ebpo", "weighting": "ha_dw"},
        lambda r, g: _loop_ebpo_hadw(r, g),
    ),
}


def _loop_ebpo_hadw(rewards: list[float], group_ids: list[int]) -> list[float]:
    advantages = oracles.LoopEBPO(decay=0.0).step(rewards, group_ids)[0]
    weights = oracles.LoopHADW("soft", lam=1.3).step(advantages, rewards, group_ids)
    return [a * w for a, w in zip(advantages, weights)]


def make_batch(n: int, g: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    m = n // g
    p = torch.rand(m, generator=gen).repeat_interleave(g)
    rewards = (torch.rand(m * g, generator=gen) < p).float()
    group_ids = torch.arange(m).repeat_interleave(g)
    perm = torch.randperm(m * g, generator=gen)  # groups need not be contiguous
    return rewards[perm], group_ids[perm]


def time_call(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 65536, 1048576], help="batch sizes N")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[4, 8], help="group sizes G")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of the vectorised estimator (median)")
    parser.add_argument(
        "--loop-repeats", type=int, default=3, help="timed calls of the loop reference (best of; N > 100k: one call)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/advantages.json"), help="output file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = []
    print("| estimator | G | N | vectorised s | loop s | speed-up | responses/s | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for g in args.group_sizes:
        for n in args.sizes:
            rewards, group_ids = make_batch(n, g, seed=n + g)
            r_list, g_list = rewards.double().tolist(), group_ids.tolist()
            for label, (spec, loop_fn) in CASES.items():
                spec = dict(spec)
                name = spec.pop("name")
                estimator = build_estimator(name, **spec)
                advantages, _ = estimator(rewards, group_ids, training=False)  # warm-up + correctness check
                start = time.perf_counter()
                expected = loop_fn(r_list, g_list)
                loop_s = time.perf_counter() - start
                if args.loop_repeats > 1 and n <= 100_000:  # best of several: the loop is GC-noisy at small N
                    for _ in range(args.loop_repeats - 1):
                        start = time.perf_counter()
                        loop_fn(r_list, g_list)
                        loop_s = min(loop_s, time.perf_counter() - start)
                diff = float((advantages.double() - torch.tensor(expected, dtype=torch.float64)).abs().max())
                if diff > 1e-4:  # float32 output; a real mismatch is O(1)
                    raise SystemExit(f"{label} G={g} N={n}: vectorised result differs from the loop by {diff}")
                vec_s = time_call(lambda: estimator(rewards, group_ids, training=False), args.repeats)
                row = {
                    "estimator": label,
                    "G": g,
                    "N": n,
                    "vectorised_s": vec_s,
                    "loop_s": loop_s,
                    "speedup": loop_s / vec_s,
                    "responses_per_s": n / vec_s,
                    "max_abs_diff": diff,
                }
                rows.append(row)
                print(
                    f"| {label} | {g} | {n} | {vec_s:.5f} | {loop_s:.3f} | {row['speedup']:.0f}x "
                    f"| {row['responses_per_s']:.3g} | {diff:.1e} |",
                    flush=True,
                )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": args.threads,
        "repeats": args.repeats,
    }
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
