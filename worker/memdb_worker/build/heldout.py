"""Each layer's error on held-out queries: how well a built memory answers calibration queries
it was not fitted to (`BuildOptions.holdout`), so an admin sees which layers are hard.

`split_traces(traces, fraction, seed)` holds a seeded fraction of the traces out of the fit
(at least one trace, never all of them). After the build, `layer_errors(memory, held)` answers
the held-out calibration's queries from the memory (`Memory.prefix_state`, as decoding does)
and compares with their exact prefix states, per layer:

    rel_err = ||o_memory - o_exact|| / ||o_exact||  (over every query and head)
    lse_mae = mean |lse_memory - lse_exact|

`summary(errors)` is what the shard metadata keeps (`heldout_errors`, JSON: records, traces,
and the two figures per layer). Knows nothing of shards' encoding, servers or CLIs.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import TypeVar

import torch

from memdb_worker.build.calibration import Calibration
from memdb_worker.memory.keys import LayerQuery, apply_rope
from memdb_worker.memory.memory import Memory

T = TypeVar("T")
METADATA_KEY = "heldout_errors"


def split_traces(traces: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(fit traces, held-out traces): round(fraction * n) traces, at least 1 when fraction > 0,
    at most n - 1, chosen with `seed`; both in their original order."""
    traces = list(traces)
    if fraction <= 0 or len(traces) < 2:
        return traces, []
    k = min(len(traces) - 1, max(1, round(fraction * len(traces))))
    held = set(random.Random(seed).sample(range(len(traces)), k))
    return ([t for i, t in enumerate(traces) if i not in held],
            [t for i, t in enumerate(traces) if i in held])  # fmt: skip


@torch.inference_mode()
def layer_errors(memory: Memory, held: Calibration) -> list[dict[str, float]]:
    """Per layer, the memory's relative output error and lse error on the held-out queries."""
    device = memory.device
    n = held.num_records
    positions = held.positions.view(n, 1).to(device)  # [n, 1]: each query's RoPE position
    cos, sin = held.rope.cos_sin(positions, device=device)  # [n, 1, d]
    scaling = float(held.prefix_kv.scaling)
    errors = []
    for layer in range(held.num_layers):
        q_pre = held.q_pre[layer].to(device).unsqueeze(2)  # [n, H, 1, d]
        q = apply_rope(q_pre, cos.unsqueeze(1), sin.unsqueeze(1))  # post-RoPE, as decoding
        lq = LayerQuery(layer, q, positions, scaling, held.rope, held.num_kv_heads)
        got = memory.prefix_state(lq)
        out, lse = got.out[:, :, 0].float().cpu(), got.lse[:, :, 0].float().cpu()  # [n, H, d]
        want_out, want_lse = held.out[layer].float(), held.lse[layer].float()
        rel = (out - want_out).norm() / want_out.norm().clamp_min(1e-30)
        errors.append({"rel_err": float(rel), "lse_mae": float((lse - want_lse).abs().mean())})
    return errors


def summary(errors: list[dict[str, float]], records: int, traces: int) -> str:
    """The metadata value: {"records", "traces", "rel_err": [per layer], "lse_mae": [...]}."""
    return json.dumps({
        "records": records,
        "traces": traces,
        "rel_err": [round(e["rel_err"], 5) for e in errors],
        "lse_mae": [round(e["lse_mae"], 5) for e in errors],
    }, separators=(",", ":"))  # fmt: skip


__all__ = ["METADATA_KEY", "layer_errors", "split_traces", "summary"]
