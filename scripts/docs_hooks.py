"""MkDocs hooks for the documentation site (mkdocs.yml > hooks).

- The README is the site's home page (``index.md``) unless docs/index.md exists, so the first screen is
  written once.
- The docs are written to be read on the repository too: they link to files outside docs/ (the README links
  ``docs/trainer.md``, docs/trainer.md links ``../README.md``, pages link ``../src/ebpo/...``). Each link is
  resolved against the file's place in the repository: a documentation page becomes a link to its page on
  the site; another file of the repository becomes a link to it on ``repo_url`` when mkdocs.yml sets one,
  else its text with the path in code. A link to a file that exists nowhere is left as written, so that
  ``mkdocs build --strict`` fails on it ("... contains a link ..., but the target is not found").

Code blocks and inline code are left alone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

LINK = re.compile(r"(!?)\[([^\]\n]*)\]\(([^()\s]+)(\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:.+?)\1")


def _root(config: Any) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_files(files: Files, config: Any) -> Files:
    if files.get_file_from_path("index.md") is None:
        readme = _root(config) / "README.md"
        files.append(File.generated(config, "index.md", abs_src_path=str(readme)))
    return files


def _rewrite(target: str, text: str, image: str, page_src: Path, virtual_dir: Path, config: Any) -> str | None:
    """The replacement for one link, or None to leave it as written."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith(("#", "/")):
        return None  # a URL, an anchor on this page, or an absolute path (mkdocs judges those)
    path, hash_, anchor = target.partition("#")
    resolved = (page_src.parent / path).resolve()
    docs_dir = Path(config.docs_dir).resolve()
    root = _root(config)
    if resolved == (root / "README.md") and not (docs_dir / "index.md").exists():
        resolved = docs_dir / "index.md"
    if resolved.is_relative_to(docs_dir) or not resolved.exists() or not resolved.is_relative_to(root):
        # A page of the site (relative to where the page is served from), or a file that exists nowhere:
        # mkdocs checks both, and fails a strict build on the second.
        if not resolved.is_relative_to(docs_dir):
            return None
        new = os.path.relpath(resolved, virtual_dir) + (hash_ + anchor)
        return None if new == target else f"{image}[{text}]({new})"
    relative = resolved.relative_to(root).as_posix()
    repo_url = (config.repo_url or "").rstrip("/")
    if repo_url:
        kind = "tree" if resolved.is_dir() else "blob"
        return f"{image}[{text}]({repo_url}/{kind}/{config.extra.get('repo_branch', 'main')}/{relative}{hash_}{anchor})"
    plain = text.strip("`")
    return text if plain.rstrip("/") == relative.rstrip("/") or image else f"{text} (`{relative}`)"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    page_src = Path(page.file.abs_src_path).resolve()
    virtual_dir = (Path(config.docs_dir) / page.file.src_uri).resolve().parent

    def replace(match: re.Match[str]) -> str:
        image, text, target, title = match.group(1), match.group(2), match.group(3), match.group(4) or ""
        new = _rewrite(target, text, image, page_src, virtual_dir, config)
        if new is None:
            return match.group(0)
        return new[:-1] + title + ")" if title and new.endswith(")") else new

    out, fence = [], None
    for line in markdown.split("\n"):
        opened = FENCE.match(line)
        if fence is not None:
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence):
                fence = None
            out.append(line)
            continue
        if opened:
            fence = opened.group(1)
            out.append(line)
            continue
        spans = [m.span() for m in CODE_SPAN.finditer(line)]
        pieces, last = [], 0
        for link in LINK.finditer(line):
            if any(start <= link.start() < end for start, end in spans):
                continue  # inside inline code (a link's text may hold code: [`x.py`](x.py))
            pieces += [line[last : link.start()], replace(link)]
            last = link.end()
        out.append("".join(pieces) + line[last:])
    return "\n".join(out)
