"""The worker's OpenAI-compatible HTTP API (FastAPI).

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both streaming as server-sent
events or not), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus). A request names
its memory in the extra body field `"memory": "name"` (the `openai` client sends it with
`extra_body={"memory": ...}`); without one the model runs plainly. Chat prompts go through the
tokenizer's chat template.

Errors are OpenAI-shaped (`{"error": {"message", "type", "code"}}`): an unknown memory is 404,
a memory of another model 409, an unreachable memdb server 503, a bad request 400.

This module knows the HTTP shapes only; decoding is the scheduler's, memories are the runtime's
(`runtime.WorkerRuntime`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from memdb import errors
from memdb_worker.serve.cache import NotRemote
from memdb_worker.serve.metrics import CONTENT_TYPE
from memdb_worker.serve.runtime import WorkerRuntime
from memdb_worker.serve.scheduler import GenerationRequest, SamplingParams, TokenEvent

logger = logging.getLogger(__name__)

_STATUS: list[tuple[type[BaseException], int, str]] = [
    (errors.NotFound, 404, "not_found"),
    (NotRemote, 409, "memory_not_remote"),  # before its base class FailedPrecondition
    (errors.FailedPrecondition, 409, "model_mismatch"),
    (errors.Unavailable, 503, "memdb_unavailable"),
    (errors.DeadlineExceeded, 503, "memdb_unavailable"),
    (errors.Unauthenticated, 502, "memdb_unauthenticated"),
    (errors.PermissionDenied, 502, "memdb_permission_denied"),
    (errors.InvalidArgument, 400, "invalid_request_error"),
    (errors.ResourceExhausted, 429, "resource_exhausted"),
    (ValueError, 400, "invalid_request_error"),
]


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _classify(exc: BaseException) -> tuple[int, str, str]:
    for cls, status, code in _STATUS:
        if isinstance(exc, cls):
            msg = str(exc)
            if isinstance(exc, errors.Unauthenticated | errors.PermissionDenied):
                msg = f"the worker's API key was refused by the memdb server: {msg}"
            return status, code, msg
    if isinstance(exc, ApiError):
        return exc.status, exc.code, str(exc)
    return 500, "internal_error", f"internal error: {type(exc).__name__}: {exc}"


def _error_body(status: int, code: str, message: str) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": code}}


# -- request bodies (extra fields of the OpenAI API are accepted and ignored) -----------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="sample among the k most probable tokens (0: all)")
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    memory: str | None = Field(None, description="the memdb memory to decode with")
    ignore_eos: bool = Field(False, description="generate max_tokens whatever comes (benchmarks)")


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = ""


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def create_app(rt: WorkerRuntime) -> FastAPI:
    """The FastAPI application of one worker runtime."""
    app = FastAPI(title="memdb-worker", version="0.1.0")
    m = rt.metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        m.requests.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse(_error_body(exc.status, exc.code, str(exc)), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        m.requests.labels(request.url.path, "400").inc()
        msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse(_error_body(400, "invalid_request_error", msg), status_code=400)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return rt.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(m.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": rt.model_id,
                    "object": "model",
                    "created": int(rt.started_at),
                    "owned_by": "memdb",
                    "model_fingerprint": rt.fingerprint,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "send one prompt per request (a list of one string)")
            prompt = prompt[0]
        if isinstance(prompt, str):
            with rt.scheduler.tokenizer_lock:
                ids = rt.tokenizer(prompt).input_ids
        else:
            ids = [int(t) for t in prompt]
        return await _generate(request, body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request) -> Response:
        messages = [{"role": x.role, "content": _content(x.content)} for x in body.messages]
        try:
            with rt.scheduler.tokenizer_lock:
                text = rt.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
                ids = rt.tokenizer(text, add_special_tokens=False).input_ids
        except Exception as exc:
            raise ApiError(400, f"cannot apply the chat template: {exc}") from None
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await _generate(request, body, ids, chat=True)

    async def _generate(request: Request, body: _Body, ids: list[int], chat: bool) -> Response:
        route = request.url.path
        t0 = time.perf_counter()
        max_tokens = body.max_tokens or rt.config.default_max_tokens
        if max_tokens > rt.config.max_tokens_limit:
            raise ApiError(400, f"max_tokens must be <= {rt.config.max_tokens_limit}")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        try:
            params = SamplingParams(max_tokens, body.temperature, body.top_p, stop, body.seed,
                                    body.ignore_eos, body.top_k)  # fmt: skip
            source = None
            if body.memory:
                source = await run_in_threadpool(rt.resolve, body.memory)
        except Exception as exc:
            status, code, msg = _classify(exc)
            if status >= 500 and status != 503:
                logger.exception("request failed")
            raise ApiError(status, msg, code) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def sink(ev: TokenEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ev)

        req = GenerationRequest(ids, params, sink, source)
        try:
            rt.scheduler.submit(req)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        except RuntimeError as exc:
            raise ApiError(503, str(exc), "shutting_down") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        used_memory = "yes" if body.memory else "no"
        shape = _Shape(rid, created, rt.model_id, chat, body.memory)

        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _stream(req, events, shape, usage, route, used_memory, t0),
                media_type="text/event-stream",
            )
        parts: list[str] = []
        try:
            while True:
                ev = await events.get()
                if ev.error is not None:
                    status, code, msg = _classify(ev.error)
                    raise ApiError(status, msg, code)
                parts.append(ev.text)
                if ev.final:
                    break
        finally:
            req.cancel()  # no-op when finished; stops decoding if the client went away
        m.requests.labels(route, "200").inc()
        m.latency.labels(route, used_memory).observe(time.perf_counter() - t0)
        return JSONResponse(shape.full("".join(parts), ev))

    async def _stream(
        req: GenerationRequest,
        events: asyncio.Queue[TokenEvent],
        shape: _Shape,
        usage: bool,
        route: str,
        used_memory: str,
        t0: float,
    ) -> AsyncIterator[str]:
        first = True
        try:
            if shape.chat:
                yield _sse(shape.chunk("", None, role=True))
            while True:
                ev = await events.get()
                if ev.error is not None:
                    status, code, msg = _classify(ev.error)
                    m.requests.labels(route, str(status)).inc()
                    yield _sse(_error_body(status, code, msg))
                    break
                if first and ev.text:
                    m.first_token.labels(used_memory).observe(time.perf_counter() - t0)
                    first = False
                if ev.text or ev.final:
                    yield _sse(shape.chunk(ev.text, ev.finish_reason))
                if ev.final:
                    if usage:
                        yield _sse(shape.usage_chunk(ev))
                    m.requests.labels(route, "200").inc()
                    m.latency.labels(route, used_memory).observe(time.perf_counter() - t0)
                    break
            yield "data: [DONE]\n\n"
        finally:
            req.cancel()

    return app


class _Shape:
    """OpenAI response objects of one request."""

    def __init__(self, rid: str, created: int, model: str, chat: bool, memory: str | None):
        self.rid, self.created, self.model = rid, created, model
        self.chat, self.memory = chat, memory

    def _head(self, obj: str) -> dict[str, Any]:
        head = {"id": self.rid, "object": obj, "created": self.created, "model": self.model}
        if self.memory:
            head["memory"] = self.memory
        return head

    def full(self, text: str, ev: TokenEvent) -> dict[str, Any]:
        usage = _usage(ev)
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": ev.finish_reason,
            }
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": ev.finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage}

    def chunk(self, text: str, finish: str | None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, ev: TokenEvent) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": _usage(ev)}


def _usage(ev: TokenEvent) -> dict[str, int]:
    return {
        "prompt_tokens": ev.prompt_tokens,
        "completion_tokens": ev.completion_tokens,
        "total_tokens": ev.prompt_tokens + ev.completion_tokens,
    }


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _content(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type", "text") == "text")
