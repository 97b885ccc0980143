"""`memdb-admin`: manage memories, tenants and API keys of a memdb server from a shell.

    memdb-admin [--server HOST:PORT] [--api-key KEY] [--json] COMMAND ...

    prefix insert|update|append|build|delete|list|show|export|import
    build  list|show|cancel
    tenant create|list|delete
    key    create|list|revoke
    status

The server address and key come from --server / MEMDB_SERVER and --api-key / MEMDB_API_KEY.
Results go to stdout (aligned tables, or JSON with --json); messages and progress bars to
stderr. Every failure is one line `memdb-admin: error: ...` and a non-zero exit code (see
EXIT_CODES). Talks to the server only through `MemdbClient`; builds run as build jobs on the
workers (`cli_build`), or with --local through the worker's builder, found through the
`memdb.builders` entry point (`memdb_client.build`): without the worker extra every command but
the local builds runs.
"""

from __future__ import annotations

import os
import re

import click

from memdb.errors import (
    AlreadyExists,
    BuildError,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MemdbError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from memdb_client import output
from memdb_client.app import EXIT_CODES, App, Failure, json_option, pass_app
from memdb_client.cli_build import build_group
from memdb_client.cli_prefix import prefix
from memdb_client.client import DEFAULT_ADDRESS
from memdb_client.inputs import InputError
from memdb_client.portable import PortableError

_EPILOG = (
    "Exit codes: 0 ok, 1 error, 2 bad input, 3 not found, 4 conflict (exists, stale version, "
    "other model), 5 authentication or permission, 6 server unreachable, 7 quota or size "
    "limit, 130 interrupted."
)


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", "; ", str(text).strip()) or "(no details)"


def describe(err: MemdbError, address: str) -> Failure:
    """A server error as one line a person can act on, and its exit code."""
    d = _one_line(str(err))
    if isinstance(err, Unavailable) and "last error:" in d:  # gRPC's long connect failure
        d = d.rsplit(": ", 1)[-1]
    table: list[tuple[type[MemdbError], str, str]] = [
        (
            Unavailable,
            "unavailable",
            f"cannot reach the memdb server at {address} ({d}); is it running? "
            "(set --server or MEMDB_SERVER)",
        ),
        (
            DeadlineExceeded,
            "unavailable",
            f"the memdb server at {address} did not answer in time ({d}); try a larger --timeout",
        ),
        (
            Unauthenticated,
            "auth",
            f"the server refused the API key: {d} (pass --api-key or set MEMDB_API_KEY)",
        ),
        (PermissionDenied, "auth", f"permission denied: {d}"),
        (NotFound, "not_found", d),
        (AlreadyExists, "conflict", d),
        (FailedPrecondition, "conflict", d),
        (InvalidArgument, "usage", f"the server rejected the request: {d}"),
        (ResourceExhausted, "exhausted", d),
        (Cancelled, "interrupted", f"the call was cancelled: {d}"),
    ]
    for cls, code, message in table:
        if isinstance(err, cls):
            return Failure(message, EXIT_CODES[code])
    return Failure(f"server error ({err.code.name}): {d}", EXIT_CODES["error"])


class AdminGroup(click.Group):
    """The root group: turns every expected error into one line and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException):
            raise
        except click.Abort:
            click.echo(err=True)  # end the unanswered prompt's line
            _fail(ctx, Failure("aborted; nothing was changed", EXIT_CODES["error"]))
        except KeyboardInterrupt:
            _fail(
                ctx,
                Failure(
                    "interrupted; nothing half-written is left on the server",
                    EXIT_CODES["interrupted"],
                ),
            )
        except Failure as f:
            _fail(ctx, f)
        except BuildError as err:  # before MemdbError: a local build, not the server, refused
            _fail(ctx, Failure(str(err), EXIT_CODES["usage"]))
        except MemdbError as err:
            app = ctx.find_object(App)
            _fail(ctx, describe(err, app.server if app else "?"))
        except (InputError, PortableError) as err:
            _fail(ctx, Failure(str(err), EXIT_CODES["usage"]))
        except Exception as err:
            app = ctx.find_object(App)
            if app is not None and app.debug:
                raise
            _fail(
                ctx,
                Failure(
                    f"unexpected {type(err).__name__}: {_one_line(str(err))} "
                    "(rerun with --debug for the traceback)"
                ),
            )


def _fail(ctx: click.Context, f: Failure):
    click.echo(f"memdb-admin: error: {_one_line(str(f))}", err=True)
    ctx.exit(f.code)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


class Size(click.ParamType):
    """A byte count: 1000000, 10MB, 2GiB, 512k (k/M/G/T, binary with or without 'i')."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = _SIZE.match(str(value))
        if not m:
            self.fail(f"{value!r} is not a size like 1000000, 512MiB or 2GB", param, ctx)
        unit = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[m.group(2).lower()]
        return int(float(m.group(1)) * (1024**unit))


@click.group(
    cls=AdminGroup,
    epilog=_EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--server",
    envvar="MEMDB_SERVER",
    default=DEFAULT_ADDRESS,
    show_default=True,
    help="Server address HOST:PORT, or several: a:1,b:2 (env MEMDB_SERVER).",
)
@click.option(
    "--api-key",
    envvar="MEMDB_API_KEY",
    default="",
    show_default=False,
    help="API key (env MEMDB_API_KEY).",
)
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON (for scripts).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Deadline of each call in seconds (uploads and downloads get 600 s).",
)
@click.option("--tls", is_flag=True, envvar="MEMDB_TLS", help="Connect with TLS (env MEMDB_TLS).")
@click.option("--ca-file", envvar="MEMDB_TLS_CA", help="PEM roots for TLS (implies --tls).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or progress messages.")
@click.option(
    "--debug",
    is_flag=True,
    envvar="MEMDB_ADMIN_DEBUG",
    help="Show a traceback on unexpected errors.",
)
@click.version_option(package_name="memdb", prog_name="memdb-admin")
@click.pass_context
def cli(ctx, server, api_key, as_json, timeout, tls, ca_file, quiet, debug):
    """Manage the memories, tenants and API keys of a memdb server."""
    app = App(server, api_key, as_json, timeout, tls, ca_file, quiet, debug)
    ctx.obj = app
    ctx.call_on_close(app.close)


