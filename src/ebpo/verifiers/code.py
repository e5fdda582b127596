"""``code``: run generated Python against test cases in a sandboxed subprocess.

Reference format (a JSON string, as the MBPP and HumanEval loaders write it):

* MBPP style: ``{"tests": ["assert f(1) == 2", ...], "setup": "import math"}``
  (``setup`` optional); a plain string of ``assert`` lines also works.
* HumanEval style: ``{"test": "def check(candidate): ...", "entry_point": "f"}``;
  the program ends with ``check(f)``.

The completion's code is the last fenced ```python block, else the whole
text. Reward 1.0 iff the program (code, then tests) exits 0 within the
limits; anything else is 0.0 with the reason in ``info`` (``timeout``,
``failed``), so nothing the model writes can hang or kill the trainer.

The sandbox (each layer where the machine allows it):

* a fresh temporary working directory, deleted afterwards; ``python -I``
  (isolated: no user site, no environment variables, no cwd on sys.path);
* resource limits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS,
  default 1 GiB), largest file written (RLIMIT_FSIZE, default 1 MiB: also caps
  stdout/stderr, which go to files), open files, and processes (RLIMIT_NPROC);
* a wall-clock limit: the child runs in its own session and the whole process
  group is killed when the limit passes;
* when running as root: the child enters a new, empty network namespace
  (``unshare(CLONE_NEWNET)``: no network at all, loopback included) and then
  drops to the ``nobody`` user (so it cannot modify the host's files, and
  RLIMIT_NPROC applies, which stops fork bombs);
* always: the program starts with a preamble that disables ``socket`` and
  process creation from Python, a second line of defence where the OS
  layers are unavailable (a non-root user gets rlimits, the preamble and
  its own file permissions; run training in a container for more).
"""

from __future__ import annotations

import ctypes
import json
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

from ebpo.verifiers.base import VERIFIERS, VerifierResult

__all__ = ["CodeVerifier", "extract_code", "build_program"]

_PREAMBLE = """\
import socket as _s, os as _o, subprocess as _sp
def _blocked(*a, **k):
    raise PermissionError("blocked by the ebpo sandbox")
_s.socket = _s.create_connection = _s.socketpair = _blocked
_o.fork = _o.forkpty = _o.system = _o.popen = _o.execv = _o.execve = _o.spawnv = _blocked
_sp.Popen = _blocked
del _s, _o, _sp, _blocked
"""


def extract_code(completion: str) -> str:
    """The last fenced code block (```python or ```), else the completion itself."""
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


def build_program(code: str, reference: str) -> str:
    """Preamble + candidate code + the reference's tests, as one script."""
    try:
        spec: Any = json.loads(reference)
    except json.JSONDecodeError:
        spec = {"tests": [line for line in reference.splitlines() if line.strip()]}
    if isinstance(spec, list):
        spec = {"tests": spec}
    if not isinstance(spec, dict) or not ({"tests", "test"} & set(spec)):
        raise ValueError(f"code reference must hold 'tests' (MBPP) or 'test' + 'entry_point' (HumanEval): {reference[:200]!r}")
    parts = [_PREAMBLE, spec.get("setup", ""), code, ""]
    if "test" in spec:
        if "entry_point" not in spec:
            raise ValueError("a HumanEval-style code reference needs 'entry_point'")
        parts += [spec["test"], f"check({spec['entry_point']})"]
    else:
        parts += list(spec["tests"])
    return "\n".join(parts) + "\n"


_CLONE_NEWNET = 0x40000000


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _nobody() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


@VERIFIERS.register("code")
class CodeVerifier:
    """Sandboxed execution; see the module docstring.

    Args:
        timeout_seconds: wall-clock limit per program.
        memory_mb: address-space limit.
        max_output_bytes: largest stdout/stderr file (and any file) the program may write.
        max_processes: RLIMIT_NPROC for the sandbox user (effective when dropping to ``nobody``).
        isolate_network: enter a new network namespace when the OS allows it (root).
        python: interpreter for the programs; default: this one, else the system python3.

    Attributes ``python``, ``user`` and ``isolate_network`` say which layers are active.
    """

    def __init__(
        self,
        timeout_seconds: float = 5.0,
        memory_mb: int = 1024,
        max_output_bytes: int = 1 << 20,
        max_processes: int = 64,
        isolate_network: bool = True,
        python: str | None = None,
    ) -> None:
        if timeout_seconds <= 0 or memory_mb < 64:
            raise ValueError("code verifier needs timeout_seconds > 0 and memory_mb >= 64")
        self.timeout_seconds, self.memory_mb = timeout_seconds, memory_mb
        self.max_output_bytes, self.max_processes = max_output_bytes, max_processes
        # Probe once for the strongest sandbox this machine allows: containers may forbid
        # namespaces even to root, and 'nobody' may be unable to run the current interpreter
        # (a virtualenv under /root); the test programs need only the standard library.
        interpreters = [python] if python else list(dict.fromkeys([sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]))
        nobody = _nobody()
        layers = [(net, user) for user in ([nobody, None] if nobody else [None]) for net in ([True, False] if isolate_network and os.geteuid() == 0 else [False])]
        for self.isolate_network, self.user in layers:
            self.python = next((exe for exe in interpreters if os.path.exists(exe) and self._probe(exe)), None)
            if self.python is not None:
                break
        else:
            raise RuntimeError(f"code verifier: no Python interpreter runs in the sandbox (tried {interpreters})")

    def _probe(self, exe: str) -> bool:
        try:
            subprocess.run([exe, "-I", "-c", "pass"], preexec_fn=self._limits, check=True, timeout=30, cwd="/", capture_output=True)
        except (subprocess.SubprocessError, OSError):
            return False
        return True

    def _limits(self) -> None:  # runs in the child between fork and exec
        cpu = int(self.timeout_seconds) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        memory = self.memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.max_output_bytes, self.max_output_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if self.isolate_network and _libc().unshare(_CLONE_NEWNET) != 0:
            raise OSError("unshare(CLONE_NEWNET) failed")
        if self.user is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (self.max_processes, self.max_processes))
            uid, gid = self.user
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)

    def __call__(self, completion: str, reference: str) -> VerifierResult:
        program = build_program(extract_code(completion), reference)
        workdir = tempfile.mkdtemp(prefix="ebpo-sandbox-")
        try:
            if self.user is not None:
                os.chown(workdir, *self.user)
            script = os.path.join(workdir, "program.py")
            with open(script, "w") as handle:
                handle.write(program)
            command = [self.python, "-I", "-B", script]
            with open(os.path.join(workdir, "out.txt"), "wb") as out:
                proc = subprocess.Popen(
                    command, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    preexec_fn=self._limits, start_new_session=True, env={"PATH": "/usr/bin:/bin", "HOME": workdir},
                )
                try:
                    code = proc.wait(timeout=self.timeout_seconds)
                except subprocess.TimeoutExpired:
                    _kill_group(proc)
                    return VerifierResult(0.0, {"timeout": 1.0})
                finally:
                    _kill_group(proc)  # leftovers of a program that exited but left children behind
            if code == 0:
                return VerifierResult(1.0)
            timed_out = code in (-signal.SIGXCPU, -signal.SIGKILL)
            return VerifierResult(0.0, {"timeout": 1.0} if timed_out else {"failed": 1.0})
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
