"""Run many ``ebpo train`` subprocesses, a few at a time (``ebpo compare``, ``ebpo meta``), and stop cleanly.

Each job has its own log file; torch in every child gets one thread, so the
CPU budget is used by parallel processes, not by threads fighting over cores.

Stopping (SIGTERM from SLURM, Kubernetes or a spot instance's notice; SIGINT
from Ctrl-C): :class:`StopSignals` records the first signal instead of dying
mid-write, so the trainer can finish its step, save a checkpoint and exit
with 128 + the signal's number (143, 130); a second signal stops at once.
:func:`run_parallel` passes each signal it receives on to its running
children, starts no new job, waits for the children to stop (each saves its
checkpoint) and raises :class:`Stopped`. Children run in their own session,
so a Ctrl-C in the terminal reaches them once, through the parent, not twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["run_parallel", "StopSignals", "Stopped", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """The command was stopped by ``signum`` after stopping cleanly; exit with :attr:`exit_code`."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + signum  # what a shell reports for a process killed by the signal: 143, 130
        super().__init__(f"stopped by {self.name}")


class StopSignals:
    """While entered, SIGTERM and SIGINT are recorded, not fatal: ``on_first(signum)`` runs at the first,
    ``on_second(signum)`` at every later one. :attr:`signum` is the first signal received (None: none).

    Handlers go in only in the main thread (Python delivers signals there) and not over a signal the
    process inherited as ignored (``nohup``, a shell's background job): that choice is the caller's.
    The previous handlers are restored on exit.
    """

    def __init__(
        self, on_first: Callable[[int], None] | None = None, on_second: Callable[[int], None] | None = None
    ) -> None:
        self.on_first, self.on_second = on_first, on_second
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            if self.on_first is not None:
                self.on_first(signum)
        elif self.on_second is not None:
            self.on_second(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                previous = signal.getsignal(sig)
                if previous is signal.SIG_IGN:
                    continue
                self._previous[sig] = previous
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def run_parallel(
    jobs: list[tuple[str, list[str], Path]],
    workers: int,
    *,
    on_done: Callable[[str, int, float], None] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, int]:
    """Run ``(name, command, log_path)`` jobs, ``workers`` at once; returns each job's exit code.

    ``on_done(name, exit_code, seconds)`` is called as each job ends, with that job's own wall time.
    A SIGTERM or SIGINT is passed on to every running job (each one again, for a second signal); no
    job starts after it; once the running jobs have ended, :class:`Stopped` is raised.
    """
    pending = list(jobs)
    running: list[tuple[str, subprocess.Popen, object, float]] = []
    codes: dict[str, int] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def forward(signum: int) -> None:
        for _, proc, _, _ in running:
            if proc.poll() is None:
                proc.send_signal(signum)

    def first(signum: int) -> None:
        forward(signum)
        echo(
            f"{signal.Signals(signum).name} received: passed to {len(running)} running job(s), which save a "
            "checkpoint and stop; no new job starts (send it again to stop them at once)"
        )

    with StopSignals(on_first=first, on_second=forward) as stop:
        while (pending and not stop.requested) or running:
            while pending and not stop.requested and len(running) < max(1, workers):
                name, command, log_path = pending.pop(0)
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log = open(log_path, "w")
                # Own session: a terminal's Ctrl-C reaches the job once, passed on by us, not also directly.
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
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
    if stop.signum is not None:
        raise Stopped(stop.signum)
    return codes
