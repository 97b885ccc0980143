"""The one exception hierarchy of memdb, and its mapping to gRPC status codes.

Server code raises these; the service layer turns them into gRPC statuses (`to_status`), and the
client turns statuses back into them (`from_status`). This is the only place where the mapping
lives. Messages are meant for a person: say what was wrong and how to fix it.
"""

from __future__ import annotations

import re

import grpc

MAX_ECHO_CHARS = 200  # a longer run of non-blank characters (echoed input) is cut to this
MAX_DETAIL_BYTES = 1024  # UTF-8 bytes of a status message (gRPC sends it in a header)
_LONG_RUN = re.compile(rf"\S{{{MAX_ECHO_CHARS + 1},}}")


class MemdbError(Exception):
    """Base of every memdb error. `code` is the gRPC status it travels as."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(MemdbError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class BuildError(InvalidArgument):
    """A memory cannot be built for a reason its user can fix: no model at that path, a budget
    past the calibration, text a memory cannot take (one line; raised by the worker's builder
    before or during a build, wherever it runs)."""


class NotFound(MemdbError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MemdbError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(MemdbError):
    """Model fingerprint mismatch, stale expected version."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(MemdbError):
    """Quota, size limit, or the store is full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(MemdbError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(MemdbError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(MemdbError):
    """The server cannot be reached (client side) or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class OutcomeUnknown(Unavailable):
    """A write was sent but its reply was lost, and reading back could not tell whether it was
    applied (the backend stayed unreachable): read the prefix before writing again."""


class DeadlineExceeded(MemdbError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(MemdbError):
    """The version a streamed read was reading was replaced or deleted during the call; a read
    of the current version may simply be retried."""

    code = grpc.StatusCode.ABORTED


class Cancelled(MemdbError):
    code = grpc.StatusCode.CANCELLED


class Internal(MemdbError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[MemdbError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
        DeadlineExceeded,
        Aborted,
        Cancelled,
        Internal,
    )
}


def to_status(exc: MemdbError) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message an error travels as (shortened: `short_message`)."""
    return exc.code, short_message(str(exc))


def short_message(message: str) -> str:
    """`message` with every run of more than MAX_ECHO_CHARS non-blank characters (a name, a
    fingerprint... echoed from a request) cut to MAX_ECHO_CHARS + "...", and the whole cut
    to MAX_DETAIL_BYTES of UTF-8, so a status never outgrows gRPC's header limits."""
    message = _LONG_RUN.sub(lambda m: m.group()[:MAX_ECHO_CHARS] + "...", message)
    raw = message.encode()
    if len(raw) <= MAX_DETAIL_BYTES:
        return message
    return raw[: MAX_DETAIL_BYTES - 32].decode(errors="ignore") + f"... ({len(raw)} bytes cut)"


def from_status(code: grpc.StatusCode, message: str) -> MemdbError:
    """The memdb error for a gRPC status (unknown codes become `MemdbError`)."""
    cls = _BY_CODE.get(code, MemdbError)
    err = cls(message or code.name)
    err.code = code
    return err


def from_rpc_error(err: grpc.RpcError) -> MemdbError:
    """Convert a `grpc.RpcError` raised by a stub call."""
    return from_status(err.code(), err.details() or "")
