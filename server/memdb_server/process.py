"""Real memdb-server child processes, for tests, benchmarks and the demo.

`server_process(data_dir)` starts `memdb-server` as a child process on 127.0.0.1 with an
ephemeral port, waits until it serves (its ready file), and stops it with SIGTERM on exit
(SIGKILL with `kill()` to simulate a crash). Knows nothing of what the tests check.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ADMIN_KEY = "test-root-key"


@dataclass
class ChildProcess:
    """A started child (server or worker): its Popen and its log file."""

    proc: subprocess.Popen
    log_path: Path

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait: a graceful shutdown; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, no cleanup."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class ServerProcess(ChildProcess):
    address: str = ""
    metrics_address: str | None = None
    admin_key: str = ""
    data_dir: Path = Path()


def flag_args(flags: dict) -> list[str]:
    """`--some-flag value` for every item; booleans as `--flag` / `--no-flag`."""
    args: list[str] = []
    for name, value in flags.items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += [f"--{flag}", str(value)]
    return args


def spawn(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `args` with stdout and stderr appended to log_path and no MEMDB_* variables
    inherited (callers pass what they mean in `env`)."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MEMDB_")}
    child_env.update(env or {})
    with open(log_path, "ab") as log_file:  # the child keeps its own handle
        return subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=child_env)


def wait_ready(
    proc: subprocess.Popen, ready: Path, log_path: Path, what: str, timeout: float
) -> dict:
    """Wait for the child's ready file (JSON) and return it; raise with the log if it dies."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"{what} not ready after {timeout}s:\n{log_path.read_text()}")
        time.sleep(0.05)
    return json.loads(ready.read_text())


def start_server(
    data_dir: Path,
    *,
    admin_key: str | None = DEFAULT_ADMIN_KEY,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    **flags,
) -> ServerProcess:
    """Start a server; admin_key=None lets it use (or generate) <data_dir>/admin.key.
    `env`: extra environment of the child (e.g. MEMDB_FAILPOINTS)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    ready = data_dir / f"ready-{time.monotonic_ns()}.json"
    log_path = data_dir / "server.log"
    args = [sys.executable, "-m", "memdb_server", "--data-dir", str(data_dir),
            "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
            "--ready-file", str(ready)]  # fmt: skip
    if admin_key is not None:
        args += ["--admin-key", admin_key]
    proc = spawn(args + flag_args(flags), log_path, env)
    info = wait_ready(proc, ready, log_path, "memdb-server", timeout)
    if admin_key is None:
        admin_key = (data_dir / "admin.key").read_text().strip()
    return ServerProcess(proc, log_path, info["address"], info["metrics"], admin_key, data_dir)


@contextmanager
def server_process(data_dir: Path, **kwargs) -> Iterator[ServerProcess]:
    server = start_server(data_dir, **kwargs)
    try:
        yield server
    finally:
        server.stop()
