"""The worker's HTTP server: `serve(config)` runs the API (`api.create_app`) of one
`runtime.WorkerRuntime` with uvicorn on `config.listen` (port 0 picks a free port), writes the
ready file `{address, port, pid}` once it accepts connections, and shuts down gracefully on
SIGTERM / SIGINT. Knows nothing of the routes or of decoding.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn

from memdb_worker.model.loading import LoadedModel
from memdb_worker.serve.api import create_app
from memdb_worker.serve.config import WorkerConfig
from memdb_worker.serve.runtime import WorkerRuntime

logger = logging.getLogger(__name__)


def serve(config: WorkerConfig, loaded: LoadedModel | None = None) -> None:
    """Run the HTTP API until SIGTERM / SIGINT."""
    rt = WorkerRuntime.create(config, loaded)
    host, _, port = config.listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    bound = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(rt), log_level=config.log_level.lower(), access_log=False, lifespan="off"
        )
    )

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.started:
            address = f"{host}:{bound}"
            print(f"memdb-worker serving http://{address} (model {rt.model_id})", flush=True)
            if config.ready_file is not None:
                tmp = Path(f"{config.ready_file}.tmp{os.getpid()}")
                tmp.write_text(json.dumps({"address": address, "port": bound, "pid": os.getpid()}))
                tmp.replace(config.ready_file)

    threading.Thread(target=announce, name="memdb-announce", daemon=True).start()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it to the previous handler: make
    # that one a normal exit, so the finally block below runs and the exit code is 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.run(sockets=[sock])
    finally:
        rt.close()
        logger.info("memdb-worker stopped")
