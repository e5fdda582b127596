"""``code``: run generated Python against test cases in a sandboxed subprocess.

Reference format (a JSON string; the MBPP and HumanEval loaders write it):

* MBPP style: ``{"tests": ["assert f(1) == 2", ...], "setup": "import math"}``
  (``setup`` optional, runs before the candidate's code); a JSON list of
  assert strings, or plain text with one ``assert`` per line, also works.
* HumanEval style: ``{"test": "def check(candidate): ...", "entry_point": "f",
  "prompt": "def f(x):\n    \"\"\"...\"\"\"\n"}`` (``prompt`` optional: it is put before
  the code, as HumanEval's harness does, so a body-only continuation runs and a
  complete function simply redefines it); the judge calls ``check(f)``.

The candidate's code is the last fenced block (```python or ```), else the
whole completion.

What decides the reward (docs/verifiers.md has the full story). The sandboxed
child runs ``setup``, ``prompt`` and the candidate's code: never the tests. A
trusted judge process (``_code_judge.py``) runs the tests with every function
the candidate was to define replaced by a proxy that sends the call's arguments
to the child and gets back *plain data* (``_plain_data.py``, exact types: a
subclass of int whose ``__eq__`` is always true is refused). Asserts, tolerance
checks, builtins and comparisons all run in the judge, on ordinary values; the
child's exit status, output and objects are never evidence. Reward 1.0 iff the
judge ran every test without an error, else 0.0 with the reason counted in
``info``: ``failed`` (an assert, any error in the tests, a program that does not
load or exits), ``timeout``, ``output_limit``, ``not_plain_data``, ``bad_output``
(a malformed reply), ``unsupported_test`` (the test passes the candidate
something that is not plain data, e.g. a lambda). A bad *reference* raises
:class:`~ebpo.verifiers.base.BadReference`; a sandbox that cannot start raises
``RuntimeError`` (the registry's guard counts it as ``error``).

The sandbox, layer by layer (the constructor probes which this machine allows,
strongest first, and records them in :attr:`CodeVerifier.layers`):

1. Always: output and replies on pipes the judge reads with a deadline and a size
   limit (no file the program could swap for a FIFO); resource limits (CPU,
   address space, file size, open files, no core dumps); ``python -I -B``; only
   its own pipes inherited; a minimal environment.
2. Always (defence in depth, not a boundary: PEP 578): an audit hook refusing
   writes outside the working directory (and any ``dir_fd`` use), sockets,
   process creation (also importing ``_posixsubprocess``, whose ``fork_exec`` has
   no audit event), signals and ``ctypes``.
3. Root, where the kernel allows: the child is the init of a new PID namespace
   (every process it starts dies with it) with ``PR_SET_PDEATHSIG`` (it dies if
   the judge does).
4. Root, where the kernel allows: a mount namespace where every mount is
   read-only and the only writable places are fresh tmpfs at ``/tmp`` (the
   working directory) and ``/dev/shm``.
5. Root, where the kernel allows: an empty network namespace.
6. Root: run as ``nobody`` with ``RLIMIT_NPROC``.

Without root only 1-2 apply (a warning is logged): the reward stays honest, but
the host is protected only by the audit hook. The child's interpreter must be
usable by ``nobody`` when dropping privileges; the probe falls back to the
system ``python3`` when the current one (e.g. a virtualenv under ``/root``) is
not, and the candidate then sees only that interpreter's packages.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from ebpo.verifiers.base import VERIFIERS, BadReference, VerifierResult

__all__ = ["CodeVerifier", "CodeReference", "SandboxResult", "extract_code", "build_program", "parse_reference"]

logger = logging.getLogger(__name__)


def extract_code(completion: str) -> str:
    """The last fenced code block (```python or ```), else the completion itself.

    >>> extract_code("Here:\\n```python\\nx = 1\\n```\\nDone.")
    'x = 1\\n'
    """
    fence = "```"
    end = completion.rfind(fence)
    if end > 0:
        start = completion.rfind(fence, 0, end)
        if start >= 0:
            block = completion[start + len(fence) : end]
            first_newline = block.find("\n")
            header = block[:first_newline].strip() if first_newline >= 0 else ""
            if first_newline >= 0 and (header == "" or header.isidentifier()):  # drop a language tag
                block = block[first_newline + 1 :]
            return block
    return completion


@dataclass(frozen=True)
class CodeReference:
    """A parsed reference: what the child runs (``setup``, ``prompt``) and what only the judge sees (the tests)."""

    setup: str
    prompt: str
    tests: str  # Python source; MBPP: the assert lines; HumanEval: the ``check`` definition
    entry_point: str | None  # HumanEval: ``check(entry_point)`` is called after ``tests``


def parse_reference(reference: str) -> CodeReference:
    """The reference's parts (see the module docstring); ValueError when it cannot be a test suite."""
    try:
        spec: Any = json.loads(reference)
    except json.JSONDecodeError:
        spec = {"tests": [line for line in reference.splitlines() if line.strip()]}
    if isinstance(spec, list):
        spec = {"tests": spec}
    if not isinstance(spec, dict) or not ({"tests", "test"} & set(spec)):
        raise BadReference(
            f"code reference must hold 'tests' (MBPP) or 'test' + 'entry_point' (HumanEval): {reference[:200]!r}"
        )
    if "test" in spec:
        if "entry_point" not in spec:
            raise BadReference(f"a HumanEval-style code reference needs 'entry_point': {reference[:200]!r}")
        tests, entry_point = spec["test"], spec["entry_point"]
    else:
        if not spec["tests"]:
            raise BadReference(f"code reference has no tests: {reference[:200]!r}")  # would reward any code
        tests, entry_point = "\n".join(spec["tests"]), None
    parsed = CodeReference(spec.get("setup", "") or "", spec.get("prompt", "") or "", tests, entry_point)
    for part, source in (("setup", parsed.setup), ("prompt", parsed.prompt), ("tests", parsed.tests)):
        try:
            compile(source, f"<reference {part}>", "exec")
        except SyntaxError as exc:
            raise BadReference(f"code reference's {part} is not valid Python ({exc}): {reference[:200]!r}") from exc
    return parsed


