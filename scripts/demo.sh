#!/usr/bin/env bash
# Install hvkit into .venv and boot the example microVM (the README's first command).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q .
.venv/bin/hvkit info
echo "hvkit: booting the example microVM (examples/hello_microvm.py)" >&2
.venv/bin/python examples/hello_microvm.py
