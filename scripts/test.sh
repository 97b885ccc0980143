#!/usr/bin/env bash
# Installs what is needed (scripts/setup.sh), lints, and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
ruff check .
ruff format --check .
python -m pytest -q -p no:cacheprovider "$@"
