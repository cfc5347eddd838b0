#!/usr/bin/env bash
# Runs a tests/gateway_*_test.py script with the official `openai` package
# from PyPI, installed once into a virtual environment under the build tree.
# Usage: gateway_openai_test.sh VENV_DIR SCRIPT.py GATEWAY WORKER CLI MODEL
set -euo pipefail
venv="$1"
script="$2"
shift 2
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "openai==3.63.0"
fi
exec "$venv/bin/python" "$(dirname "$0")/$script" "$@"
