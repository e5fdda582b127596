#!/usr/bin/env bash
# Upstream breakage, found before users find it: install ebpo with the newest versions its ranges allow (no
# lock), print which versions that resolved to where they differ from requirements/lock.txt, and run a smoke
# subset there: the core estimators, the float32 equivalence tests of the update (shared prompt, trainer
# correctness) and one short `ebpo train`. A failure names the packages that moved. Used by .ci/run; by hand:
#     bash scripts/test-newest.sh
# torch stays at the README's CPU pin: the newest torch from the registry is a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${NEWEST_VENV:-.venv-newest}"
if [ "${NEWEST_REUSE:-0}" != 1 ] || [ ! -x "$VENV/bin/python" ]; then  # NEWEST_REUSE=1: rerun in the last venv
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "torch==2.13.0" -e ".[test]"
fi

moved=$({ diff <(grep -v '^#' requirements/lock.txt | LC_ALL=C sort -f) \
    <("$VENV/bin/pip" freeze --exclude-editable | sed -E 's/\+cpu$//' | LC_ALL=C sort -f) || true; } |
    awk -F'==' '/^</ {old[tolower(substr($1, 3))] = $2} /^>/ {new[tolower(substr($1, 3))] = $2}
        END {for (p in new) printf "  %s %s (lock: %s)\n", p, new[p], (p in old ? old[p] : "not in the lock")}' |
    LC_ALL=C sort)
echo "newest versions that differ from the lock:"
echo "${moved:-  none}"

report_failure() {
    echo
    echo "NEWEST-VERSIONS SMOKE FAILED: $1. The packages above moved since the lock; the likely culprits are"
    echo "the ones ebpo calls into (torch, transformers, accelerate, trl, peft):"
    echo "$moved" | grep -E '^  (torch|transformers|accelerate|trl|peft|tokenizers|safetensors|numpy) ' || echo "  (none of those)"
    exit 1
}

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -o addopts="-m 'not slow and not gpu'" \
    tests/test_estimators.py tests/test_shared_prompt.py tests/test_train_correctness.py ||
    report_failure "the smoke tests"
EBPO_CACHE_DIR="$out/cache" "$VENV/bin/ebpo" train --steps 2 --warmstart-steps 100 --prompts-per-step 16 \
    --max-eval-problems 32 --eval-samples 1 --no-progress --threads 2 --out "$out/run" ||
    report_failure "ebpo train"
echo "newest-versions smoke passed"
