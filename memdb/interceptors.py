"""Small gRPC server interceptors: a base that wraps every kind of handler, error mapping.

`Interceptor.around(method, context)` is a context manager run around the handler (and around
the whole iteration of a streamed response). Subclasses: ErrorInterceptor here, AuthInterceptor
in auth.py, MetricsInterceptor in metrics.py. Knows nothing of memdb's services.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import grpc

from memdb.errors import MemdbError, to_status

log = logging.getLogger(__name__)


class Interceptor(grpc.ServerInterceptor):
    def applies(self, method: str) -> bool:
        return True

    def around(self, method: str, context: grpc.ServicerContext) -> AbstractContextManager:
        raise NotImplementedError

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.applies(method):
            return handler
        return _wrap(handler, lambda ctx: self.around(method, ctx))


def _wrap(handler: grpc.RpcMethodHandler, around: Callable) -> grpc.RpcMethodHandler:
    if handler.unary_unary:
        kind, behavior, streaming = grpc.unary_unary_rpc_method_handler, handler.unary_unary, False
    elif handler.unary_stream:
        kind, behavior, streaming = grpc.unary_stream_rpc_method_handler, handler.unary_stream, True
    elif handler.stream_unary:
        kind, behavior, streaming = (
            grpc.stream_unary_rpc_method_handler,
            handler.stream_unary,
            False,
        )
    else:
        kind, behavior, streaming = (
            grpc.stream_stream_rpc_method_handler,
            handler.stream_stream,
            True,
        )

    if streaming:

        def wrapped(request, context):
            with around(context):
                yield from behavior(request, context)
    else:

        def wrapped(request, context):
            with around(context):
                return behavior(request, context)

    return kind(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ErrorInterceptor(Interceptor):
    """The one place where MemdbError becomes a gRPC status; unexpected errors become INTERNAL."""

    @contextmanager
    def around(self, method: str, context: grpc.ServicerContext) -> Iterator[None]:
        try:
            yield
        except MemdbError as exc:
            context.abort(*to_status(exc))
        except Exception:
            if context.code() not in (None, grpc.StatusCode.OK):
                raise  # already aborted with a status
            log.exception("unexpected error in %s", method)
            context.abort(grpc.StatusCode.INTERNAL, "internal server error; see the server log")
