"""The context of a `memdb-admin` command: its global options and lazily opened client (`App`),
expected failures (`Failure`) and their exit codes, and the `--json` option every command takes.

Shared by `cli` (the root group and the tenant, key and status commands) and `cli_prefix` (the
prefix commands). Knows nothing of the commands themselves.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property

import click

from memdb_client import output
from memdb_client.client import MemdbClient

EXIT_CODES = {
    "ok": 0,
    "error": 1,  # anything else (also an aborted confirmation)
    "usage": 2,  # bad arguments or input files, rejected by the server as invalid
    "not_found": 3,
    "conflict": 4,  # already exists, stale version, memory of another model
    "auth": 5,  # no or wrong API key, missing role
    "unavailable": 6,  # server down or not answering in time
    "exhausted": 7,  # quota or size limit
    "interrupted": 130,  # Ctrl-C
}


class Failure(Exception):
    """An expected failure: one line for the user and an exit code."""

    def __init__(self, message: str, code: int = EXIT_CODES["error"]) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class App:
    """Global options and the lazily opened client."""

    server: str
    api_key: str
    json: bool = False
    timeout: float = 30.0
    tls: bool = False
    ca_file: str | None = None
    quiet: bool = False
    debug: bool = False
    _opened: list[MemdbClient] = field(default_factory=list)

    @cached_property
    def client(self) -> MemdbClient:
        roots = None
        if self.ca_file:
            try:
                with open(self.ca_file, "rb") as f:
                    roots = f.read()
            except OSError as exc:
                raise Failure(
                    f"cannot read --ca-file '{self.ca_file}': {exc.strerror}", EXIT_CODES["usage"]
                ) from None
        c = MemdbClient(
            self.server,
            self.api_key,
            timeout=self.timeout,
            tls=self.tls or bool(roots),
            root_certificates=roots,
        )
        self._opened.append(c)
        return c

    def close(self) -> None:
        # gRPC's close waits for cancelled calls to wind down, which takes as long as the
        # transport when the server stopped reading (e.g. a Ctrl-C mid-upload to a stuck
        # server): wait a little, then let the process exit regardless.
        for c in self._opened:
            t = threading.Thread(target=c.close, name="memdb-admin-close", daemon=True)
            t.start()
            t.join(2.0)

    @property
    def progress(self) -> bool:
        return not self.quiet

    def emit(self, obj, text: str) -> None:
        """The result: JSON with --json, else the human text."""
        if self.json:
            output.emit_json(obj)
        else:
            click.echo(text)

    def note(self, message: str) -> None:
        """A progress message on stderr (not with --quiet)."""
        if not self.quiet:
            click.echo(message, err=True)


pass_app = click.make_pass_decorator(App)


def _set_json(ctx: click.Context, _param, value: bool) -> None:
    if value:
        ctx.ensure_object(App).json = True


json_option = click.option(
    "--json",
    "json_",
    is_flag=True,
    expose_value=False,
    callback=_set_json,
    help="Print the result as JSON.",
)
