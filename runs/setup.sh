#!/usr/bin/env bash
# Create (or reuse) the project venv in .venv and install picochat into it. Sourced by the other
# scripts in runs/; safe to run again: it only installs what is missing.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PICOCHAT_VENV:-$REPO/.venv}"
EXTRAS="${1:-}"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "picochat needs Python >= 3.10 (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.x" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating venv at $VENV"
  "$PY" -m venv "$VENV"
fi
# Install torch first and on its own, so nothing else can pull in a different (CUDA) build.
if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  echo "==> installing torch==2.13.0"
  "$VENV/bin/pip" install --quiet "torch==2.13.0"
fi
stamp="$VENV/.picochat-installed${EXTRAS:+-$EXTRAS}"
fresh() { [ -f "$1" ] && [ ! "$REPO/pyproject.toml" -nt "$1" ]; }
# An install with the dev extras also satisfies a plain one.
if ! fresh "$stamp" && ! { [ -z "$EXTRAS" ] && fresh "$VENV/.picochat-installed-dev"; }; then
  echo "==> installing picochat${EXTRAS:+[$EXTRAS]}"
  "$VENV/bin/pip" install --quiet -e "$REPO${EXTRAS:+[$EXTRAS]}"
  touch "$stamp"
fi
"$VENV/bin/python" -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__'
