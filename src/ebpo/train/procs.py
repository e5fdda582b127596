"""Run many ``ebpo train`` subprocesses, a few at a time (``ebpo compare``, ``ebpo meta``).

Each job has its own log file; torch in every child gets one thread, so the
CPU budget is used by parallel processes, not by threads fighting over cores.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["run_parallel"]


def run_parallel(
    jobs: list[tuple[str, list[str], Path]], workers: int, *, on_done: Callable[[str, int, float], None] | None = None
) -> dict[str, int]:
    """Run ``(name, command, log_path)`` jobs, ``workers`` at once; returns each job's exit code.

    ``on_done(name, exit_code, seconds)`` is called as each job ends, with that job's own wall time.
    """
    pending = list(jobs)
    running: list[tuple[str, subprocess.Popen, object, float]] = []
    codes: dict[str, int] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while pending or running:
        while pending and len(running) < max(1, workers):
            name, command, log_path = pending.pop(0)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "w")
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((name, proc, log, time.time()))
        time.sleep(0.2)
        for item in list(running):
            name, proc, log, started = item
            if proc.poll() is None:
                continue
            log.close()  # type: ignore[attr-defined]
            running.remove(item)
            codes[name] = proc.returncode
            if on_done is not None:
                on_done(name, proc.returncode, time.time() - started)
    return codes
