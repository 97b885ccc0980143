"""Real memdb-worker child processes, for tests, benchmarks and the demo.

`start_worker(server_address, api_key, workdir)` starts `memdb-worker serve` as a child process
on 127.0.0.1 with an ephemeral port, waits until it serves HTTP (its ready file) and returns a
`WorkerProcess` (its base URL, `stop()` with SIGTERM, `kill()`). Knows nothing of what callers
check.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class WorkerProcess:
    address: str  # host:port
    proc: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def launch_worker(
    server_address: str, api_key: str, workdir: Path, *, name: str = "worker", **flags
) -> tuple[subprocess.Popen, Path, Path]:
    """Start the process without waiting (see `wait_worker`); returns (proc, ready, log)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / f"{name}-ready-{time.monotonic_ns()}.json"
    log_path = workdir / f"{name}.log"
    args = [sys.executable, "-m", "memdb_worker.cli", "serve", "--server", server_address,
            "--listen", "127.0.0.1:0", "--ready-file", str(ready)]  # fmt: skip
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            args += [flag, str(value)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMDB_")}
    env["MEMDB_API_KEY"] = api_key  # not on the command line (ps shows it)
    log_file = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    log_file.close()
    return proc, ready, log_path


def wait_worker(
    proc: subprocess.Popen, ready: Path, log_path: Path, timeout: float = 180.0
) -> WorkerProcess:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(
                f"memdb-worker exited with {proc.returncode}:\n{log_path.read_text()}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"memdb-worker not ready after {timeout}s:\n{log_path.read_text()}")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    return WorkerProcess(info["address"], proc, log_path)


def start_worker(
    server_address: str, api_key: str, workdir: Path, *, timeout: float = 180.0, **flags
) -> WorkerProcess:
    proc, ready, log_path = launch_worker(server_address, api_key, workdir, **flags)
    return wait_worker(proc, ready, log_path, timeout)
