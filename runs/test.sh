#!/usr/bin/env bash
# Set up the venv (if needed) and run the test suite. This is the README's test command and
# exactly what CI runs. Extra arguments go to pytest (e.g. `-m slow`, `-k tokenizer`).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash runs/setup.sh dev
VENV="${PICOCHAT_VENV:-$REPO/.venv}"
# The web UI test drives Debian's Chromium; install it when we can (root with apt), else it is skipped.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "==> installing chromium (for the web UI test)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the web UI test will be skipped" >&2
fi
# Tests write artifacts to a throwaway PICOCHAT_HOME, never the user's real one.
export PICOCHAT_HOME="${PICOCHAT_TEST_HOME:-$(mktemp -d)}"
set +e
"$VENV/bin/python" -m pytest -m "not slow" --durations=25 "$@"  # the slowest tests, to keep the suite short
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
