#!/usr/bin/env bash
# Install hvkit (editable, with test extras) into .venv and run the whole
# test suite (the README's second command; CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh --test
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
