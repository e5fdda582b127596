#!/usr/bin/env bash
# The verl adapter against a real verl, in its own virtual environment (verl pins an older transformers
# than the main environment and pulls Ray). Used by .ci/run; run it by hand the same way:
#     bash scripts/test-verl.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VERL_VENV:-.venv-verl}"
if [ ! -x "$VENV/bin/python" ]; then
    python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==2.13.0"
# verl 0.9.1 imports cachetools, fastapi and uvicorn without declaring them; its default (v1) trainer imports
# transfer_queue, which only verl's "verl-core" extra brings (with pyzmq and msgspec): the checkpoint tests
# run that trainer's own _save_checkpoint / _load_checkpoint.
"$VENV/bin/pip" install -q "verl==0.9.1" cachetools fastapi uvicorn pytest "TransferQueue>=0.1.10" pyzmq msgspec
"$VENV/bin/pip" install -q -e . --no-deps
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_integration_verl_runtime.py tests/test_integration_verl.py tests/test_verl_options.py tests/test_verl_checkpoint.py tests/test_verl_new_estimators.py -o addopts=""
"$VENV/bin/python" examples/from_verl.py  # the README's verl example, in verl's own environment
