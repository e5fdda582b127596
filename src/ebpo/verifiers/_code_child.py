# The sandboxed child of the code verifier: ``python -I -B -c <this file's text> <config json>``.
#
# It is started by the judge (``_code_judge.py``), never imported. Everything up to the "ok"
# on the status pipe runs before any untrusted code and is trusted; everything after it is
# NOT: the candidate's program runs in this interpreter and can rewrite any of it. That is
# why nothing it says is evidence: the judge only accepts plain data on the reply pipe and
# decides pass/fail itself (see code.py, "What decides the reward").
#
# Protocol (one JSON document per line): the judge sends the program on the request pipe;
# the child replies {"loaded": true} or {"loaded": false, "error": "TypeName"}; then for
# each call {"name": ..., "args": [...], "kwargs": [...]} it replies {"ok": <encoded>},
# {"raised": "TypeName"} or {"unserialisable": "why"}. Encoding: _plain_data.py, whose text
# the judge puts before this file's.
import json
import os
import resource
import sys

cfg = json.loads(sys.argv[1])
status = cfg["status_fd"]
keep = {0, 1, 2, status, cfg["request_fd"], cfg["reply_fd"]}
try:

    def limit(kind, value):
        resource.setrlimit(kind, (value, value))

    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def check(result, what):
        if result != 0:
            raise OSError(ctypes.get_errno(), what + " failed")

    # Die with the judge (PR_SET_PDEATHSIG = 1): if it is killed, so are we, and as the init
    # of our PID namespace, every process the program started dies with us.
    check(libc.prctl(1, 9, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() not in (0, cfg["judge_pid"]):  # the judge died before the line above
        raise SystemExit(125)
    flags = (0x40000000 if cfg["netns"] else 0) | (0x00020000 if cfg["mountns"] else 0)
    if flags:
        check(libc.unshare(flags), "unshare")
    if cfg["mountns"]:

        def mount(source, target, fstype, mountflags, data=None):
            check(
                libc.mount(source, target.encode() if target else None, fstype, mountflags, data), "mount %s" % target
            )

        MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
            1,
            2,
            4,
            8,
            32,
            4096,
            16384,
            1 << 18,
        )
        per_mount = {
            "nosuid": MS_NOSUID,
            "nodev": MS_NODEV,
            "noexec": MS_NOEXEC,
            "noatime": 1024,
            "nodiratime": 2048,
            "relatime": 1 << 21,
        }
        mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do propagates back to the host
        with open("/proc/self/mountinfo") as handle:
            mounts = [line.split() for line in handle]
        # Every mount read-only (a bind remount changes only this namespace's view), keeping
        # each mount's own nosuid/nodev/noexec. Then the only writable place is our tmpfs.
        for fields in mounts:
            target = fields[4].replace("\\040", " ")
            extra = sum(per_mount.get(option, 0) for option in fields[5].split(","))
            try:
                mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | extra)
            except OSError:
                if os.path.exists(target):  # a mount we cannot make read-only: refuse to run
                    raise
        if cfg["pidns"]:  # our own /proc: the host's processes are not even visible
            mount(b"proc", "/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        owner = "uid=%d,gid=%d," % (cfg["uid"], cfg["gid"]) if cfg["uid"] is not None else ""
        for target in ("/tmp", "/dev/shm"):
            if os.path.isdir(target):
                mount(
                    b"tmpfs",
                    target,
                    b"tmpfs",
                    MS_NOSUID | MS_NODEV,
                    ("size=%dm,mode=700,%s" % (cfg["tmpfs_mb"], owner)).rstrip(",").encode(),
                )
        workdir = "/tmp"
    else:
        workdir = cfg["workdir"]
    os.chdir(workdir)
    limit(resource.RLIMIT_CPU, cfg["cpu_seconds"])
    limit(resource.RLIMIT_AS, cfg["memory_bytes"])
    limit(resource.RLIMIT_FSIZE, cfg["max_file_bytes"])
    limit(resource.RLIMIT_NOFILE, 64)
    limit(resource.RLIMIT_CORE, 0)
    if cfg["uid"] is not None:
        limit(resource.RLIMIT_NPROC, cfg["max_processes"])
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
    for fd in os.listdir("/proc/self/fd"):  # nothing inherited but our three pipes
        if int(fd) not in keep:
            try:
                os.close(int(fd))
            except OSError:
                pass
    del libc, ctypes, check, flags
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith("ctypes.") or m == "_ctypes"]:
        del sys.modules[name]  # a re-import needs dlopen, which the hook refuses
except BaseException as exc:
    os.write(status, ("sandbox set-up failed: %r" % (exc,)).encode())
    raise SystemExit(125)
os.write(status, b"ok")
os.close(status)
os.environ.clear()
os.environ.update({"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"})
del limit, status, keep


