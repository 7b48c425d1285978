# Sourced by the set-up scripts: creates .venv (Python >= 3.12) with the project and its test extras
# installed, once, and puts it first on PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

find_python() {
  for candidate in python3.12 python3.13 python3 "$HOME/.pyenv/versions/3.12.1/bin/python3"; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "pallas_flash needs Python >= 3.12 (jax 0.11.2); none was found on PATH" >&2
  return 1
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import pallas_flash, pytest, matplotlib' 2>/dev/null; then
  PY=$(find_python)
  echo "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  EXTRAS="test,bench"
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then EXTRAS="$EXTRAS,cuda"; fi
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
fi
export PATH="$PWD/.venv/bin:$PATH"
