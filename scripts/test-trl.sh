#!/usr/bin/env bash
# The TRL adapter's tests against another TRL than the main environment's, in its own virtual environment.
# The main environment (and CI's) resolves the newest TRL the pin admits; this script tests the lowest,
# with the lowest transformers that TRL accepts, so both ends of the range are run:
#     bash scripts/test-trl.sh                                         # trl 1.0.0, transformers 4.56.2
#     TRL_VERSION=1.9.0 TRANSFORMERS_VERSION=4.57.6 bash scripts/test-trl.sh
# Extra arguments go to pytest (e.g. `-m slow` for the whole equivalence grid).
set -euo pipefail
cd "$(dirname "$0")/.."
TRL_VERSION="${TRL_VERSION:-1.0.0}"
# trl 1.0.0 requires transformers>=4.56.2; ebpo admits >=4.50.
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-4.56.2}"
VENV="${TRL_VENV:-.venv-trl-$TRL_VERSION}"
if [ ! -x "$VENV/bin/python" ]; then
    python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==2.13.0"
# requests: TRL 1.10 imports it without declaring it (transformers 4.x brought it along, 5.x does not).
"$VENV/bin/pip" install -q -e ".[trl]" "trl==$TRL_VERSION" "transformers==$TRANSFORMERS_VERSION" requests pytest
"$VENV/bin/python" - <<EOF
import transformers, trl
assert trl.__version__ == "$TRL_VERSION" and transformers.__version__ == "$TRANSFORMERS_VERSION", (trl.__version__, transformers.__version__)
print(f"trl {trl.__version__}, transformers {transformers.__version__}")
EOF
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_integration_trl.py tests/test_trl_*.py "$@"