# -- status ----------------------------------------------------------------------------------------
@cli.command()
@json_option
@pass_app
def status(app: App):
    """Server health, version, store size and memories per tenant."""
    health = app.client.health(timeout=app.timeout)
    stats = app.client.stats() if app.api_key else None
    obj = {
        "server": app.server,
        "health": health,
        "stats": output.to_jsonable(stats) if stats else None,
    }
    app.emit(obj, output.status_text(app.server, health, stats))
    if health != "SERVING":
        raise Failure(f"the server at {app.server} is {health}", EXIT_CODES["unavailable"])


# -- tenants ---------------------------------------------------------------------------------------
@cli.group()
def tenant():
    """Create, list and delete tenants (root key only)."""


@tenant.command("create")
@click.argument("name")
@click.option("--max-bytes", type=Size(), default=0, help="Quota of stored bytes (0 = none).")
@click.option(
    "--max-prefixes", type=click.IntRange(min=0), default=0, help="Quota of prefixes (0 = none)."
)
@json_option
@pass_app
def tenant_create(app: App, name, max_bytes, max_prefixes):
    """Create tenant NAME."""
    t = app.client.create_tenant(name, max_bytes=max_bytes, max_prefixes=max_prefixes)
    app.emit(t, f"created tenant '{t.name}'\n\n" + output.tenant_rows([t]))


@tenant.command("list")
@json_option
@pass_app
def tenant_list(app: App):
    """List tenants with their usage and quotas."""
    ts = app.client.list_tenants()
    app.emit(ts, output.tenant_rows(ts))


@tenant.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Also delete the tenant's prefixes.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@pass_app
def tenant_delete(app: App, name, force, yes):
    """Delete tenant NAME and its API keys (its prefixes too with --force)."""
    if not yes:
        what = " and all its prefixes" if force else ""
        click.confirm(f"Delete tenant '{name}'{what}?", abort=True, err=True)
    app.client.delete_tenant(name, force=force)
    app.emit({"tenant": name, "deleted": True}, f"deleted tenant '{name}'")


# -- API keys --------------------------------------------------------------------------------------
@cli.group()
def key():
    """Create, list and revoke API keys (admin role)."""


@key.command("create")
@click.option("--tenant", default="", help="Tenant of the key (default: the caller's).")
@click.option("--role", type=click.Choice(["admin", "writer", "reader", "worker"]), required=True,
              help="worker: builds jobs of every tenant (root key only)")  # fmt: skip
@click.option("--description", default="", help="A note shown in `key list`.")
@json_option
@pass_app
def key_create(app: App, tenant, role, description):
    """Create an API key; the key itself is shown only this once."""
    secret, info = app.client.create_api_key(role, tenant=tenant, description=description)
    obj = {"api_key": secret, **output.to_jsonable(info)}
    app.emit(
        obj, f"API key (shown only now, store it safely):\n{secret}\n\n" + output.key_rows([info])
    )


@key.command("list")
@click.option("--tenant", default="", help="Tenant whose keys to list (default: the caller's).")
@json_option
@pass_app
def key_list(app: App, tenant):
    """List API keys (ids, roles; never the secrets)."""
    keys = app.client.list_api_keys(tenant=tenant)
    app.emit(keys, output.key_rows(keys))


@key.command("revoke")
@click.argument("key_id")
@json_option
@pass_app
def key_revoke(app: App, key_id):
    """Revoke the API key KEY_ID (see `key list`)."""
    app.client.revoke_api_key(key_id)
    app.emit({"key_id": key_id, "revoked": True}, f"revoked key {key_id}")


def main() -> None:
    """The `memdb-admin` console script."""
    # OpenMP threads that spin while waiting make torch and FAISS (k-means) many times slower
    # on a machine whose cores are busy with other work; sleeping waits cost little otherwise.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cli(prog_name="memdb-admin")


cli.add_command(prefix)
cli.add_command(build_group)
