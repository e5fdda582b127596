"""Run the red-team corpus (tests/redteam_corpus.py) against whichever ebpo is importable; print the table, write JSON.

    PYTHONPATH=src python benchmarks/redteam.py --json after.json
    git archive main src | tar -x -C /tmp/oldsrc && PYTHONPATH=/tmp/oldsrc/src python benchmarks/redteam.py --json before.json

Per attack class: how many attacks, how many were paid a reward > 0 (none is a
solution), processes left after the check, attacks that touched host files (the
canary, its directory, or files in world-writable directories), attacks whose
traffic reached a listener on 127.0.0.1, calls that raised or hung (either would
end a training run), and the worst wall time. Run it as root to see every layer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from redteam_corpus import ATTACKS, NEEDS_ISOLATION, TEXT_ATTACKS, Listener, run_attack  # noqa: E402


def run_text(json_path: str | None) -> None:
    """The math / gsm8k inputs: per verifier, how many raised (a raise ends a training run), paid, and the worst time."""
    import threading

    from ebpo.verifiers.gsm8k import GSM8KVerifier
    from ebpo.verifiers.math_verifier import MathVerifier

    rows = {}
    for name, verifier in (("gsm8k", GSM8KVerifier()), ("math", MathVerifier(timeout_seconds=1, isolation="process"))):
        raised, paid, worst, worst_input = 0, 0, 0.0, ""
        for completion in TEXT_ATTACKS:
            box: dict = {}

            def call(completion: str = completion, box: dict = box, verifier=verifier) -> None:
                try:
                    box["reward"] = verifier(completion, "42").reward
                except Exception as exc:  # noqa: BLE001  (reported)
                    box["error"] = type(exc).__name__

            start = time.monotonic()
            thread = threading.Thread(target=call, daemon=True)
            thread.start()
            thread.join(120)
            seconds = time.monotonic() - start
            raised += int("error" in box)
            paid += int(bool(box.get("reward")))
            if seconds > worst:
                worst, worst_input = seconds, repr(completion[:20])
            print(f"{name:6} {completion[:30]!r:40} {box} {seconds:.2f}s", flush=True)
        rows[name] = {
            "count": len(TEXT_ATTACKS),
            "raised": raised,
            "rewarded": paid,
            "worst_seconds": worst,
            "worst_input": worst_input,
        }
    print("| verifier | inputs | raised | reward 1 (unicode 42s are correct) | worst time (s) | slowest input |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['count']} | {row['raised']} | {row['rewarded']} | {row['worst_seconds']:.2f} | {row['worst_input']} |"
        )
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(rows, handle, indent=1)
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=2.0, help="the verifier's timeout_seconds")
    parser.add_argument("--json", help="write every outcome here")
    parser.add_argument(
        "--option", action="append", default=[], help="extra CodeVerifier option NAME=JSON (repeatable)"
    )
    parser.add_argument("--text", action="store_true", help="run the math / gsm8k inputs instead of the code corpus")
    args = parser.parse_args()
    if args.text:
        run_text(args.json)
    from ebpo.verifiers.code import CodeVerifier

    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}
    verifier = CodeVerifier(timeout_seconds=args.timeout, **options)
    layers = getattr(verifier, "layers", {})
    listener = Listener()
    outcomes = []
    start = time.monotonic()
    for attack in ATTACKS:
        if attack[1] in NEEDS_ISOLATION and not (layers.get("pid_namespace") or layers.get("nobody")):
            continue
        outcome = run_attack(verifier, attack, listener, hard_limit=args.timeout + 20)
        outcomes.append(outcome)
        flag = "PAID" if outcome.reward else ""
        print(
            f"{outcome.attack_class:13} {outcome.name:45} reward={outcome.reward} {outcome.info} t={outcome.seconds:.2f}s "
            f"procs={outcome.processes_left} touched={len(outcome.touched)} net={len(outcome.network)} {outcome.error} {flag}",
            flush=True,
        )
    total = time.monotonic() - start
    listener.close()
    table: dict[str, dict] = defaultdict(
        lambda: {
            "count": 0,
            "paid": 0,
            "processes_left": 0,
            "files_touched": 0,
            "network": 0,
            "raised_or_hung": 0,
            "worst_seconds": 0.0,
        }
    )
    for o in outcomes:
        for key in (o.attack_class, "all"):
            row = table[key]
            row["count"] += 1
            row["paid"] += int(bool(o.reward))
            row["processes_left"] += o.processes_left
            row["files_touched"] += int(bool(o.touched))
            row["network"] += int(bool(o.network))
            row["raised_or_hung"] += int(bool(o.error))
            row["worst_seconds"] = max(row["worst_seconds"], o.seconds)
    print(f"\nlayers: {layers}; timeout {args.timeout} s; corpus run in {total:.1f} s; uid {os.geteuid()}")
    print(
        "| attack class | count | reward paid | processes left | host files touched | network reached | raised/hung | worst time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for key, row in table.items():
        print(
            f"| {key} | {row['count']} | {row['paid']} | {row['processes_left']} | {row['files_touched']} | {row['network']} | {row['raised_or_hung']} | {row['worst_seconds']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "layers": layers,
                    "timeout": args.timeout,
                    "seconds": total,
                    "table": table,
                    "outcomes": [asdict(o) for o in outcomes],
                },
                handle,
                indent=1,
            )
    os._exit(0)  # a hung verifier call (old code) leaves a thread behind


if __name__ == "__main__":
    main()
