"""How every RPC of the asyncio server runs: call hooks, blocking work off the event loop, errors.

`Dispatcher` is the server's one `grpc.aio.ServerInterceptor`. It turns every handler into a
coroutine that enters the `Hook`s (metrics, errors, auth: `Hook.around(call)` is a context
manager around the whole call, streams included), then runs the servicer:

- a sync handler (LMDB / FAISS work) runs in the bounded executor, one step at a time: a unary
  call is one job, a streamed response one job per message, so a slow reader of a stream holds
  no thread between messages; a streamed request is read on the event loop and handed over;
  each job first takes one of its key's `Slots` (per tenant): one tenant cannot queue the
  executor full; and, but for uploads, waits for its tenant's time share (`shares.TimeShares`):
  while tenants contend, one cannot take the server's time from the others;
- an async handler (Watch, health, reflection) runs on the event loop and holds no thread.

Requests that cannot be deserialized become INVALID_ARGUMENT (one rate-limited log line, no
traceback). `MemdbError`s become their status here (`ErrorHook`), with the message shortened
by `errors.to_status`. Knows nothing of memdb's services.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    ExitStack,
    asynccontextmanager,
    contextmanager,
)
from typing import Any

import grpc

from memdb.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    MemdbError,
    ResourceExhausted,
    to_status,
)
from memdb_server.shares import TimeShares

log = logging.getLogger(__name__)

_END = object()  # end of a stream


class Call:
    """What hooks and sync handlers see of one call: its method, metadata, status, liveness.

    Sync handlers get it as their `context` (it is safe to use from executor threads);
    `is_active()` turns False once the call is over (finished, cancelled or timed out).
    """

    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.short = method.rsplit("/", 1)[-1]
        self.code = grpc.StatusCode.OK
        self.details = ""
        self._metadata = context.invocation_metadata()
        self._over = threading.Event()

    def invocation_metadata(self) -> tuple:
        return self._metadata

    def is_active(self) -> bool:
        return not self._over.is_set()

    def fail(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details

    def end(self) -> None:
        self._over.set()


class Hook:
    """A context manager run around every call it `applies` to (base of the call hooks)."""

    def applies(self, method: str) -> bool:
        return True

    def around(self, call: Call) -> AbstractContextManager:
        raise NotImplementedError


class CallCap(Hook):
    """At most `limit` open calls per `key()` (called in the call's context, inside the hooks
    before this one) of the methods `applies` accepts; more are RESOURCE_EXHAUSTED, naming
    `setting` and what `key()` returned."""

    def __init__(
        self,
        applies: Callable[[str], bool],
        limit: int,
        setting: str,
        key: Callable[[], Hashable] = lambda: None,
    ) -> None:
        self._applies, self.limit, self.setting, self._key = applies, limit, setting, key
        self._open: Counter[Hashable] = Counter()
        self._lock = threading.Lock()

    def applies(self, method: str) -> bool:
        return self._applies(method)

    @contextmanager
    def around(self, call: Call) -> Iterator[None]:
        key = self._key()
        with self._lock:
            if self._open[key] >= self.limit:
                whose = f" of {key}" if key is not None else ""
                raise ResourceExhausted(
                    f"{self._open[key]} calls{whose} are open, the server's {self.setting} "
                    f"({self.limit}); close some (e.g. streams) or retry later"
                )
            self._open[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._open[key] -= 1
                if not self._open[key]:
                    del self._open[key]


class ErrorHook(Hook):
    """The one place where MemdbError becomes a gRPC status; unexpected errors become INTERNAL."""

    @contextmanager
    def around(self, call: Call) -> Iterator[None]:
        try:
            yield
        except MemdbError as exc:
            call.fail(*to_status(exc))
        except grpc.aio.AbortError:
            raise  # an async handler already sent its status
        except Exception:
            log.exception("unexpected error in %s", call.method)
            call.fail(grpc.StatusCode.INTERNAL, "internal server error; see the server log")


class _Malformed:
    """Stands for a request message gRPC could not deserialize."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class _Throttle:
    """At most one log line per `period` seconds, with the count of what it left out."""

    def __init__(self, period: float = 60.0) -> None:
        self.period = period
        self._last = -period
        self._skipped = 0
        self._lock = threading.Lock()

    def warn(self, msg: str, *args: Any) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.period:
                self._skipped += 1
                log.debug(msg, *args)
                return
            skipped, self._skipped, self._last = self._skipped, 0, now
        log.warning(msg + " (%d more since the last such line)", *args, skipped)


_malformed_log = _Throttle()


