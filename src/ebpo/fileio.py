"""Files the CLIs read and write: never run code from a file, never lose a user's file.

Two rules, each enforced here and nowhere else:

* **Loading never unpickles.** Every ``.pt`` file ebpo reads (checkpoints,
  search state, estimator state, caches) goes through :func:`load_tensors`,
  which is ``torch.load(..., weights_only=True)``: tensors, dicts, lists,
  tuples, strings and numbers only. A file that needs anything else (a pickled
  object, a numpy array from an older ebpo) is refused with an error that says
  so; there is no fallback to full unpickling, because a crafted checkpoint
  would run its code there.
* **Output directories are ebpo's or empty.** A directory that a CLI creates
  gets a marker file, :data:`MARKER`, naming the command that created it.
  :func:`check_output_dir` (which writes nothing) lets a command write into a
  path only if it does not exist, is an empty directory, or carries that
  command's marker; :func:`remove_output_dir` (``ebpo train --overwrite``)
  deletes only a directory with the marker, never a file, a symlink, ``/``,
  the home directory or the working directory (or a directory above them).

It also knows where a run keeps its checkpoints (:func:`latest_checkpoint`),
which ``ebpo train --resume`` and ``ebpo eval --model RUN_DIR`` both read, and
holds the pieces that let a run survive what real runs meet:

* :class:`RunLock`, an OS lock (``fcntl.flock``) on :data:`LOCK_FILE` in a run
  directory, held for the life of the command that writes it, so a second
  process on a live run is refused (naming the holder's PID). The kernel drops
  the lock when its process dies, however it dies, so a stale lock file is
  simply taken over.
* :func:`fsync_tree` / :func:`fsync_dir`: what is renamed into place is on disk
  first, so a power cut cannot leave a renamed but empty checkpoint.
* :func:`append_line`: a metrics row is one ``write`` of a whole line; a write
  that fails part-way (a full disk) is cut back, so no torn row is left.
* :func:`write_failure`: the one-line message for a failed write, naming the
  path and the free space on its filesystem.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

__all__ = [
    "MARKER",
    "load_tensors",
    "check_output_dir",
    "check_output_file",
    "make_output_dir",
    "remove_output_dir",
    "marker_kind",
    "step_dirs",
    "latest_checkpoint",
    "LOCK_FILE",
    "RunLock",
    "RunInUse",
    "fsync_dir",
    "fsync_tree",
    "append_line",
    "free_space",
    "write_failure",
    "short",
]

MARKER = ".ebpo-run"
"""File that marks a directory created by an ebpo command (JSON: ``{"created_by": "ebpo train"}``)."""


def load_tensors(path: str | os.PathLike[str], *, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; every failure is a :class:`ValueError` naming ``what`` and ``path``."""
    import torch  # here, not at the top: the config and data modules import this one for its messages

    path = str(path)
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a truncated one loses its directory
        raise ValueError(f"{what} {path} is corrupt or truncated (not a complete torch.save archive)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure of a file we were handed is the file's fault, reported as such
        if "Weights only load failed" in str(exc):
            raise ValueError(
                f"{what} {path} holds pickled Python objects, not just tensors and plain values, so it cannot be "
                "loaded safely (ebpo never unpickles a file): it was written by an older ebpo or by something else; "
                "start a new run instead of resuming this one"
            ) from None
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ValueError(f"{what} {path} is corrupt or truncated ({type(exc).__name__}: {first})") from None


def marker_kind(path: str | os.PathLike[str]) -> str | None:
    """The command that created directory ``path`` (``"ebpo train"``, ...), or None when it has no readable marker."""
    marker = Path(path) / MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        created_by = json.loads(marker.read_text()).get("created_by")
    except (OSError, ValueError, AttributeError):
        return None
    return created_by if isinstance(created_by, str) else None


def _protected(path: Path) -> bool:
    """``/``, the home directory, the working directory, or a directory above one of them."""
    real = path.resolve()
    for keep in (Path("/"), Path.home(), Path.cwd()):
        keep = keep.resolve()
        if real == keep or real in keep.parents:
            return True
    return False


def _nearest_existing(path: Path) -> Path:
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_output_dir(
    path: str | os.PathLike[str], command: str, *, overwrite: bool = False, reuse: bool = False
) -> None:
    """Raise :class:`ValueError` unless ``command`` may write its outputs into ``path``; writes nothing.

    Allowed: a path that does not exist yet and can be created (its nearest existing ancestor is a writable
    directory), or an empty directory. A non-empty directory is allowed only if ``command`` created it (its
    :data:`MARKER` names ``command``) and either ``reuse`` (commands that continue or refresh their own outputs:
    compare, meta, eval, simulate) or ``overwrite`` (``ebpo train --overwrite``, which then calls
    :func:`remove_output_dir`).
    """
    p = Path(path)
    flag = "--out"
    if p.is_symlink():
        raise ValueError(f"{flag} {p} is a symbolic link; give the directory it points to, or another {flag}")
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {p} is a file, not a directory; give a directory path with {flag}")
    if not p.exists():
        base = _nearest_existing(p)
        if not base.is_dir():
            raise ValueError(f"{flag} {p} cannot be created: {base} is a file, not a directory")
        if not os.access(base, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {p} cannot be created: no write permission in {base}; choose another {flag}")
        return
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {p} is not writable; choose another {flag}")
    if not any(p.iterdir()):
        return
    owner = marker_kind(p)
    if owner != command:
        made = f"was created by {owner}" if owner else f"was not created by ebpo (it has no {MARKER} marker)"
        raise ValueError(
            f"{flag} {p} already exists, is not empty and {made}; {command} writes only into a new or empty "
            f"directory or one it created itself, so choose another {flag} (or move the directory away yourself)"
        )
    if not (reuse or overwrite):
        raise ValueError(
            f"run directory {p} already exists; pass --overwrite to replace it, --resume {p} to continue it, or another {flag}"
        )


def check_output_file(path: str | os.PathLike[str], command: str, *, flag: str) -> None:
    """Raise :class:`ValueError` unless ``command`` may write file ``path``: new, or an earlier output of
    ``command`` (in a directory with its marker). Writes nothing."""
    p = Path(path)
    if p.is_symlink() or (p.exists() and not p.is_file()):
        raise ValueError(f"{flag} {p} is a directory or a symbolic link; give a file path")
    if p.exists():
        if marker_kind(p.parent) != command:
            raise ValueError(
                f"{flag} {p} already exists and {command} did not write it; choose another {flag} (or move the file away yourself)"
            )
        return
    base = _nearest_existing(p.parent)
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {p} cannot be created: {base} is not a writable directory")


def make_output_dir(path: str | os.PathLike[str], command: str) -> None:
    """Create directory ``path`` (and parents) with the marker of ``command``; an existing marker is kept."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    marker = p / MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"created_by": command}) + "\n")


def remove_output_dir(path: str | os.PathLike[str], command: str) -> None:
    """Delete directory ``path`` only if ``command`` created it (see :func:`check_output_dir`)."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        raise ValueError(f"refusing to delete {p}: not a directory (a file or a symbolic link)")
    if _protected(p):
        raise ValueError(
            f"refusing to delete {p}: it is /, the home directory, the working directory or above one of them"
        )
    if marker_kind(p) != command:
        raise ValueError(
            f"refusing to delete {p}: it was not created by {command} (no {MARKER} marker); delete it yourself if you mean to"
        )
    shutil.rmtree(p)


_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dirs(root: str) -> list[str]:
    """The complete checkpoints (``step-000050``) in ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if _STEP_DIR.match(d))


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint of ``run_dir`` (temporary directories are ignored)."""
    dirs = step_dirs(os.path.join(run_dir, "checkpoints"))
    return os.path.join(run_dir, "checkpoints", dirs[-1]) if dirs else None


# ---------------------------------------------------------------------------- messages
def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, without ever building the whole repr.

    Error messages show the value a user gave; a value from a YAML alias bomb (a few lines that expand to
    billions of elements) or a 50 MB dataset row must not be printed, or even formatted, in full.
    """
    import reprlib

    shortener = reprlib.Repr()
    shortener.maxlevel, shortener.maxdict, shortener.maxlist, shortener.maxtuple = 2, 4, 4, 4
    shortener.maxset = shortener.maxfrozenset = shortener.maxdeque = shortener.maxarray = 4
    shortener.maxstring, shortener.maxlong, shortener.maxother = limit, 40, limit
    text = shortener.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - the loop returns


def free_space(path: str | os.PathLike[str]) -> str:
    """Free space on the filesystem of ``path`` (or its nearest existing parent), e.g. ``"12.0 MiB"``."""
    try:
        return _human(shutil.disk_usage(_nearest_existing(Path(path))).free)
    except OSError:
        return "unknown"


def write_failure(path: str | os.PathLike[str], exc: BaseException) -> str:
    """``cannot write PATH: REASON (N MiB free on its filesystem)``: one line, whatever raised."""
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    else:  # torch's zip writer reports a full disk as "[enforce fail at inline_container.cc:...] unexpected pos"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    return f"cannot write {path}: {reason} ({free_space(path)} free on its filesystem)"


# ---------------------------------------------------------------------------- durable writes
def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush directory ``path``'s entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a directory; their renames are what they are
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike[str]) -> None:
    """Flush every file under ``path``, then every directory (children first), to disk."""
    for folder, _, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append ``line`` (which ends in a newline) to ``path`` with one ``write``: all of it or nothing.

    A write that fails or writes only part of the line (a full disk) is cut back to the file's previous
    length before the error (an OSError naming ``path``) is raised, so a reader never meets a torn line.
    The line reaches the operating system at once (no Python buffer); it is not fsynced: a resume
    rewrites every row after its checkpoint, and drops a row a power cut tore.
    """
    data = line.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            os.ftruncate(fd, start)  # needs no space: the file only shrinks
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- the run lock
LOCK_FILE = ".ebpo-lock"
"""File in a run directory that :class:`RunLock` locks; it holds the PID and command of the holder."""


class RunInUse(ValueError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """An exclusive ``fcntl.flock`` on ``DIR/.ebpo-lock``, held until :meth:`release` (or the process's end).

    ``flock`` belongs to the open file, so the kernel releases it when the holder exits, is killed (even by
    SIGKILL) or crashes: a lock file left by a dead process is taken over without asking. The file holds
    the holder's PID and command only for the message a refused process prints. The file is removed on
    release; a taker checks, after locking, that the file it locked is still the one at the path, so a
    process that opened the file just before it was removed cannot hold a lock nobody else sees.
    """

    def __init__(self, directory: str | os.PathLike[str], command: str) -> None:
        self.directory, self.command = Path(directory), command
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    @staticmethod
    def holder(directory: str | os.PathLike[str]) -> str | None:
        """The PID line of a live holder of ``directory``'s lock, or None when it is free (writes nothing)."""
        import fcntl

        path = Path(directory) / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _holder_text(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunInUse` naming the holder's PID; returns ``self``."""
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = _holder_text(fd)
                os.close(fd)
                raise RunInUse(
                    f"{self.directory} is in use by {text}; wait for it to finish or stop it "
                    "(SIGTERM saves a checkpoint), then try again"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file between our open and our lock: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": self.command}).encode() + b"\n")
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass  # the directory is gone (--overwrite removed it) or read-only: the lock dies with the fd
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder_text(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        pid, command = int(info["pid"]), str(info.get("command", "ebpo"))[:40]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "another process (its PID is not recorded yet)"
    return f"{command} (PID {pid})"
