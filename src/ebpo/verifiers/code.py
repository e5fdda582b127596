"""``code``: run generated Python against test cases in a sandboxed subprocess.

Reference format (a JSON string; the MBPP and HumanEval loaders write it):

* MBPP style: ``{"tests": ["assert f(1) == 2", ...], "setup": "import math"}``
  (``setup`` optional, runs before the candidate's code); a JSON list of
  assert strings, or plain text with one ``assert`` per line, also works.
* HumanEval style: ``{"test": "def check(candidate): ...", "entry_point": "f",
  "prompt": "def f(x):\n    \"\"\"...\"\"\"\n"}`` (``prompt`` optional: it is put before
  the code, as HumanEval's harness does, so a body-only continuation runs and a
  complete function simply redefines it); the program ends with ``check(f)``.

The candidate's code is the last fenced block (```python or ```), else the
whole completion. The program is ``setup``, ``prompt``, code, then the tests; reward 1.0
iff it runs its tests to the end and exits 0 within the limits (an early
``sys.exit(0)`` fails), else 0.0 with the reason counted in
``info``: ``timeout`` (wall clock or CPU limit), ``output_limit`` (wrote more
than ``max_output_bytes``), ``failed`` (any other non-zero exit: a failed
assert, a syntax error, a blocked operation, ``MemoryError``). Nothing the
model writes can hang or kill the trainer: an unusable *reference* raises
``ValueError``, and a sandbox that cannot start raises ``RuntimeError``
(both are our bugs, never the model's).

The sandbox, layer by layer. The constructor probes which layers this machine
allows, strongest first, and records them in :attr:`CodeVerifier.layers`.

1. Always: a fresh temporary working directory, deleted afterwards; the child
   runs in its own session, and on the wall-clock limit its whole process group
   is killed; ``python -I -B`` (isolated mode: no environment variables, no user
   site, no cwd on ``sys.path``; no ``.pyc`` writes); a minimal environment
   (``HOME`` and ``TMPDIR`` are the working directory).
2. Always: resource limits set in the child before any candidate code runs:
   CPU seconds (``RLIMIT_CPU``), address space (``RLIMIT_AS``, default 1 GiB),
   largest file written (``RLIMIT_FSIZE``; stdout and stderr go to a file, so
   this also caps output), open files (``RLIMIT_NOFILE``), no core dumps.
3. Always: a Python audit hook (PEP 578) installed before the candidate's code
   that refuses writes, deletes, renames, chmods, links outside the working
   directory; sockets; process creation (fork, exec, spawn, subprocess);
   signals to other processes; and ``ctypes``. Audit hooks cannot be removed
   from Python, but they are *not* a security boundary on their own (PEP 578
   says so): code that escapes the interpreter escapes them. Layers 4-6 are the
   OS-level boundary.
4. As root, where the kernel allows: a new, empty network namespace
   (``unshare(CLONE_NEWNET)``: no network at all, loopback included).
5. As root, where the kernel allows: a new mount namespace with private,
   empty ``tmpfs`` mounts over ``/tmp``, ``/var/tmp`` and ``/dev/shm`` (the
   working directory is bind-mounted back at its own path), so the child
   cannot leave files in the host's world-writable directories.
6. As root: drop to the ``nobody`` user with ``RLIMIT_NPROC`` (stops fork
   bombs; root ignores that limit), so the host's files are protected by
   ordinary permissions.

Without root (a typical CI runner) layers 1-3 apply: the child runs as the
calling user, so files that user can write are protected only by the audit
hook. Train on untrusted code as root in a container (layers 4-6) or inside a
VM. The child's interpreter must be usable by ``nobody`` when dropping
privileges; the probe falls back to the system ``python3`` when the current
one (e.g. a virtualenv under ``/root``) is not, and the candidate then sees
only that interpreter's packages (the benchmarks need only the standard library).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from ebpo.verifiers.base import VERIFIERS, VerifierResult

__all__ = ["CodeVerifier", "SandboxResult", "extract_code", "build_program"]

# Runs in the child interpreter (``python -I -B -c _BOOT config.json``), before the
# candidate's code: limits, namespaces, privilege drop, then the audit hook, then the
# program. It reports "ok" on the status pipe once set-up succeeded and closes it, so
# nothing the candidate prints or exits with can pass for a sandbox failure.
_BOOT = r'''
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
status = cfg["status_fd"]
try:
    def limit(kind, value):
        resource.setrlimit(kind, (value, value))
    limit(resource.RLIMIT_CPU, cfg["cpu_seconds"])
    limit(resource.RLIMIT_AS, cfg["memory_bytes"])
    limit(resource.RLIMIT_FSIZE, cfg["max_output_bytes"])
    limit(resource.RLIMIT_NOFILE, 64)
    limit(resource.RLIMIT_CORE, 0)
    flags = (0x40000000 if cfg["netns"] else 0) | (0x00020000 if cfg["mountns"] else 0)
    if flags:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(flags) != 0:
            raise OSError(ctypes.get_errno(), "unshare failed")
        if cfg["mountns"]:
            def mount(source, target, fstype, mountflags, data):
                if libc.mount(source, target, fstype, mountflags, data) != 0:
                    raise OSError(ctypes.get_errno(), "mount %s failed" % target.decode())
            MS_REC, MS_PRIVATE, MS_BIND = 16384, 1 << 18, 4096
            mount(None, b"/", None, MS_REC | MS_PRIVATE, None)  # nothing propagates back to the host
            workdir = os.getcwd()  # our cwd survives the over-mount; bind it back at its own path
            for target in cfg["private_dirs"]:
                mount(b"tmpfs", target.encode(), b"tmpfs", 0, b"size=64m,mode=1777")
            os.makedirs(workdir, exist_ok=True)
            mount(b".", workdir.encode(), None, MS_BIND, None)
            os.chdir(workdir)
        del libc, ctypes
        for name in [m for m in sys.modules if m == "ctypes" or m.startswith("ctypes.")]:
            del sys.modules[name]  # a re-import needs dlopen, which the hook refuses
    if cfg["uid"] is not None:
        limit(resource.RLIMIT_NPROC, cfg["max_processes"])
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
except BaseException as exc:
    os.write(status, ("sandbox set-up failed: %r" % (exc,)).encode())
    raise SystemExit(125)
os.write(status, b"ok")
os.close(status)
del limit, flags, status

def _hook_factory():
    import os as _os
    realpath, sep = _os.path.realpath, _os.sep
    root = realpath(_os.getcwd())
    allowed = (root, "/dev/null")
    write_flags = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_TRUNC | _os.O_APPEND
    denied = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
              "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "os.setsid",
              "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
              "socket.sendto", "os.chroot", "os.startfile", "pty.spawn", "sys.remote_exec"}
    path_events = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.chmod": 1,
                   "os.chown": 1, "os.truncate": 1, "os.link": 2, "os.symlink": 2, "os.utime": 1,
                   "os.chflags": 1, "os.lchflags": 1, "os.setxattr": 1, "os.removexattr": 1,
                   "shutil.rmtree": 1, "os.mkfifo": 1, "os.mknod": 1}

    def inside(path):
        if isinstance(path, int):
            return True  # an already-open descriptor
        full = realpath(_os.fsdecode(path))
        return any(full == a or full.startswith(a + sep) for a in allowed)

    def hook(event, args):
        if event in denied or event.startswith("ctypes."):
            raise PermissionError("blocked by the ebpo sandbox: " + event)
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in mode for c in "wax+")) or (flags & write_flags)
            if writes and not inside(path):
                raise PermissionError("blocked by the ebpo sandbox: writing %r" % (path,))
        elif event in path_events:
            if not all(inside(p) for p in args[: path_events[event]] if p is not None):
                raise PermissionError("blocked by the ebpo sandbox: %s%r" % (event, args))
        elif event == "object.__setattr__" and args[1] in ("__code__", "__closure__"):
            raise PermissionError("blocked by the ebpo sandbox: replacing code objects")
    return hook

if cfg["audit_hook"]:
    sys.addaudithook(_hook_factory())
del _hook_factory, cfg, json, resource
with open("program.py") as _f:
    _source = _f.read()
_program = compile(_source, "program.py", "exec")
del _f, _source
# Success is exit status 0 after the tests ran. A program that exits early with status 0
# (sys.exit(), os._exit(0)) before its tests must not pass: SystemExit from the program
# fails, and os._exit is replaced. (An adversarial program could still dig the original
# _exit out of the interpreter; the OS layers keep the host safe, not the reward honest.)
import posix
def _no_exit(*args):
    raise PermissionError("blocked by the ebpo sandbox: os._exit")
os._exit = posix._exit = _no_exit
del posix
try:
    exec(_program, {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit as _exit:
    if _exit.code not in (None, 0):
        raise
    sys.stderr.write("ebpo sandbox: the program exited before its tests finished\n")
    raise SystemExit(3)
'''


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


def build_program(code: str, reference: str) -> str:
    """Setup + candidate code + the reference's tests, as one script (see the module docstring)."""
    try:
        spec: Any = json.loads(reference)
    except json.JSONDecodeError:
        spec = {"tests": [line for line in reference.splitlines() if line.strip()]}
    if isinstance(spec, list):
        spec = {"tests": spec}
    if not isinstance(spec, dict) or not ({"tests", "test"} & set(spec)):
        raise ValueError(f"code reference must hold 'tests' (MBPP) or 'test' + 'entry_point' (HumanEval): {reference[:200]!r}")
    parts = [spec.get("setup", "") or "", spec.get("prompt", "") or "", code, ""]
    if "test" in spec:
        if "entry_point" not in spec:
            raise ValueError(f"a HumanEval-style code reference needs 'entry_point': {reference[:200]!r}")
        parts += [spec["test"], f"check({spec['entry_point']})"]
    else:
        if not spec["tests"]:
            raise ValueError(f"code reference has no tests: {reference[:200]!r}")  # would reward any code
        parts += list(spec["tests"])
    return "\n".join(parts) + "\n"


