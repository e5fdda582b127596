"""The code verifier's judge: ``python -I -B _code_judge.py``, one check per process.

Trusted. Reads one JSON request on stdin, writes one JSON verdict on stdout. It
starts the sandboxed child (``_code_child.py``) as the init of a fresh PID
namespace where the kernel allows, sends it the candidate's program (setup +
prompt + code: never the tests), then runs the reference's tests *here*, with
every function the candidate was to define replaced by a proxy that sends the
call's arguments to the child and gets back plain data (``_plain_data.py``).
The asserts, the builtins they use and every comparison run in this process,
on values that cannot carry code; the child's exit status, its output and its
objects' methods are never consulted. Standard library only (run by path with
``-I``, it cannot import ebpo).

Verdict statuses: ``passed``; ``failed`` (an assert or any other error in the
tests, a program that does not load, a missing function); ``timeout``;
``output_limit``; ``not_plain_data`` (a call returned something that is not
plain data); ``bad_output`` (a malformed reply); ``unsupported_test`` (a test
passes something that is not plain data to the candidate, e.g. a function);
``sandbox_error`` (the sandbox could not be set up: our problem, not the
candidate's); ``exited`` (run mode: the program's exit status, diagnostics only).
"""

import ast
import builtins
import importlib
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(_HERE, "_plain_data.py")) as _handle:
    _PLAIN_SOURCE = _handle.read()
with open(os.path.join(_HERE, "_code_child.py")) as _handle:
    _CHILD_SOURCE = _PLAIN_SOURCE + "\n" + _handle.read()
exec(compile(_PLAIN_SOURCE, "_plain_data.py", "exec"))  # _encode, _decode  # noqa: S102 (our own file)

CLONE_NEWPID = 0x20000000


class Abort(BaseException):
    """Ends the check with a status; a BaseException, so the tests' ``except Exception`` cannot swallow it."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


class CandidateError(Exception):
    """The candidate raised an exception that is not a builtin one."""


class Child:
    def __init__(self, cfg, mode):
        self.cfg, self.deadline = cfg, time.monotonic() + cfg["timeout_seconds"]
        self.tail, self.total, self.flooded = b"", 0, False
        self.workdir = None
        status_r, status_w = os.pipe()
        request_r, self.request_w = os.pipe()
        self.reply_r, reply_w = os.pipe()
        output_r, output_w = os.pipe()
        if not cfg["mountns"]:  # no private tmpfs: a host directory only the sandbox user may use
            self.workdir = tempfile.mkdtemp(prefix="ebpo-sandbox-")
            os.chmod(self.workdir, 0o700)
            if cfg["uid"] is not None:
                os.chown(self.workdir, cfg["uid"], cfg["gid"])
        # The drain thread starts first: once the PID namespace for our children is set,
        # the kernel refuses to create threads in this process (EINVAL on clone).
        self.drain = threading.Thread(target=self._drain, args=(output_r,), daemon=True)
        self.drain.start()
        if cfg["pidns"]:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWPID) != 0:  # our next child is the init of a new PID namespace
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWPID) failed")
        child_cfg = {
            "status_fd": status_w,
            "request_fd": request_r,
            "reply_fd": reply_w,
            "mode": mode,
            "judge_pid": os.getpid(),
            "netns": cfg["netns"],
            "mountns": cfg["mountns"],
            "pidns": cfg["pidns"],
            "workdir": self.workdir,
            "cpu_seconds": int(cfg["timeout_seconds"]) + 1,
            "memory_bytes": cfg["memory_mb"] << 20,
            "max_file_bytes": cfg["max_output_bytes"],
            "tmpfs_mb": cfg["tmpfs_mb"],
            "max_processes": cfg["max_processes"],
            "audit_hook": cfg["audit_hook"],
            "uid": cfg["uid"],
            "gid": cfg["gid"],
            "label": cfg["label"],
        }
        self.proc = subprocess.Popen(
            [cfg["python"], "-I", "-B", "-c", _CHILD_SOURCE, json.dumps(child_cfg)],
            stdin=subprocess.DEVNULL,
            stdout=output_w,
            stderr=output_w,
            pass_fds=(status_w, request_r, reply_w),
            close_fds=True,
            start_new_session=True,
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )
        for fd in (status_w, request_r, reply_w, output_w):
            os.close(fd)
        self.status = self._read_all(status_r)
        self.deadline = (
            time.monotonic() + cfg["timeout_seconds"]
        )  # the program's time starts once the sandbox is set up
        self.buffer = b""

    def _drain(self, fd):
        # stdout+stderr: read to the end, keep the tail, kill the child past max_output_bytes.
        keep = self.cfg["max_report_bytes"]
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            self.total += len(chunk)
            self.tail = (self.tail + chunk)[-keep:] if keep else b""
            if self.total > self.cfg["max_output_bytes"] and not self.flooded:
                self.flooded = True
                self.kill()
        os.close(fd)

    def _read_all(self, fd):
        data = b""
        while (
            time.monotonic() < self.deadline + 5
        ):  # set-up is ours: slack beyond the limit (the caller's hard limit still holds)
            if not select.select([fd], [], [], 0.5)[0]:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk[: 4096 - len(data)]
        os.close(fd)
        return data

    def send(self, message):
        data = (json.dumps(message) + "\n").encode()
        while data:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise Abort("timeout")
            if not select.select([], [self.request_w], [], remaining)[1]:
                raise Abort("timeout")
            try:
                data = data[os.write(self.request_w, data[: 1 << 16]) :]
            except BrokenPipeError:
                raise Abort(self.gone()) from None

    def receive(self):
        """One reply line, within the deadline and at most max_output_bytes long."""
        limit = self.cfg["max_output_bytes"]
        while b"\n" not in self.buffer:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.reply_r], [], [], remaining)[0]:
                raise Abort("timeout")
            chunk = os.read(self.reply_r, 1 << 16)
            if not chunk:
                raise Abort(self.gone())
            self.buffer += chunk
            if len(self.buffer) > limit:
                raise Abort("output_limit")
        line, _, self.buffer = self.buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            raise Abort("bad_output") from None
        if type(message) is not dict:
            raise Abort("bad_output")
        return message

    def gone(self):
        """Why the child stopped talking: it exited (a failure), or a limit killed it."""
        try:
            code = self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return "timeout"
        if self.flooded:
            return "output_limit"
        return "timeout" if code in (-signal.SIGXCPU, -signal.SIGKILL) else "failed"

    def wait(self):
        try:
            return self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise Abort("timeout") from None

    def kill(self):
        # As the init of its PID namespace, the child takes every process it started with it.
        # Without the namespace, its process group is all we can reach.
        for kill, target in ((os.kill, self.proc.pid), (os.killpg, self.proc.pid)):
            try:
                kill(target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def close(self):
        self.kill()
        self.proc.wait()
        self.drain.join(timeout=0.5)  # a process outside our reach (no PID namespace) may hold the pipe open
        for fd in (self.request_w, self.reply_r):
            os.close(fd)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def exception_class(name):
    """The builtin exception of that name, so ``except ValueError`` in a test works; StopIteration excepted."""
    found = getattr(builtins, str(name), None)
    # A StopIteration raised inside map()/filter() ends the iteration silently:
    # all(map(lambda x: f(x) == y, xs)) would pass with nothing answered.
    if (
        isinstance(found, type)
        and issubclass(found, Exception)
        and not issubclass(found, (StopIteration, StopAsyncIteration))
    ):
        return found
    return CandidateError


def make_proxy(child, name):
    def candidate(*args, **kwargs):
        try:
            request = {"name": name, "args": _encode(list(args)), "kwargs": _encode(kwargs)}
        except (TypeError, ValueError, RecursionError):
            raise Abort("unsupported_test") from None  # the test passes something that is not plain data
        child.send(request)
        reply = child.receive()
        if len(reply) != 1:
            raise Abort("bad_output")
        if "ok" in reply:
            try:
                return _decode(reply["ok"])
            except Exception:  # noqa: BLE001  (any malformed data is the candidate's)
                raise Abort("bad_output") from None
        if "raised" in reply:
            raise exception_class(reply["raised"])("raised by the candidate")
        if "unserialisable" in reply:
            raise Abort("not_plain_data")
        raise Abort("bad_output")

    candidate.__name__ = candidate.__qualname__ = name
    return candidate


def free_names(tree, namespace):
    return {
        node.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Name)
        and isinstance(node.ctx, ast.Load)
        and node.id not in namespace
        and not hasattr(builtins, node.id)
    }


def module_names(tree):
    """Names the tests use as ``name.attr``: MBPP tests use ``math.isclose`` relying on the candidate's import."""
    return {
        node.value.id for node in ast.walk(tree) if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
    }


