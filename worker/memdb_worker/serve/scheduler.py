"""The scheduler: one thread that owns the model and decodes batches of requests.

Requests (`GenerationRequest`: prompt token ids, sampling parameters, a state source or None)
are queued by `submit`. The scheduler thread decodes one batch at a time with a KV cache, each
row bound to its own memory source (`attention.bind` with a per-row list; rows without a memory
run plainly), one decode step for the whole batch at a time. Continuous batching: between two
decode steps, waiting requests (up to `max_batch` rows in all) are prefilled as a group and
join the running batch (their KV cache is left-padded to the batch's length, or the batch's to
theirs, and concatenated); rows that finish (EOS, a stop string, max_tokens, cancelled) leave at
once (their KV cache rows are dropped). An idle scheduler waits `batch_wait_s` after the first
request for more to arrive before its first prefill.

Each request receives `TokenEvent`s through its `sink` callback, from the scheduler thread:
incremental text (held back while it could be an incomplete character or the start of a stop
string), then a final event with the finish reason ("stop" or "length") or an error. The model
is touched only by this thread (a binding is per model and not thread-safe).

Prefix caching (`prefix_cache.PrefixCache`, optional): a request without a memory whose prompt
starts with a cached prefix prefills only the rest of its prompt, bound to the cached KV (an
`PrefixKV`, shared by every row that names the same prefix); a long prompt not yet cached
has its leading blocks encoded and cached first.

Decode steps run transformers' forward eagerly (a DynamicCache per batch), or, with
`static_live` > 0, through a static KV cache of that many live tokens per row for batches that
allow it (`static_batch`: one source; CUDA-graphed per batch bucket on CUDA). Both draw tokens
with the one sampler (`attend.sampling`: temperature, top_k, top_p, a per-request seed), so a
request gets the same tokens on either path.

This module knows nothing of HTTP, memories' origin or the server.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from memdb_worker.attend.attention import LivePositions, StateSource, bind
from memdb_worker.attend.sampling import new_seed, sample
from memdb_worker.serve.prefix_cache import PrefixCache
from memdb_worker.serve.static_batch import StaticBatch, StaticBatches

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None  # None: a fresh one per request
    ignore_eos: bool = False  # benchmarks: always generate max_tokens
    top_k: int = 0  # 0: every token

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0: every token)")


@dataclass
class TokenEvent:
    """Generated text since the previous event; `finish_reason` set on the last one."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | None
    error: BaseException | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


Sink = Callable[[TokenEvent], None]


@dataclass(eq=False)
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    source: StateSource | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class SchedulerStats:
    batches: int = 0  # prefills (a new batch, or a group joining a running one)
    steps: int = 0  # decode forwards
    step_rows: int = 0  # rows over all decode forwards (step_rows / steps: mean batch size)
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    queued: int = 0
    last_batch_size: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # of the last 1000 batches


class _Row:
    """Decoding state of one request within a batch."""

    def __init__(
        self,
        req: GenerationRequest,
        tokenizer,
        tokenizer_lock: threading.Lock | None = None,
    ) -> None:
        self.req = req
        self.source = req.source  # or a cached prompt prefix (prefix_cache)
        self.prompt = req.prompt_ids  # the tokens this row prefills
        self.tok = tokenizer
        self.tok_lock = tokenizer_lock or threading.Lock()
        self.ids: list[int] = []
        self.sent = 0  # chars of text already sent
        self.done = False
        self.seed = req.params.seed if req.params.seed is not None else new_seed()

    def push(self, token: int, eos: set[int]) -> None:
        """Add a token, send the text that is safe to send, finish if it is the end."""
        p = self.req.params
        if token in eos and not p.ignore_eos:
            self._finish("stop", self._text())
            return
        self.ids.append(token)
        text = self._text()
        for s in p.stop:
            at = text.find(s)
            if at >= 0:
                self._finish("stop", text[:at], token)
                return
        if len(self.ids) >= p.max_tokens:
            self._finish("length", text, token)
            return
        safe = len(text)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            safe = len(text.rstrip("\ufffd"))
        for s in p.stop:  # hold back a possible beginning of a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        delta = text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        self._emit(TokenEvent(text=delta, token_ids=[token]))

    def fail(self, exc: BaseException) -> None:
        if not self.done:
            self.done = True
            self._emit(TokenEvent(error=exc, prompt_tokens=len(self.req.prompt_ids)))

    def _emit(self, ev: TokenEvent) -> None:
        try:
            self.req.sink(ev)
        except Exception:  # a consumer gone (closed event loop, ...) must not stop decoding
            logger.warning("a request's event sink failed; cancelling it", exc_info=True)
            self.req.cancel()

    def _text(self) -> str:
        if self.tok is None:  # token ids only (tests with tokenizer-less models)
            return ""
        with self.tok_lock:
            return self.tok.decode(self.ids, skip_special_tokens=True)

    def _finish(self, reason: str, text: str, token: int | None = None) -> None:
        self.done = True
        self._emit(
            TokenEvent(
                text=text[self.sent :] if len(text) > self.sent else "",
                token_ids=[] if token is None else [token],
                finish_reason=reason,
                prompt_tokens=len(self.req.prompt_ids),
                completion_tokens=len(self.ids),
            )
        )