def build_program(code: str, reference: str) -> str:
    """What the sandboxed child runs: ``setup``, ``prompt``, then the candidate's code. Never the tests."""
    parsed = parse_reference(reference)
    return "\n".join([parsed.setup, parsed.prompt, code, ""])


@dataclass(frozen=True)
class SandboxResult:
    """What one sandboxed :meth:`CodeVerifier.run` did. ``output`` is at most ``max_report_bytes`` of its stdout+stderr (the tail).

    ``returncode`` is the program's own exit status: diagnostics only, never a reward.
    """

    returncode: int | None  # None when killed on the wall-clock limit
    timed_out: bool
    output_truncated: bool  # it wrote more than max_output_bytes and was stopped
    output: str
    elapsed_seconds: float


def _nobody() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


_JUDGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_code_judge.py")
# Verdict statuses (see _code_judge.py) -> the info key counted with reward 0.
_FAILURES = {
    "failed": "failed",
    "timeout": "timeout",
    "output_limit": "output_limit",
    "not_plain_data": "not_plain_data",
    "bad_output": "bad_output",
    "unsupported_test": "unsupported_test",
}


@VERIFIERS.register("code")
class CodeVerifier:
    """Sandboxed execution of generated Python, judged outside the sandbox; see the module docstring.

    Args:
        timeout_seconds: wall-clock limit for the candidate's program and all its calls (the CPU limit is this, rounded up, + 1).
        memory_mb: address-space limit of each sandboxed process.
        max_output_bytes: most stdout+stderr (and largest file, and largest reply) the program may write.
        max_report_bytes: how much of the output :meth:`run` reads back (the tail).
        max_processes: ``RLIMIT_NPROC`` for the ``nobody`` user (only when dropping to it).
        isolate_network: enter a new network namespace where the OS allows it (root).
        private_tmp: a mount namespace where every mount is read-only and the working directory
            (``/tmp``) and ``/dev/shm`` are fresh private ``tmpfs``, where the OS allows it (root).
        drop_privileges: run as ``nobody`` where the OS allows it (root).
        pid_namespace: run the program as the init of a new PID namespace, so every process it
            starts dies with it, where the OS allows it (root).
        audit_hook: install the audit hook (defence in depth). Off only for testing the OS layers alone.
        python: interpreter for the programs; default: this one, else the system ``python3``.
        grace_seconds: slack for starting the two interpreters, on top of ``timeout_seconds``;
            the call returns within ``timeout_seconds + grace_seconds`` whatever the program does.
        label: a word put in the command line of the judge and the sandboxed interpreter (and so
            of every process the program forks), to find them with ``ps``; the red-team tests use it.

    Thread-safe: each call starts its own judge process.
    """

    def __init__(
        self,
        timeout_seconds: float = 5.0,
        memory_mb: int = 1024,
        max_output_bytes: int = 1 << 20,
        max_report_bytes: int = 4096,
        max_processes: int = 64,
        isolate_network: bool = True,
        private_tmp: bool = True,
        drop_privileges: bool = True,
        pid_namespace: bool = True,
        audit_hook: bool = True,
        python: str | None = None,
        grace_seconds: float = 5.0,
        label: str = "ebpo-sandbox",
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError(f"code verifier timeout_seconds must be > 0, got {timeout_seconds}")
        if memory_mb < 64:
            raise ValueError(
                f"code verifier memory_mb must be >= 64 (a Python interpreter needs ~30 MB), got {memory_mb}"
            )
        if max_output_bytes < 1024 or max_report_bytes < 0:
            raise ValueError("code verifier needs max_output_bytes >= 1024 and max_report_bytes >= 0")
        if grace_seconds <= 0:
            raise ValueError(f"code verifier grace_seconds must be > 0, got {grace_seconds}")
        self.timeout_seconds, self.memory_mb, self.grace_seconds = timeout_seconds, memory_mb, grace_seconds
        self.max_output_bytes, self.max_report_bytes, self.max_processes = (
            max_output_bytes,
            max_report_bytes,
            max_processes,
        )
        self.audit_hook, self.label = audit_hook, label
        root = os.geteuid() == 0
        nobody = _nobody() if drop_privileges else None
        interpreters = (
            [python] if python else list(dict.fromkeys([sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]))
        )
        # Strongest combination first; containers may forbid namespaces even to root, and
        # 'nobody' may be unable to run the current interpreter.
        candidates = [
            (user, pid, net, mnt)
            for user in ([nobody, None] if nobody else [None])
            for pid in ([True, False] if pid_namespace and root else [False])
            for net in ([True, False] if isolate_network and root else [False])
            for mnt in ([True, False] if private_tmp and root else [False])
        ]
        for self.user, self.pidns, self.netns, self.mountns in candidates:
            self.python = next((exe for exe in interpreters if os.path.exists(exe) and self._probe(exe)), "")
            if self.python:
                break
        else:
            raise RuntimeError(f"code verifier: no Python interpreter starts in the sandbox (tried {interpreters})")
        self.layers = {
            "pid_namespace": self.pidns,
            "network_namespace": self.netns,
            "readonly_mounts": self.mountns,
            "nobody": self.user is not None,
            "audit_hook": audit_hook,
            "rlimits": True,
        }
        logger.info("code verifier sandbox layers: %s (interpreter %s)", self.layers, self.python)
        if not (self.pidns and self.mountns and self.user):
            logger.warning(
                "code verifier: weaker sandbox on this machine (%s); see docs/verifiers.md",
                ", ".join(f"{k}={v}" for k, v in self.layers.items()),
            )

    def _probe(self, exe: str) -> bool:
        self.python = exe
        try:
            # Pure-Python and extension modules the set-up did not import: 'nobody' must be able to read them.
            result = self.run("import collections, fractions, heapq, math, re\n")
        except RuntimeError:
            return False
        return result.returncode == 0

    def _config(self) -> dict[str, Any]:
        return {
            "python": self.python,
            "timeout_seconds": self.timeout_seconds,
            "memory_mb": self.memory_mb,
            "judge_memory_mb": max(2048, 2 * self.memory_mb),
            "max_output_bytes": self.max_output_bytes,
            "max_report_bytes": self.max_report_bytes,
            "max_processes": self.max_processes,
            "tmpfs_mb": 64,
            "pidns": self.pidns,
            "netns": self.netns,
            "mountns": self.mountns,
            "audit_hook": self.audit_hook,
            "uid": self.user[0] if self.user else None,
            "gid": self.user[1] if self.user else None,
            "label": self.label,
        }

    def _judge(self, request: dict[str, Any]) -> dict[str, Any]:
        """One judge process per check; killed (and the sandbox with it) past the hard limit."""
        request["config"] = self._config()
        judge = subprocess.Popen(
            [sys.executable, "-I", "-B", _JUDGE, self.label],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )
        try:
            out, err = judge.communicate(
                json.dumps(request).encode(), timeout=self.timeout_seconds + self.grace_seconds
            )
        except subprocess.TimeoutExpired:
            _kill_group(judge)  # the sandboxed child has PR_SET_PDEATHSIG: it dies with the judge
            judge.communicate()
            return {"status": "timeout", "output": "", "output_truncated": False, "killed": True}
        finally:
            _kill_group(judge)
        try:
            verdict = json.loads(out)
        except ValueError:
            raise RuntimeError(
                f"code verifier's judge failed (exit {judge.returncode}): {err.decode(errors='replace')[-2000:]}"
            ) from None
        if verdict["status"] == "sandbox_error":
            raise RuntimeError(
                f"code sandbox could not start the program ({self.python}): {verdict['message']}; output: {verdict['output'][-2000:]}"
            )
        return verdict

    def run(self, program: str) -> SandboxResult:
        """Run ``program`` as a script in the sandbox (diagnostics); raises RuntimeError only if the sandbox itself fails."""
        start = time.monotonic()
        verdict = self._judge({"mode": "run", "program": program})
        timed_out = verdict["status"] == "timeout"
        return SandboxResult(
            None if timed_out else verdict["returncode"],
            timed_out,
            verdict["output_truncated"],
            verdict["output"],
            time.monotonic() - start,
        )

    def __call__(self, completion: str, reference: str) -> VerifierResult:
        parsed = parse_reference(reference)
        program = "\n".join([parsed.setup, parsed.prompt, extract_code(completion), ""])
        tests = {
            "setup": parsed.setup,
            "prompt": parsed.prompt,
            "source": parsed.tests,
            "entry_point": parsed.entry_point,
        }
        verdict = self._judge({"mode": "check", "program": program, "tests": tests})
        status = verdict["status"]
        if status == "passed":
            return VerifierResult(1.0)
        if status not in _FAILURES:
            raise RuntimeError(f"code verifier's judge returned an unknown verdict {status!r}")
        return VerifierResult(0.0, {_FAILURES[status]: 1.0})


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # already gone
        pass
    proc.wait()