@dataclass(frozen=True)
class SandboxResult:
    """What one sandboxed run did. ``output`` is at most ``max_report_bytes`` of its stdout+stderr (the tail)."""

    returncode: int | None  # None when killed on the wall-clock limit
    timed_out: bool
    output_truncated: bool  # it wrote max_output_bytes (RLIMIT_FSIZE): output beyond was refused
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


_PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


@VERIFIERS.register("code")
class CodeVerifier:
    """Sandboxed execution of generated Python; see the module docstring.

    Args:
        timeout_seconds: wall-clock limit per program (the CPU limit is this, rounded up, + 1).
        memory_mb: address-space limit.
        max_output_bytes: largest stdout+stderr (and any file) the program may write.
        max_report_bytes: how much of the output :meth:`run` reads back (the tail).
        max_processes: ``RLIMIT_NPROC`` for the ``nobody`` user (only when dropping to it).
        isolate_network: enter a new network namespace where the OS allows it (root).
        private_tmp: give the child empty private ``/tmp``, ``/var/tmp``, ``/dev/shm`` where the OS allows it (root).
        drop_privileges: run as ``nobody`` where the OS allows it (root).
        audit_hook: install the audit hook (layer 3). Only for testing the OS layers on their own.
        python: interpreter for the programs; default: this one, else the system ``python3``.

    Thread-safe: no ``preexec_fn`` (unsafe with threads); limits are set by the child itself.
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
        audit_hook: bool = True,
        python: str | None = None,
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError(f"code verifier timeout_seconds must be > 0, got {timeout_seconds}")
        if memory_mb < 64:
            raise ValueError(f"code verifier memory_mb must be >= 64 (a Python interpreter needs ~30 MB), got {memory_mb}")
        if max_output_bytes < 1024 or max_report_bytes < 0:
            raise ValueError("code verifier needs max_output_bytes >= 1024 and max_report_bytes >= 0")
        self.timeout_seconds, self.memory_mb = timeout_seconds, memory_mb
        self.max_output_bytes, self.max_report_bytes, self.max_processes = max_output_bytes, max_report_bytes, max_processes
        self.audit_hook = audit_hook
        root = os.geteuid() == 0
        nobody = _nobody() if drop_privileges else None
        interpreters = [python] if python else list(dict.fromkeys([sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]))
        # Strongest combination first; containers may forbid namespaces even to root, and
        # 'nobody' may be unable to run the current interpreter.
        candidates = [
            (user, net, mnt)
            for user in ([nobody, None] if nobody else [None])
            for net in ([True, False] if isolate_network and root else [False])
            for mnt in ([True, False] if private_tmp and root else [False])
        ]
        for self.user, self.netns, self.mountns in candidates:
            self.python = next((exe for exe in interpreters if os.path.exists(exe) and self._probe(exe)), "")
            if self.python:
                break
        else:
            raise RuntimeError(f"code verifier: no Python interpreter starts in the sandbox (tried {interpreters})")
        self.layers = {"network_namespace": self.netns, "private_tmp": self.mountns, "nobody": self.user is not None, "audit_hook": audit_hook, "rlimits": True}

    def _probe(self, exe: str) -> bool:
        self.python = exe
        try:
            # Pure-Python and extension modules the set-up did not import: 'nobody' must be able to read them.
            result = self.run("import collections, fractions, heapq, math, re\n")
        except RuntimeError:
            return False
        return result.returncode == 0

    def run(self, program: str) -> SandboxResult:
        """Run ``program`` (Python source) in the sandbox; raises RuntimeError only if the sandbox itself fails."""
        workdir = tempfile.mkdtemp(prefix="ebpo-sandbox-")
        status_read, status_write = os.pipe()
        start = time.monotonic()
        try:
            os.chmod(workdir, 0o700)
            if self.user is not None:
                os.chown(workdir, *self.user)
            with open(os.path.join(workdir, "program.py"), "w") as handle:
                handle.write(program)
            config = {
                "status_fd": status_write, "cpu_seconds": int(self.timeout_seconds) + 1, "memory_bytes": self.memory_mb << 20,
                "max_output_bytes": self.max_output_bytes, "max_processes": self.max_processes, "netns": self.netns,
                "mountns": self.mountns, "private_dirs": [d for d in _PRIVATE_DIRS if os.path.isdir(d)],
                "audit_hook": self.audit_hook, "uid": self.user[0] if self.user else None, "gid": self.user[1] if self.user else None,
            }
            output_path = os.path.join(workdir, "output.txt")
            with open(output_path, "wb") as output:
                if self.user is not None:
                    os.chown(output_path, *self.user)
                proc = subprocess.Popen(
                    [self.python, "-I", "-B", "-c", _BOOT, json.dumps(config)],
                    cwd=workdir, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                    pass_fds=(status_write,), start_new_session=True, close_fds=True,
                    env={"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"},
                )
                os.close(status_write)
                status_write = -1
                timed_out = False
                try:
                    proc.wait(timeout=self.timeout_seconds)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    _kill_group(proc)  # on time-out, and any leftovers of a program that exited
            status = _read_all(status_read)
            if status != b"ok":
                tail = _tail(output_path, 2000)
                raise RuntimeError(f"code sandbox could not start the program ({self.python}): {status.decode(errors='replace') or 'no status'}; output: {tail}")
            # Python ignores SIGXFSZ, so hitting RLIMIT_FSIZE shows as a full output file, not a signal.
            truncated = os.path.getsize(output_path) >= self.max_output_bytes
            return SandboxResult(None if timed_out else proc.returncode, timed_out, truncated, _tail(output_path, self.max_report_bytes), time.monotonic() - start)
        finally:
            if status_write >= 0:
                os.close(status_write)
            os.close(status_read)
            shutil.rmtree(workdir, ignore_errors=True)

    def __call__(self, completion: str, reference: str) -> VerifierResult:
        result = self.run(build_program(extract_code(completion), reference))
        code = result.returncode
        if code == 0:
            return VerifierResult(1.0)
        if result.timed_out or code in (-signal.SIGXCPU, -signal.SIGKILL):  # the CPU limit sends SIGXCPU, then SIGKILL
            return VerifierResult(0.0, {"timeout": 1.0})
        if result.output_truncated or code == -signal.SIGXFSZ:
            return VerifierResult(0.0, {"output_limit": 1.0})
        return VerifierResult(0.0, {"failed": 1.0})


def _read_all(fd: int) -> bytes:
    # Every copy of the write end is closed (ours above, the child's on exit or set-up), so this ends.
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def _tail(path: str, limit: int) -> str:
    """At most ``limit`` bytes from the end of ``path`` (the file itself is capped by RLIMIT_FSIZE)."""
    if limit == 0:
        return ""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - limit))
        return handle.read(limit).decode(errors="replace")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # already gone
        pass
    proc.wait()  # SIGKILL cannot be caught: the leader exits promptly
