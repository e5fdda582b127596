"""Check that the built API reference documents every public module and every public name.

    python scripts/check-api-docs.py [SITE_DIR]        # default build/site; run after `mkdocs build`

Public: every module of ebpo without a private part in its path, each name in its ``__all__``, and the
names tests/test_public_imports.py says users and the docs rely on. A name counts as documented when its
definition (an alias is followed to where it is defined) is in the site's inventory (objects.inv, written by
mkdocstrings). A new module or a new name in an ``__all__`` that no page of docs/api/ renders fails here, with
the page to add it to left to the author. Reads the sources statically (griffe): nothing of ebpo is imported.
"""

from __future__ import annotations

import ast
import sys
import zlib
from pathlib import Path

import griffe

ROOT = Path(__file__).resolve().parent.parent


def inventory(site: Path) -> set[str]:
    """The Python object paths in ``site``/objects.inv (Sphinx inventory, version 2)."""
    raw = (site / "objects.inv").read_bytes()
    header_end = 0
    for _ in range(4):  # "# Sphinx inventory version 2", project, version, "# The remainder ... zlib"
        header_end = raw.index(b"\n", header_end) + 1
    names = set()
    for line in zlib.decompress(raw[header_end:]).decode().splitlines():
        name, domain_role = line.split(" ", 2)[:2]
        if domain_role.startswith("py:"):
            names.add(name)
    return names


def tested_names() -> list[tuple[str, list[str]]]:
    """The (module, names) pairs of test_public_imports.py's test_module_exports."""
    tree = ast.parse((ROOT / "tests" / "test_public_imports.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "parametrize":
            if ast.literal_eval(node.args[0]) == ("module", "names"):
                return ast.literal_eval(node.args[1])
    raise SystemExit("tests/test_public_imports.py: no parametrize('module', 'names') list found")


def public_modules(module: griffe.Module) -> list[griffe.Module]:
    found = [module]
    for member in module.members.values():
        if not member.is_alias and member.is_module and not member.name.startswith("_"):
            found += public_modules(member)  # an imported module is an alias: documented where it is defined
    return found


def definition(module: griffe.Module, name: str) -> str | None:
    """Where ``module.name`` is defined (an alias followed), or None if ``module`` has no such member."""
    if name not in module.members:
        return None
    member = module.members[name]
    try:
        return member.final_target.path if member.is_alias else member.path
    except griffe.AliasResolutionError:
        return member.target_path  # a re-export of another library's object


def main(argv: list[str]) -> int:
    site = Path(argv[1]) if len(argv) > 1 else ROOT / "build" / "site"
    documented = inventory(site)
    package = griffe.load("ebpo", search_paths=[str(ROOT / "src")], resolve_aliases=True)
    expected: dict[str, str] = {}  # what must be documented -> the public name that asks for it
    for module in public_modules(package):
        expected[module.path] = module.path
        for name in getattr(module, "exports", None) or ():
            expected[definition(module, str(name)) or f"{module.path}.{name}"] = f"{module.path}.{name}"
    for module_path, names in tested_names():
        module = package.get_member(module_path[len("ebpo.") :]) if module_path != "ebpo" else package
        for name in names:
            expected[definition(module, name) or f"{module_path}.{name}"] = f"{module_path}.{name}"
    missing = sorted(
        (public, target)
        for target, public in expected.items()
        if target not in documented and target.split(".")[0] == "ebpo"
    )
    for public, target in missing:
        shown = public if public == target else f"{public} (defined as {target})"
        print(f"not in the API reference: {shown}: render it on a page of docs/api/", file=sys.stderr)
    if missing:
        return 1
    print(f"API reference: all {len(expected)} public modules and names are documented")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
