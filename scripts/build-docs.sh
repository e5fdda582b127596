#!/usr/bin/env bash
# Build the documentation site (user docs and the API reference from the docstrings) as CI does, in strict mode:
#     bash scripts/build-docs.sh          # writes build/site; open build/site/index.html
# Its own environment (.venv-docs, or $DOCS_VENV), installed from the lock with the `docs` extra. Fails on:
#   - any MkDocs warning (--strict): a link to a page or file that does not exist, a link to a heading that is
#     not there, a page in the navigation that is missing;
#   - a cross-reference to a Python name that does not exist ([`x`][ebpo.nonexistent] in a page or a
#     docstring, or a Sphinx role :func:`x` naming nothing: scripts/docs_griffe_roles.py turns those into
#     cross-references), and a docstring griffe cannot parse (an Args entry for a parameter the function lacks);
#   - a public module or name that no page of docs/api/ renders (scripts/check-api-docs.py).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DOCS_VENV:-.venv-docs}"
if [ ! -x "$VENV/bin/python" ]; then
    python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -c requirements/lock.txt -e ".[docs]"
# NO_MKDOCS_2_WARNING: Material's notice about its successor, printed on every build (not a build warning).
NO_MKDOCS_2_WARNING=1 "$VENV/bin/mkdocs" build --strict --clean --site-dir build/site
"$VENV/bin/python" scripts/check-api-docs.py build/site