def _safe(deserializer: Callable | None, method: str) -> Callable | None:
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # protobuf DecodeError and friends
            _malformed_log.warn("%s: could not parse a %d-byte request (%s)", method, len(raw),
                                type(exc).__name__)  # fmt: skip
            return _Malformed(exc)

    return deserialize


def _check(message: Any, method: str) -> Any:
    if isinstance(message, _Malformed):
        raise InvalidArgument(
            f"{method}: the request is not a valid protobuf message of the method's request "
            "type; use the stubs generated from proto/memdb/v1/memdb.proto"
        )
    return message


class Slots:
    """At most `limit` jobs at once per key (e.g. per tenant, from `key()`, called in the
    call's context); more wait on the event loop, holding no thread."""

    def __init__(self, limit: int, key: Callable[[], Any]) -> None:
        self.limit = limit
        self._key = key
        self._sems: dict[Any, asyncio.Semaphore] = {}
        self._users: dict[Any, int] = {}

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        key = self._key()
        sem = self._sems.setdefault(key, asyncio.Semaphore(self.limit))
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with sem:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:  # forget idle keys
                del self._users[key], self._sems[key]


class Dispatcher(grpc.aio.ServerInterceptor):
    """Runs every handler under the hooks; sync handlers in `executor`, each job holding one of
    `slots` (see the module doc)."""

    def __init__(
        self,
        hooks: list[Hook],
        executor: concurrent.futures.Executor,
        slots: Slots,
        uploads: Slots,
        idle_timeout: float,
        shares: TimeShares | None = None,
    ) -> None:
        self._hooks = hooks
        self._executor = executor
        self._slots = slots
        self._shares = shares
        self._uploads = uploads
        self._idle_timeout = idle_timeout
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)  # a method's wrapping depends on the method alone
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        hooks = [h for h in self._hooks if h.applies(method)]
        run = _Run(method, hooks, self._executor, handler)
        run.slots, run.uploads, run.idle_timeout = self._slots, self._uploads, self._idle_timeout
        run.shares = self._shares
        kind = _KINDS[(handler.request_streaming, handler.response_streaming)]
        return kind(
            run.unary if not handler.response_streaming else run.stream,
            request_deserializer=_safe(handler.request_deserializer, method),
            # sync handlers' answers are serialized in the executor (`_Run.serialize`): a large
            # Lookup answer then never holds the event loop that health and Watch run on
            response_serializer=handler.response_serializer if run.is_async else _as_bytes,
        )


