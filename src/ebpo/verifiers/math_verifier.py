"""``math``: final-answer extraction plus symbolic equivalence through math-verify.

The completion's answer is extracted (last ``\\boxed{}`` with nested braces,
``####``, "answer is", last number; :mod:`ebpo.verifiers.answers`) and
compared with the reference by `math-verify
<https://pypi.org/project/math-verify/>`_ (sympy-based: ``1/2`` equals
``0.5`` and ``\\frac{2}{4}``, ``x^2+1`` equals ``1+x^2``). The reference is
a bare answer (``"\\frac{1}{2}"``) or LaTeX containing ``\\boxed{...}``.

Symbolic comparison can hang (``12345678^{12345678}``), so guards apply:

* input-size guards, checked before any work: a completion longer than
  ``max_completion_chars`` (default 100,000) is not even searched, and an
  extracted answer longer than ``max_answer_chars`` (default 500) is not parsed
  (reward 0, ``info["oversize"]`` for both); extraction is linear in the
  completion's length, and Unicode digits (fullwidth, Arabic-Indic,
  mathematical bold, ...) become ASCII first (:func:`~ebpo.verifiers.answers.normalize_digits`);
* a per-call time limit ``timeout_seconds`` (default 5, whole seconds) on each
  of the three steps (parse reference, parse answer, compare), enforced by
  ``isolation``:

  - ``"signal"``: math-verify's own SIGALRM timer, in-process and cheap
    (~1 ms per call). Only possible in the main thread, and it interrupts only
    between Python bytecodes (a single long C call finishes first).
  - ``"process"``: a worker process per calling thread (started on first use,
    reused, ~1 s to start) runs math-verify with its SIGALRM timer, and the
    caller also kills it after a hard wall-clock limit of
    ``3 * timeout_seconds + 2`` s (then restarts it), so no input can hang the
    caller. The worker's address space is capped at ``worker_memory_mb``.
  - ``"auto"`` (default): ``signal`` in the main thread, ``process`` in any
    other thread (where SIGALRM is impossible).

Parse failures (``parse_error``), time-outs (``timeout``; plus ``killed``
when the hard limit fired), a worker that died on the input
(``worker_crash``) and oversize answers (``oversize``) give reward
0 and are counted in ``info``; so does any exception math-verify or sympy raise
on the completion's answer (``parse_error``). An unparseable *reference* raises
:class:`~ebpo.verifiers.base.BadReference`; any other error raises.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from typing import Any

from ebpo.verifiers._math_worker import compare
from ebpo.verifiers.answers import extract_answer, normalize_digits
from ebpo.verifiers.base import VERIFIERS, BadReference, VerifierMisuse, VerifierResult

__all__ = ["MathVerifier"]

_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_math_worker.py")
_ISOLATIONS = ("auto", "signal", "process")


@VERIFIERS.register("math")
class MathVerifier:
    """Reward 1.0 when the completion's final answer is mathematically equal to the reference.

    >>> MathVerifier()("so the answer is \\\\boxed{\\\\frac{2}{4}}", "0.5").reward
    1.0
    """

    def __init__(
        self,
        timeout_seconds: int = 5,
        max_answer_chars: int = 500,
        isolation: str = "auto",
        worker_memory_mb: int = 4096,
        max_completion_chars: int = 100_000,
    ) -> None:
        try:
            import math_verify  # noqa: F401
        except ImportError as exc:  # an optional dependency: say how to get it
            raise ValueError("the math verifier needs math-verify: pip install 'ebpo[math]'") from exc
        if not isinstance(timeout_seconds, int) or timeout_seconds < 1:
            raise ValueError(
                f"timeout_seconds must be a whole number >= 1 (SIGALRM has one-second resolution), got {timeout_seconds!r}"
            )
        if max_answer_chars < 1 or max_completion_chars < 1:
            raise ValueError(
                f"max_answer_chars and max_completion_chars must be >= 1, got {max_answer_chars}, {max_completion_chars}"
            )
        if isolation not in _ISOLATIONS:
            raise ValueError(f"isolation must be one of {_ISOLATIONS}, got {isolation!r}")
        self.timeout_seconds, self.max_answer_chars, self.isolation = timeout_seconds, max_answer_chars, isolation
        self.max_completion_chars = max_completion_chars
        self.worker_memory_mb = worker_memory_mb
        self._local = threading.local()
        self._workers: list[_Worker] = []
        self._workers_lock = threading.Lock()
        weakref.finalize(self, _close_all, self._workers)

    def __call__(self, completion: str, reference: str) -> VerifierResult:
        if len(completion) > self.max_completion_chars:  # the guard comes first: nothing below sees a huge input
            return VerifierResult(0.0, {"oversize": 1.0})
        answer = extract_answer(normalize_digits(completion))
        if answer is None or not answer.strip():
            return VerifierResult(0.0, {"parse_error": 1.0})
        if len(answer) > self.max_answer_chars:
            return VerifierResult(0.0, {"oversize": 1.0})
        in_main = threading.current_thread() is threading.main_thread()
        if self.isolation == "signal" and not in_main:
            raise VerifierMisuse(
                "math verifier isolation='signal' uses SIGALRM and must run in the main thread; use 'auto' or 'process'"
            )
        if self.isolation == "process" or (self.isolation == "auto" and not in_main):
            reply = self._worker().request(
                reference, answer, self.timeout_seconds, hard_limit=3 * self.timeout_seconds + 2
            )
        else:
            reply = compare(reference, answer, self.timeout_seconds)
        return _to_result(reply)

    def _worker(self) -> _Worker:
        worker = getattr(self._local, "worker", None)
        if worker is None:
            worker = self._local.worker = _Worker(self.worker_memory_mb << 20)
            with self._workers_lock:
                self._workers.append(worker)
        return worker

    def close(self) -> None:
        """Stop the worker processes (also done when the verifier is garbage-collected)."""
        _close_all(self._workers)


def _to_result(reply: dict[str, Any]) -> VerifierResult:
    status = reply["status"]
    if status == "ok":
        return VerifierResult(1.0 if reply["correct"] else 0.0)
    if status == "parse_error":
        return VerifierResult(0.0, {"parse_error": 1.0})
    if status == "timeout":
        return VerifierResult(0.0, {"timeout": 1.0, **({"killed": 1.0} if reply.get("killed") else {})})
    if status == "crash":  # the worker died on this input; counted, and the next call restarts it
        return VerifierResult(0.0, {"worker_crash": 1.0})
    if status == "reference_error":
        raise BadReference(reply["message"])
    raise RuntimeError(f"math verifier worker failed:\n{reply.get('message', reply)}")


def _close_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.close()


class _Worker:
    """One math-verify worker process speaking JSON lines (see ``_math_worker.py``); restarted after a kill."""

    def __init__(self, memory_bytes: int) -> None:
        self.memory_bytes = memory_bytes
        self.proc: subprocess.Popen | None = None
        self._buffer = b""

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", _WORKER_SCRIPT, str(self.memory_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._buffer = b""
        if self._read_line(deadline=time.monotonic() + 120) != {"status": "ready"}:  # None or a crash
            self.close()
            raise RuntimeError("math verifier worker did not start (is math-verify importable by this interpreter?)")

    def request(self, reference: str, answer: str, timeout: int, hard_limit: float) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(
            (json.dumps({"reference": reference, "answer": answer, "timeout": timeout}) + "\n").encode()
        )
        self.proc.stdin.flush()
        reply = self._read_line(deadline=time.monotonic() + hard_limit)
        if reply is None:  # stuck past the hard limit: kill it; the next request starts a fresh one
            self.close()
            return {"status": "timeout", "killed": True}
        return reply

    def _read_line(self, deadline: float) -> dict[str, Any] | None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:  # the worker died mid-request (a crash inside sympy on the model's input)
                self.close()
                return {"status": "crash"}
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    stream.close()
            self.proc = None
