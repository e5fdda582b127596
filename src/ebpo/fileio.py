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
which ``ebpo train --resume`` and ``ebpo eval --model RUN_DIR`` both read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

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
]

MARKER = ".ebpo-run"
"""File that marks a directory created by an ebpo command (JSON: ``{"created_by": "ebpo train"}``)."""


def load_tensors(path: str | os.PathLike[str], *, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; every failure is a :class:`ValueError` naming ``what`` and ``path``."""
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