def _hook_factory(root):
    # Defence in depth only (PEP 578: audit hooks are not a security boundary); the OS layers
    # (read-only mounts, nobody, namespaces) are the boundary where the machine allows them.
    import os as _os

    realpath, sep = _os.path.realpath, _os.sep
    root = realpath(root)
    allowed = (root, "/dev/null")
    write_flags = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_TRUNC | _os.O_APPEND
    denied = {
        "os.fork",
        "os.forkpty",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "subprocess.Popen",
        "os.kill",
        "os.killpg",
        "signal.pthread_kill",
        "os.setsid",
        "socket.__new__",
        "socket.connect",
        "socket.bind",
        "socket.getaddrinfo",
        "socket.sendto",
        "os.chroot",
        "os.startfile",
        "pty.spawn",
        "sys.remote_exec",
        "sys.setprofile",
        "sys.settrace",
    }
    # event: (number of leading path arguments, positions of dir_fd arguments)
    path_events = {
        "os.remove": (1, (1,)),
        "os.rmdir": (1, (1,)),
        "os.mkdir": (1, (2,)),
        "os.rename": (2, (2, 3)),
        "os.chmod": (1, (2,)),
        "os.chown": (1, (3,)),
        "os.truncate": (1, ()),
        "os.link": (2, (2, 3)),
        "os.symlink": (2, (2,)),
        "os.utime": (1, (3,)),
        "os.chflags": (1, ()),
        "os.lchflags": (1, ()),
        "os.setxattr": (1, ()),
        "os.removexattr": (1, ()),
        "shutil.rmtree": (1, ()),
        "os.mkfifo": (1, (2,)),
        "os.mknod": (1, (3,)),
        "os.fchmod": (1, ()),
        "os.fchown": (1, ()),
    }

    def inside(path):
        if isinstance(path, int):  # a descriptor: where does it point (fchmod/fsetxattr on a host file)?
            try:
                path = _os.readlink("/proc/self/fd/%d" % path)
            except OSError:
                return False
            if not path.startswith(sep):  # pipe:[...], socket:[...], anon_inode:...
                return True
        full = realpath(_os.fsdecode(path))
        return any(full == a or full.startswith(a + sep) for a in allowed)

    # _posixsubprocess.fork_exec starts processes without any audit event: refuse the module.
    # os, posix, signal and _signal are loaded, with pidfd_open / pidfd_send_signal (no audit
    # events either) removed below: an import event for them is a re-import to get those back.
    denied_imports = {"_posixsubprocess", "_ctypes", "ctypes", "os", "posix", "signal", "_signal"}

    def hook(event, args):
        if event in denied or event.startswith("ctypes."):
            raise PermissionError("blocked by the ebpo sandbox: " + event)
        if event == "import" and args[0] in denied_imports:
            raise PermissionError("blocked by the ebpo sandbox: import " + args[0])
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in mode for c in "wax+")) or (flags & write_flags)
            # os.open (mode None) may carry a dir_fd the hook cannot see: relative writes refused
            relative = mode is None and not isinstance(path, int) and not _os.path.isabs(_os.fsdecode(path))
            if writes and (relative or not inside(path)):
                raise PermissionError("blocked by the ebpo sandbox: writing %r" % (path,))
        elif event in path_events:
            count, dir_fds = path_events[event]
            if any(i < len(args) and args[i] not in (None, -1) for i in dir_fds):
                raise PermissionError("blocked by the ebpo sandbox: %s with dir_fd" % event)
            if not all(inside(p) for p in args[:count] if p is not None):
                raise PermissionError("blocked by the ebpo sandbox: %s%r" % (event, args))
        elif event == "object.__setattr__" and args[1] in ("__code__", "__closure__"):
            raise PermissionError("blocked by the ebpo sandbox: replacing code objects")

    return hook


_readline = os.fdopen(cfg["request_fd"], "rb").readline
_reply_fd = cfg["reply_fd"]


def _reply(message):
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(_reply_fd, data) :]


_program_source = json.loads(_readline())
_mode = cfg["mode"]
if cfg["audit_hook"]:
    import _signal
    import posix
    import signal

    for _module, _name in (
        (os, "pidfd_open"),
        (posix, "pidfd_open"),
        (signal, "pidfd_send_signal"),
        (_signal, "pidfd_send_signal"),
    ):
        if hasattr(_module, _name):
            delattr(_module, _name)
    del posix, signal, _signal, _module, _name
    sys.addaudithook(_hook_factory(workdir))
del _hook_factory, cfg, resource, workdir
_globals = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    _program = compile(_program_source, "program.py", "exec")
    del _program_source
    exec(_program, _globals)
except BaseException as _error:
    if _mode == "run":
        raise
    _reply({"loaded": False, "error": type(_error).__name__})
    raise SystemExit(1)
if _mode == "run":  # a plain script run (diagnostics): its exit status is the result
    raise SystemExit(0)
_reply({"loaded": True})
while True:
    _line = _readline()
    if not _line:
        raise SystemExit(0)
    _call = json.loads(_line)
    try:
        _function = _globals[_call["name"]]
        _result = _function(*_decode(_call["args"]), **dict(_decode(_call["kwargs"])))
    except BaseException as _error:
        _reply({"raised": type(_error).__name__})
        continue
    try:
        _encoded = _encode(_result)
    except (TypeError, ValueError, RecursionError) as _error:
        _reply({"unserialisable": str(_error)[:100]})
        continue
    _reply({"ok": _encoded})
