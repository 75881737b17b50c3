#!/usr/bin/env bash
# The PyHealth tests, in their own Python 3.12 environment (pyhealth 2.1.0 needs Python >= 3.12;
# the main suite runs on 3.11): finds a Python 3.12 on this machine, makes .venv-pyhealth
# (git-ignored) from the lock tests/pyhealth/constraints.txt, installs the package, runs
# tests/pyhealth and the adapter's doctests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.venv-pyhealth

find_python312() {
  local candidate version
  candidate=$(command -v python3.12 || true)
  if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    echo "$candidate"
    return
  fi
  if command -v pyenv >/dev/null; then  # a pyenv shim runs only the versions pyenv has selected
    version=$(pyenv versions --bare | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -n 1 || true)
    if [ -n "$version" ]; then
      PYENV_VERSION=$version pyenv which python3.12
      return
    fi
  fi
  echo "No Python 3.12 found: put python3.12 on PATH (or: pyenv install 3.12)." >&2
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  python=$(find_python312)
  echo "Python 3.12: $python"
  "$python" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q -c tests/pyhealth/constraints.txt -r tests/pyhealth/requirements.txt -e .
"$VENV/bin/python" -m pytest tests/pyhealth captum_chefer/pyhealth.py "$@"