_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class _Run:
    """One method's wrapped behaviour (a coroutine for every kind of handler)."""

    slots: Slots  # per tenant, every job
    uploads: Slots  # in all, jobs that read a streamed request (they hold a thread throughout)
    idle_timeout: float  # seconds a streamed request may send nothing
    shares: TimeShares | None  # per tenant, jobs of calls without a streamed request

    def __init__(self, method: str, hooks: list[Hook], executor, handler) -> None:
        self.method = method
        self.hooks = hooks
        self.executor = executor
        self.request_streaming = handler.request_streaming
        self.behavior = (
            handler.unary_unary or handler.unary_stream or handler.stream_unary
            or handler.stream_stream
        )  # fmt: skip
        self.is_async = inspect.iscoroutinefunction(self.behavior) or inspect.isasyncgenfunction(
            self.behavior
        )
        self._serializer = handler.response_serializer

    def serialize(self, message: Any) -> Any:
        """A sync handler's answer as wire bytes (run in the executor, not on the loop)."""
        if message is None or message is _END or self._serializer is None:
            return message
        return self._serializer(message)

    def _call(self, request: Any, call: Call) -> Any:
        return self.serialize(self.behavior(request, call))

    def _next(self, gen: Any) -> Any:
        return self.serialize(next(gen, _END))

    def _share(self) -> AbstractAsyncContextManager:
        return self.shares.hold() if self.shares is not None else contextlib.nullcontext()

    def _enter_hooks(self, stack: ExitStack, call: Call) -> None:
        for hook in self.hooks:  # an error in one (e.g. auth) is handled by those entered
            stack.enter_context(hook.around(call))

    async def unary(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = Call(self.method, context)
        response = None
        try:
            with ExitStack() as stack:
                self._enter_hooks(stack, call)
                response = await self._unary(request, context, call)
        finally:
            call.end()
        if call.code is not grpc.StatusCode.OK:
            await context.abort(call.code, call.details)
        return response

    async def stream(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        call = Call(self.method, context)
        try:
            with ExitStack() as stack:
                self._enter_hooks(stack, call)
                await self._stream(request, context, call)
        finally:
            call.end()
        if call.code is not grpc.StatusCode.OK:
            await context.abort(call.code, call.details)

    def _request(self, request: Any, call: Call) -> Any:
        if not self.request_streaming:
            return _check(request, self.method)
        if self.is_async:
            return _checked(request, self.method)
        return _SyncRequests(request, asyncio.get_running_loop(), call, self.method,
                             self.idle_timeout)  # fmt: skip

    async def _unary(self, request: Any, context, call: Call) -> Any:
        request = self._request(request, call)
        if self.is_async:
            try:
                return await self.behavior(request, context)
            except grpc.aio.AbortError:
                call.fail(context.code() or grpc.StatusCode.UNKNOWN, context.details() or "")
                raise
        ctx = contextvars.copy_context()  # holds what the hooks set (the caller's identity)
        # an upload's job waits for the network as much as it works: it is bounded by
        # `uploads`, not charged to the tenant's time share
        uploads = self.uploads.hold() if self.request_streaming else self._share()
        try:
            async with uploads, self.slots.hold():
                future = self.executor.submit(ctx.run, self._call, request, call)
                response = await asyncio.wrap_future(future)
            if self.shares is not None and not self.request_streaming:
                # sending the answer costs the server too (a copy per byte): charged when done
                context.add_done_callback(self.shares.charge_from_now())
            return response
        except asyncio.CancelledError:
            call.end()  # the handler sees is_active() False; its result is dropped
            if isinstance(request, _SyncRequests):
                request.cancel()
            raise

    async def _stream(self, request: Any, context, call: Call) -> None:
        request = self._request(request, call)
        if self.is_async:
            try:
                await self._async_stream(request, context)
            except grpc.aio.AbortError:
                call.fail(context.code() or grpc.StatusCode.UNKNOWN, context.details() or "")
                raise
            return
        ctx = contextvars.copy_context()
        gen = ctx.run(self.behavior, request, call)
        future = None
        try:
            while True:
                async with self._share(), self.slots.hold():
                    future = self.executor.submit(ctx.run, self._next, gen)
                    message = await asyncio.wrap_future(future)
                if message is _END:
                    return
                await context.write(message)
        finally:
            call.end()
            if isinstance(request, _SyncRequests):
                request.cancel()
            self._close_later(gen, ctx, future)

    async def _async_stream(self, request: Any, context) -> None:
        if inspect.iscoroutinefunction(self.behavior):  # writes with context.write itself
            await self.behavior(request, context)
            return
        responses = self.behavior(request, context)  # an async generator
        try:
            async for message in responses:
                await context.write(message)
        finally:
            await responses.aclose()

    def _close_later(self, gen, ctx: contextvars.Context, running) -> None:
        """Close the generator (its finally blocks release what it holds) once no step of it
        runs any more; on the executor, as its steps."""

        def close(_: object = None) -> None:
            try:
                self.executor.submit(ctx.run, gen.close)
            except RuntimeError:  # executor shut down: close here
                ctx.run(gen.close)

        if running is None or running.done():
            close()
        else:
            running.add_done_callback(close)


def _as_bytes(message: bytes) -> bytes:
    """The response serializer of sync handlers: their answers are bytes already."""
    return message


async def _checked(requests: AsyncIterator, method: str) -> AsyncIterator:
    async for message in requests:
        yield _check(message, method)


class _SyncRequests:
    """A streamed request as a blocking iterator for a handler in the executor: each message
    is read on the event loop (the thread waits for it)."""

    def __init__(self, requests, loop, call: Call, method: str, idle_timeout: float) -> None:
        self._requests = requests.__aiter__()
        self._loop = loop
        self._call = call
        self._method = method
        self._idle_timeout = idle_timeout
        self._pending: concurrent.futures.Future | None = None

    def __iter__(self) -> _SyncRequests:
        return self

    def __next__(self) -> Any:
        if not self._call.is_active():
            raise Cancelled(f"{self._method} was cancelled")
        self._pending = pending = asyncio.run_coroutine_threadsafe(self._read(), self._loop)
        waited = 0.0
        while True:
            try:
                message = pending.result(timeout=1.0)
                break
            except concurrent.futures.TimeoutError:
                waited += 1.0
                if not self._call.is_active():  # e.g. the loop stopped before reading
                    pending.cancel()
                    raise Cancelled(f"{self._method} was cancelled") from None
                if waited >= self._idle_timeout:
                    pending.cancel()
                    raise DeadlineExceeded(
                        f"{self._method}: no request message for {waited:.0f} s (the server's "
                        "stream_idle_timeout_s); send without pauses"
                    ) from None
            except concurrent.futures.CancelledError:
                raise Cancelled(f"{self._method} was cancelled") from None
        if message is _END:
            raise StopIteration
        return _check(message, self._method)

    async def _read(self) -> Any:
        try:
            return await self._requests.__anext__()
        except StopAsyncIteration:
            return _END

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