def run_tests(child, tests):
    """The reference's tests, here, with the candidate's functions as proxies to the child."""
    namespace = {"__name__": "__ebpo_tests__", "__builtins__": builtins}
    exec(tests.get("setup") or "", namespace)  # noqa: S102  (the reference: trusted, like the dataset)
    exec(tests.get("prompt") or "", namespace)  # noqa: S102  (HumanEval's own helpers, e.g. poly)
    source = tests["source"]
    tree = ast.parse(source)
    modules = module_names(tree)
    for name in free_names(tree, namespace):
        if name in modules:  # a module the tests use, imported here (trusted), not the candidate's object
            try:
                namespace[name] = importlib.import_module(name)
                continue
            except ImportError:
                pass
        namespace[name] = make_proxy(child, name)
    entry_point = tests.get("entry_point")
    if entry_point:
        namespace[entry_point] = make_proxy(child, entry_point)  # replaces the prompt's stub
    exec(compile(tree, "tests.py", "exec"), namespace)  # noqa: S102
    if entry_point:
        namespace["check"](namespace[entry_point])


def judge(request):
    child = Child(request["config"], request["mode"])
    try:
        verdict = _judge(child, request)
    finally:
        child.close()
    verdict["output"] = child.tail.decode(errors="replace")
    verdict["output_truncated"] = child.flooded
    return verdict


def _judge(child, request):
    try:
        if child.status != b"ok":
            return {"status": "sandbox_error", "message": child.status.decode(errors="replace")}
        child.send(request["program"])
        if request["mode"] == "run":
            code = child.wait()
            return {"status": "exited", "returncode": code}
        loaded = child.receive()
        if loaded.get("loaded") is not True:
            return {"status": "failed", "stage": "load"}
        run_tests(child, request["tests"])
        return {"status": "passed"}
    except Abort as abort:
        return {"status": abort.status}
    except Exception as error:  # noqa: BLE001  (an assert or any error in the tests: the candidate failed them)
        return {"status": "failed", "error": type(error).__name__}


def main():
    request = json.loads(sys.stdin.buffer.read())
    cfg = request["config"]
    # Bounds for the trusted tests running on untrusted data (e.g. range(returned value)).
    resource.setrlimit(resource.RLIMIT_AS, (cfg["judge_memory_mb"] << 20,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    start = time.monotonic()
    verdict = judge(request)
    verdict["elapsed_seconds"] = time.monotonic() - start
    sys.stdout.write(json.dumps(verdict))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
