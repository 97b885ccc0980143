#!/usr/bin/env bash
# The main job: installs what is needed (scripts/setup.sh), then runs the end-to-end demo on the
# embedded defaults (local memdb-server, LMDB in ./memdb-data, SmolLM2-135M-Instruct on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
python -m memdb_worker.demo "$@"
