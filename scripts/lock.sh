#!/usr/bin/env bash
# Regenerate requirements/lock.txt: the exact versions the README's figures, the docs and CI use.
#
#     bash scripts/lock.sh                      # refresh everything but the packages the figures depend on
#     bash scripts/lock.sh --upgrade-numerics   # refresh those too (then re-measure what it lists)
#
# The lock is for reproduction (Linux x86-64, Python 3.11, CPU torch); the package's own ranges in
# pyproject.toml stay open for users who install ebpo into their environment. It is used as a pip
# constraints file: `pip install -c requirements/lock.txt -e ".[test]"` installs only what the extras
# ask for, each at its locked version.
#
# NUMERICS are the packages whose version changes the numbers a run produces (kernels, initialisation,
# sampling): the warm start's cache key and every run's summary.json record torch and transformers for
# this reason. By default their pins are carried over from the current lock, so a refresh cannot move a
# figure; with --upgrade-numerics they resolve to the newest the ranges allow (torch stays the CPU
# build pinned in the README) and the script lists the figures that must then be measured again.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements/lock.txt
NUMERICS="torch transformers numpy accelerate"
EXTRAS="test,data,math,trl,gym,lora,track,docs"
upgrade=0
[ "${1:-}" = "--upgrade-numerics" ] && upgrade=1

pin_of() { # the locked version of package $1, or nothing
    [ -f "$LOCK" ] && grep -i -E "^$1==" "$LOCK" | head -n 1 | cut -d= -f3 || true
}

pins=("torch==$(pin_of torch || true)")
[ "${pins[0]}" = "torch==" ] && pins=("torch==2.13.0")
if [ "$upgrade" = 0 ]; then
    for name in $NUMERICS; do
        [ "$name" = torch ] && continue
        version=$(pin_of "$name")
        [ -n "$version" ] && pins+=("$name==$version")
    done
fi

venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "${pins[@]}" -e ".[$EXTRAS]"

new=$(mktemp)
{
    echo "# The exact environment of the README's figures, the docs and CI: Linux x86-64, Python 3.11, CPU torch."
    echo "# Use as constraints: pip install -c requirements/lock.txt -e \".[test]\"  (any extras you need)."
    echo "# Regenerate with: bash scripts/lock.sh   (see that script for which pins it keeps)."
    "$venv/bin/pip" freeze --exclude-editable | sed -E 's/\+cpu$//' | LC_ALL=C sort -f
} >"$new"

if [ -f "$LOCK" ]; then
    echo "Changes against the current lock (- old, + new):"
    changes=$(diff <(grep -v '^#' "$LOCK") <(grep -v '^#' "$new") | grep '^[<>]' | sed 's/^</  -/; s/^>/  +/' || true)
    echo "${changes:-  none}"
    moved=""
    for name in $NUMERICS; do
        [ "$(pin_of "$name")" = "$(grep -i -E "^$name==" "$new" | cut -d= -f3)" ] || moved="$moved $name"
    done
    if [ -n "$moved" ]; then
        echo
        echo "Packages the figures depend on moved:$moved. Re-measure, with the commands the docs give:"
        echo "  - README 'Quick start': ebpo train for seeds 0, 1, 2 (and the wall time of the plain command)"
        echo "  - README 'Results' and docs/compare-stepwise.md: the ebpo compare grid and its probes"
        echo "  - docs/testbed.md, docs/hierarchical-prior.md, docs/gbmpo.md, docs/trainer.md (throughput)"
        echo "  - the shipped warm starts (src/ebpo/train/warmstart_data): python -m ebpo.train.warmstart --ship"
    fi
fi
mkdir -p "$(dirname "$LOCK")"
mv "$new" "$LOCK"
chmod 644 "$LOCK"  # mktemp made it private
echo "wrote $LOCK ($(grep -vc '^#' "$LOCK") packages)"
