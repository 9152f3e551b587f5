#!/usr/bin/env bash
# Install hvkit (editable, with test extras) into .venv and run the whole
# test suite (the README's second command; CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh --test
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
# The hvkit microVM guest kernel (cached by a hash of its inputs: a rebuild
# happens only when they change).
echo "hvkit: building the guest kernel (cached)" >&2
HVKIT_LINUX_DIR="$(bash guests/linux/build.sh --print-dir | tail -n 1)"
export HVKIT_LINUX_DIR
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
