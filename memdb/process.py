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
class ServerProcess:
    address: str
    metrics_address: str | None
    admin_key: str
    data_dir: Path
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


def start_server(
    data_dir: Path, *, admin_key: str | None = DEFAULT_ADMIN_KEY, timeout: float = 60.0, **flags
) -> ServerProcess:
    """Start a server; admin_key=None lets it use (or generate) <data_dir>/admin.key."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    ready = data_dir / f"ready-{time.monotonic_ns()}.json"
    log_path = data_dir / "server.log"
    args = [sys.executable, "-m", "memdb", "--data-dir", str(data_dir),
            "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
            "--ready-file", str(ready)]  # fmt: skip
    if admin_key is not None:
        args += ["--admin-key", admin_key]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            args += [flag, str(value)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMDB_")}
    log_file = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    log_file.close()
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(
                f"memdb-server exited with {proc.returncode}:\n{log_path.read_text()}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"memdb-server not ready after {timeout}s:\n{log_path.read_text()}")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    if admin_key is None:
        admin_key = (data_dir / "admin.key").read_text().strip()
    return ServerProcess(info["address"], info["metrics"], admin_key, data_dir, proc, log_path)


@contextmanager
def server_process(data_dir: Path, **kwargs) -> Iterator[ServerProcess]:
    server = start_server(data_dir, **kwargs)
    try:
        yield server
    finally:
        server.stop()
