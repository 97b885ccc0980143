"""The scheduler's static-cache batches: rows decoded by a `decode_step.StaticDecoder`.

A batch whose rows share one attention source (the same memory, the same cached prefix, or
none) and fit the decoder's live capacity runs its decode steps through a
static KV cache (CUDA-graphed per batch bucket on CUDA, eager elsewhere) instead of
transformers' forward with a DynamicCache. Rows are slots [0, n) of the decoder: a finished row
leaves by moving the last slots down (`StaticDecoder.compact`), newcomers with the same source
are prefilled into the next free slots, and each step runs the bucket that holds n rows (rows
past n are padding).

The first token of a row is sampled from its prefill logits by the scheduler, later ones inside
the step, both with the one sampler (`attend.sampling`: the row's temperature, top_k, top_p and
seed), so a row draws the tokens the eager path would.

`StaticBatches` keeps one decoder per source (the most recent few: each holds a static cache and
its graphs). This module knows rows only through the attributes the scheduler gives them
(`source`, `prompt`, `req.params`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from memdb_worker.attend.attention import LivePositions
from memdb_worker.attend.decode_step import StaticDecoder, bucket

logger = logging.getLogger(__name__)

Sampler = Callable[[torch.Tensor, list], torch.Tensor]  # (logits [n, V], rows) -> tokens [n]


class StaticBatch:
    """The running static batch: rows in slots [0, n), the tokens to send next."""

    def __init__(self, dec: StaticDecoder, graphed: bool) -> None:
        self.dec = dec
        self.graphed = graphed
        self.rows: list = []
        self.toks: list[int] = []  # per row: the token to send (and feed) next

    @property
    def source(self):
        return self.dec.source

    def admit(self, rows: Sequence, sample: Sampler) -> None:
        """Prefill rows into the next free slots; their first tokens become their next ones."""
        n = len(self.rows)
        slots = list(range(n, n + len(rows)))
        ps = [r.req.params for r in rows]
        logits = self.dec.prefill(slots, [r.prompt for r in rows], [p.temperature for p in ps],
                                  top_p=[p.top_p for p in ps], top_k=[p.top_k for p in ps],
                                  seeds=[r.seed for r in rows])  # fmt: skip
        first = sample(logits, list(rows)).tolist()
        self.dec.set_tokens(slots, first)
        self.rows += list(rows)
        self.toks += first

    def keep(self, indices: Sequence[int]) -> None:
        """Only the rows at these (increasing) indices stay, moved down to slots [0, k)."""
        self.dec.compact(indices)
        self.rows = [self.rows[j] for j in indices]
        self.toks = [self.toks[j] for j in indices]

    def step(self) -> None:
        """One decode step of every row: their next tokens."""
        n = len(self.rows)
        self.toks = self.dec.step(bucket(n), graphed=self.graphed).tolist()[:n]


class StaticBatches:
    """Decoders per source and the rule of which rows may decode statically."""

    def __init__(
        self,
        model: torch.nn.Module,
        max_batch: int,
        max_live: int,
        live_positions: LivePositions,
        *,
        keep_decoders: int = 2,
    ) -> None:
        self.model = model
        self.max_batch = bucket(max_batch)
        self.max_live = max_live
        self.live_positions: LivePositions = live_positions
        self.keep_decoders = keep_decoders
        self.graphed = next(model.parameters()).device.type == "cuda"
        self._decoders: OrderedDict[int, StaticDecoder] = OrderedDict()

    def fits(self, rows: Sequence, source=None, extra: int = 0) -> bool:
        """Whether these rows (joining `extra` running ones of `source` if given) can decode
        statically: one source, prompt + max_tokens within the live capacity."""
        if not rows or extra + len(rows) > self.max_batch:
            return False
        src = rows[0].source if source is None and extra == 0 else source
        return all(
            r.source is src and len(r.prompt) + r.req.params.max_tokens < self.max_live
            for r in rows
        )

    def start(self, rows: Sequence, sample: Sampler) -> StaticBatch:
        """A new static batch of these rows (prefilled)."""
        dec = self._decoder(rows[0].source)
        dec.free()  # a reused decoder keeps nothing of its last batch
        batch = StaticBatch(dec, self.graphed)
        batch.admit(rows, sample)
        return batch

    def _decoder(self, source) -> StaticDecoder:
        key = id(source)
        dec = self._decoders.get(key)
        if dec is None or dec.source is not source:
            dec = StaticDecoder(self.model, self.max_batch, self.max_live, source,
                                live_positions=self.live_positions)  # fmt: skip
            self._decoders[key] = dec
            while len(self._decoders) > self.keep_decoders:
                self._decoders.popitem(last=False)
        self._decoders.move_to_end(key)
        return dec


__all__ = ["StaticBatch", "StaticBatches"]