@dataclass
class _Batch:
    """The running batch: its rows, KV cache, attention mask [B, N], last positions [B, 1] and
    the logits [B, V] of each row's next token."""

    rows: list[_Row]
    cache: DynamicCache
    mask: torch.Tensor
    pos: torch.Tensor
    logits: torch.Tensor

    def merge(self, other: _Batch) -> _Batch:
        """Both batches in one: left-pad the shorter KV cache and mask, concatenate rows."""
        n = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, n, 2), _left_pad(theirs.keys, n, 2)])
            mine.values = torch.cat([_left_pad(mine.values, n, 2), _left_pad(theirs.values, n, 2)])
        self.mask = torch.cat([_left_pad(self.mask, n, 1), _left_pad(other.mask, n, 1)])
        self.pos = torch.cat([self.pos, other.pos])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows = self.rows + other.rows
        return self


def _left_pad(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Zeros before x along `dim` up to length n."""
    missing = n - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class Scheduler:
    """Owns the model; decodes queued requests in batches on one thread."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        max_batch: int = 8,
        batch_wait_s: float = 0.005,
        live_positions: LivePositions = "after_prefix",
        prefix_cache: PrefixCache | None = None,
        static_live: int = 0,
    ) -> None:
        self.model = model
        # automatic prefix caching of requests without a memory (needs positions after it)
        self.prefix_cache = prefix_cache if live_positions == "after_prefix" else None
        # static-cache decoding of batches that allow it (static_batch); 0: off
        self.static = None
        if static_live > 0:
            self.static = StaticBatches(model, max_batch, static_live, live_positions)
        self._held: list[GenerationRequest] = []  # taken, waiting for the running batch to end
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.live_positions: LivePositions = live_positions
        self.device = next(model.parameters()).device
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))
        eos = getattr(model.config, "eos_token_id", None)
        eos_ids = list(eos) if isinstance(eos, list) else [eos]  # a copy: config stays as is
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos_ids.append(tokenizer.eos_token_id)
        self.eos = {int(e) for e in eos_ids if e is not None}
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad_id = int(pad if pad is not None else min(self.eos or {0}))
        self.stats = SchedulerStats()
        # the tokenizer is shared with request threads; fast tokenizers are not re-entrant
        self.tokenizer_lock = threading.Lock()
        self._queue: queue.Queue[GenerationRequest] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="memdb-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        while True:  # fail what is still queued
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                break
            req.sink(TokenEvent(error=RuntimeError("the worker is shutting down")))

    def submit(self, req: GenerationRequest) -> GenerationRequest:
        if not req.prompt_ids:
            raise ValueError("the prompt is empty")
        need = self._offset(req.source) + len(req.prompt_ids) + req.params.max_tokens
        if need > self.max_context:
            raise ValueError(
                f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.params.max_tokens})"
                f"{' + the memory prefix' if req.source is not None else ''} = {need} exceed the "
                f"model's context of {self.max_context} positions"
            )
        if self._stop.is_set():
            raise RuntimeError("the worker is shutting down")
        self._queue.put(req)
        self.stats.queued = self._queue.qsize()
        return req

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, source: StateSource | None = None
    ) -> tuple[str, TokenEvent]:
        """Blocking helper: the whole completion text and the final event (raises its error)."""
        events: queue.Queue[TokenEvent] = queue.Queue()
        self.submit(GenerationRequest(list(prompt_ids), params, events.put, source))
        parts = []
        while True:
            ev = events.get()
            if ev.error is not None:
                raise ev.error
            parts.append(ev.text)
            if ev.final:
                return "".join(parts), ev

    # -- the loop -----------------------------------------------------------------------------

    def _offset(self, source: StateSource | None) -> int:
        if source is None or self.live_positions == "zero":
            return 0
        return int(source.prefix_length)

    def _take(self, limit: int, wait: bool) -> list[GenerationRequest]:
        """Up to `limit` waiting requests; with `wait`, block for the first (0.1 s at most) and
        then `batch_wait_s` for more."""
        out: list[GenerationRequest] = []
        if limit <= 0:
            return out
        if self._held:
            out, self._held = self._held[:limit], self._held[limit:]
            return [r for r in out if not r.cancelled.is_set()]
        if wait:
            try:
                out.append(self._queue.get(timeout=0.1))
            except queue.Empty:
                return out
            deadline = time.perf_counter() + self.batch_wait_s
        else:
            deadline = 0.0
        while len(out) < limit:
            left = deadline - time.perf_counter()
            try:
                out.append(self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        self.stats.queued = self._queue.qsize()
        return [r for r in out if not r.cancelled.is_set()]

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        active: _Batch | StaticBatch | None = None
        while not self._stop.is_set():
            try:
                if active is None:
                    reqs = self._take(self.max_batch, wait=True)
                    active = self._guarded(self._prefill, reqs) if reqs else None
                else:
                    active = self._guarded(self._advance, active)
            except Exception:  # never let the scheduler thread die
                logger.exception("scheduler error; dropping the running batch")
                active = None
        if active is not None:
            for row in active.rows:
                row.fail(RuntimeError("the worker is shutting down"))

    def _guarded(self, fn: Callable, arg):
        """Run a step; on an error (a failed lookup, OOM, ...) fail every row it concerned."""
        try:
            with torch.inference_mode():
                return fn(arg)
        except Exception as exc:
            rows = arg.rows if isinstance(arg, (_Batch, StaticBatch)) else arg
            logger.warning("a batch of %d failed: %s", len(rows), exc, exc_info=True)
            for r in rows:
                (r if isinstance(r, _Row) else _Row(r, None)).fail(exc)
            return None

    def _prefill(self, reqs: list[GenerationRequest], static: bool = True) -> _Batch | StaticBatch:
        """A new batch of these requests (a static one if allowed), prefilled."""
        dev = self.device
        rows = self._rows(reqs)
        st = self.stats
        st.batches += 1
        st.requests += len(rows)
        st.prompt_tokens += sum(len(r.prompt_ids) for r in reqs)
        st.batch_sizes = (st.batch_sizes + [len(rows)])[-1000:]
        if static and self.static is not None and self.static.fits(rows):
            return self.static.start(rows, self._sample)
        lengths = [len(r.prompt) for r in rows]
        width = max(lengths)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - lengths[i] :] = torch.tensor(r.prompt)
            mask[i, width - lengths[i] :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(rows, ids, mask, pos, cache)
        return _Batch(rows, cache, mask, pos[:, -1:], logits)

    def _rows(self, reqs: list[GenerationRequest]) -> list[_Row]:
        """Rows of new requests; those without a memory take a cached prompt prefix if any."""
        rows = [_Row(r, self.tokenizer, self.tokenizer_lock) for r in reqs]
        if self.prefix_cache is not None:
            for row in rows:
                if row.source is None:
                    row.source, row.prompt = self.prefix_cache.split(row.prompt)
        return rows

    def _advance(self, b: _Batch | StaticBatch) -> _Batch | StaticBatch | None:
        """Sample and send one token per row, drop finished rows, run one decode step, then let
        waiting requests join. None when no row is left."""
        if isinstance(b, StaticBatch):
            return self._advance_static(b)
        dev = self.device
        nxt = self._sample(b.logits, b.rows)
        keep = []
        for j, row in enumerate(b.rows):
            if row.req.cancelled.is_set():
                row.fail(RuntimeError("cancelled"))
            else:
                row.push(int(nxt[j]), self.eos)
                self.stats.generated_tokens += 1
            if not row.done:
                keep.append(j)
        if not keep:
            return None
        if len(keep) < len(b.rows):
            sel = torch.tensor(keep, device=dev)
            b.cache.batch_select_indices(sel)
            b.rows = [b.rows[j] for j in keep]
            b.mask, b.pos, nxt = b.mask[sel], b.pos[sel], nxt[sel]
        b.mask = torch.cat([b.mask, b.mask.new_ones(len(b.rows), 1)], dim=1)
        b.pos = b.pos + 1
        b.logits = self._forward(b.rows, nxt.view(-1, 1), b.mask, b.pos, b.cache)
        st = self.stats
        st.steps += 1
        st.step_rows += len(b.rows)
        st.last_batch_size = len(b.rows)
        newcomers = self._take(self.max_batch - len(b.rows), wait=False)
        if newcomers:
            # a failure fails only them; they join this eager batch
            joined = self._guarded(lambda r: self._prefill(r, static=False), newcomers)
            if joined is not None:
                b = b.merge(joined)
        return b

    def _advance_static(self, b: StaticBatch) -> StaticBatch | None:
        """`_advance` of a static batch: send the rows' tokens, drop finished rows, let waiting
        requests of the same source join (others wait for the batch to end), one step."""
        if not self._send(b):
            return None
        newcomers = self._take(self.max_batch - len(b.rows), wait=False)
        if newcomers:
            rows = self._rows(newcomers)
            if self.static is not None and self.static.fits(rows, b.source, len(b.rows)):
                st = self.stats
                st.batches += 1
                st.requests += len(rows)
                st.prompt_tokens += sum(len(r.prompt_ids) for r in newcomers)
                b.admit(rows, self._sample)
                if not self._send(b, start=len(b.rows) - len(rows)):
                    return None
            else:
                self._held = newcomers + self._held
        b.step()
        st = self.stats
        st.steps += 1
        st.step_rows += len(b.rows)
        st.last_batch_size = len(b.rows)
        return b

    def _send(self, b: StaticBatch, start: int = 0) -> bool:
        """Push each row's next token (rows from `start`), drop finished rows; any left?"""
        keep = list(range(start))
        for j in range(start, len(b.rows)):
            row = b.rows[j]
            if row.req.cancelled.is_set():
                row.fail(RuntimeError("cancelled"))
            else:
                row.push(int(b.toks[j]), self.eos)
                self.stats.generated_tokens += 1
            if not row.done:
                keep.append(j)
        if len(keep) < len(b.rows):
            b.keep(keep)
        return bool(b.rows)

    def _forward(self, rows: list[_Row], ids, mask, pos, cache) -> torch.Tensor:
        sources = [r.source for r in rows]
        binding: StateSource | list[StateSource | None] | None = sources
        if all(s is None for s in sources):
            binding = None
        elif all(s is sources[0] for s in sources):
            binding = sources[0]  # one source for the batch (the fused CUDA path takes this)
        with bind(self.model, binding, live_positions=self.live_positions):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1, :].float()

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Each row's next token by the one sampler (`sampling.sample`, as the static step
        draws): step = the tokens the row has drawn so far."""
        ps = [r.req.params for r in rows]
        if all(p.temperature <= 0 for p in ps):  # greedy rows: no per-row tensors to build
            return logits.argmax(dim=-1)
        dev = logits.device
        return sample(
            logits,
            torch.tensor([p.temperature for p in ps], dtype=torch.float32, device=dev),
            torch.tensor([p.top_p for p in ps], dtype=torch.float32, device=dev),
            torch.tensor([p.top_k for p in ps], dtype=torch.long, device=dev),
            torch.tensor([r.seed for r in rows], dtype=torch.long, device=dev),
            torch.tensor([len(r.ids) for r in rows], dtype=torch.long, device=dev),
            truncate=any(p.top_p < 1 or p.top_k > 0 for p in ps),
        )
