#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine, then runs:
#   bash run.sh demo [lmclab demo flags]   the main job: a quick, real experiment with figures
#   bash run.sh test [pytest flags]        the test suite
#   bash run.sh check                      lint, format check and type check (ruff, mypy)
#   bash run.sh lmclab ARGS…               any lmclab command inside the project's environment
# Environment: LMCLAB_PYTHON (default python3), LMCLAB_TORCH (default torch==2.13.0, the CPU build
# on the project's machines; e.g. "torch" for your platform's default build), LMCLAB_DATA_DIR.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
stamp="$VENV/.lmclab-installed"
want="$(cat pyproject.toml run.sh | sha256sum | cut -d' ' -f1) ${LMCLAB_TORCH:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up $VENV (torch + lmclab with test, lint, ray and transformers extras)…" >&2
  "${LMCLAB_PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "${LMCLAB_TORCH:-torch==2.13.0}"
  "$VENV/bin/python" -m pip install --quiet -e ".[test,lint,ray,transformers]"
  echo "$want" > "$stamp"
fi

# Offline copies beside the checkout (this project's machines) are searched after LMCLAB_DATA_DIR.
if [ -d ../shared/data ]; then
  export LMCLAB_DATA_DIR="${LMCLAB_DATA_DIR:+$LMCLAB_DATA_DIR:}$(cd ../shared/data && pwd)"
fi

cmd="${1:-demo}"
shift || true
case "$cmd" in
  demo) exec "$VENV/bin/lmclab" demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
  check)
    "$VENV/bin/ruff" check src tests bench
    "$VENV/bin/ruff" format --check src tests bench
    exec "$VENV/bin/mypy" ;;
  lmclab) exec "$VENV/bin/lmclab" "$@" ;;
  *) echo "usage: bash run.sh demo|test|check|lmclab [args…]" >&2; exit 2 ;;
esac
