"""Griffe extension for the API reference: the docstrings' Sphinx roles become checked cross-references.

The docstrings are Google style with Sphinx roles (:func:`build_estimator`, :class:`~ebpo.tasks.base.Task`),
which Markdown would print as they are. At load time each role becomes an mkdocs-autorefs link to the object
it names, resolved the way Python would resolve the name from where the docstring sits (its class, its
module, that module's imports):

- a public ebpo object: a link, required, so a role naming something that was renamed or removed fails
  `mkdocs build --strict` ("Could not find cross-reference target");
- a name that does not resolve and is not a builtin: the same required link, so it fails the build too;
- a builtin (:class:`ValueError`), an object of another library, or a private ebpo object (not rendered):
  inline code.

It also turns reST's literal-block marker (a line ending in ``::``) into a plain colon, since Markdown
already renders the indented block after it as code, reST's external links into Markdown links,
doctests into code blocks, and an Args entry for several names (``seed, eval_seed: ...``) into one per name.
Loaded by mkdocs.yml (plugins > mkdocstrings > handlers > python > options > extensions).
"""

from __future__ import annotations

import builtins
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|data|mod|meth|attr|obj|exc|const):`(~?)([^`<>]+?)(?:\s*<([^`>]+)>)?`")
LITERAL_MARKER = re.compile(r"(?m)(\S)::[ \t]*$")
LONE_MARKER = re.compile(r"(?m)^[ \t]*::[ \t]*\n")
REST_LINK = re.compile(r"`([^`<>]+?)\s*<(https?://[^>]+)>`_")
PACKAGE = "ebpo"


def _lookup(package: griffe.Module, path: str) -> griffe.Object | griffe.Alias | None:
    """The object at the dotted ``path`` (``ebpo.x.y``) in the loaded package, or None."""
    if path == PACKAGE:
        return package
    if not path.startswith(PACKAGE + "."):
        return None
    try:
        return package[path[len(PACKAGE) + 1 :]]
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def resolve(obj: griffe.Object, package: griffe.Module, name: str) -> str | None:
    """The full path that ``name`` means in the docstring of ``obj``, or None when it names nothing."""
    if name.startswith(PACKAGE + "."):
        return name if _lookup(package, name) is not None else None
    first, _, rest = name.partition(".")
    try:
        full = obj.resolve(first)  # its members, then its parents' (class, module), imports included
    except griffe.NameResolutionError:
        return None
    return f"{full}.{rest}" if rest else full


def is_rendered(package: griffe.Module, path: str) -> bool:
    """Whether the API reference renders ``path``: a public object of ebpo, no private part in its path."""
    if any(part.startswith("_") and part != "__init__" for part in path.split(".")):
        return False
    target = _lookup(package, path)
    if target is None:
        return False
    try:
        return bool(target.is_public)
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False


def convert(text: str, obj: griffe.Object, package: griffe.Module) -> str:
    """``text`` with every Sphinx role replaced by a Markdown cross-reference or inline code."""

    def replace(match: re.Match[str]) -> str:
        tilde, written, explicit_target = match.group(1), match.group(2).strip(), match.group(3)
        target_name = (explicit_target or written).strip()
        if explicit_target:
            shown = written
        else:
            shown = target_name.rsplit(".", 1)[-1] if tilde else target_name
        full = resolve(obj, package, target_name)
        if full is None:
            first = target_name.split(".")[0]
            if first in vars(builtins) or ("." in target_name and first != PACKAGE):
                return f"`{shown}`"  # a builtin, or another library's object (transformers.LlamaForCausalLM)
            return f"[`{shown}`][{target_name}]"  # required: fails the strict build, naming the role
        if full.split(".")[0] != PACKAGE or not is_rendered(package, full):
            return f"`{shown}`"
        return f"[`{shown}`][{full}]"

    text = ROLE.sub(replace, text)
    text = REST_LINK.sub(r"[\1](\2)", text)
    text = LONE_MARKER.sub("\n", text)
    return split_grouped_params(fence_doctests(LITERAL_MARKER.sub(r"\1:", text)))


SECTION = re.compile(r"^(\s*)(?:Args|Arguments|Parameters|Keyword Args|Keyword Arguments|Other Parameters):\s*$")
GROUPED = re.compile(r"^(\s+)(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+):(\s.*)?$")


def split_grouped_params(text: str) -> str:
    """``a, b: text`` in an Args section (this project's habit) becomes one entry per name, each with the text.

    Google style has one name per entry; griffe would warn that parameter "a, b" is not in the signature.
    """
    lines = text.split("\n")
    out: list[str] = []
    section_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        header = SECTION.match(line)
        if header:
            section_indent = len(header.group(1))
        elif line.strip() and section_indent is not None and len(line) - len(line.lstrip()) <= section_indent:
            section_indent = None  # dedented: the section ended
        grouped = GROUPED.match(line) if section_indent is not None else None
        if grouped is None:
            out.append(line)
            i += 1
            continue
        indent, names, rest = grouped.group(1), grouped.group(2), grouped.group(3) or ""
        block = [line]  # the entry and its continuation lines (indented deeper)
        i += 1
        while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > len(indent):
            block.append(lines[i])
            i += 1
        for name in (n.strip() for n in names.split(",")):
            out += [f"{indent}{name}:{rest}", *block[1:]]
    return "\n".join(out)


def fence_doctests(text: str) -> str:
    """Wrap each doctest (a ``>>>`` line and the lines up to the next blank one) in a ``pycon`` code block.

    Markdown would read ``>>>`` as nested quotes and ``[a]`` on one line followed by ``[b]`` on the next as a
    reference link.
    """
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(">>>") and not (out and out[-1].lstrip().startswith("```")):
            indent = line[: len(line) - len(line.lstrip())]
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            if out and out[-1].strip():
                out.append("")
            out += [f"{indent}```pycon", *block, f"{indent}```"]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _walk(obj: griffe.Object) -> Any:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


class SphinxRoles(griffe.Extension):
    """Rewrite the Sphinx roles of every docstring in the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != PACKAGE:
            return
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = convert(obj.docstring.value, obj, pkg)
