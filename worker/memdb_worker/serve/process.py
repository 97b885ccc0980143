"""Real memdb-worker child processes, for tests, benchmarks and the demo.

`start_worker(server_address, api_key, workdir)` starts `memdb-worker serve` as a child process
on 127.0.0.1 with an ephemeral port, waits until it serves HTTP (its ready file) and returns a
`WorkerProcess` (its base URL, `stop()` with SIGTERM, `kill()`). Knows nothing of what callers
check.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from memdb_server.process import ChildProcess, flag_args, spawn, wait_ready


@dataclass
class WorkerProcess(ChildProcess):
    address: str = ""  # host:port

    @property
    def url(self) -> str:
        return f"http://{self.address}"


def launch_worker(
    server_address: str,
    api_key: str,
    workdir: Path,
    *,
    name: str = "worker",
    env: dict[str, str] | None = None,
    **flags,
) -> tuple[subprocess.Popen, Path, Path]:
    """Start the process without waiting (see `wait_worker`); returns (proc, ready, log).
    `env`: more environment of the child (e.g. MEMDB_FAILPOINTS)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / f"{name}-ready-{time.monotonic_ns()}.json"
    log_path = workdir / f"{name}.log"
    args = [sys.executable, "-m", "memdb_worker.serve.cli", "serve", "--server", server_address,
            "--listen", "127.0.0.1:0", "--ready-file", str(ready)]  # fmt: skip
    # the key travels in the environment, not on the command line (ps shows that)
    proc = spawn(args + flag_args(flags), log_path, env={**(env or {}), "MEMDB_API_KEY": api_key})
    return proc, ready, log_path


def wait_worker(
    proc: subprocess.Popen, ready: Path, log_path: Path, timeout: float = 180.0
) -> WorkerProcess:
    info = wait_ready(proc, ready, log_path, "memdb-worker", timeout)
    return WorkerProcess(proc, log_path, info["address"])


def start_worker(
    server_address: str, api_key: str, workdir: Path, *, timeout: float = 180.0, **flags
) -> WorkerProcess:
    proc, ready, log_path = launch_worker(server_address, api_key, workdir, **flags)
    return wait_worker(proc, ready, log_path, timeout)
