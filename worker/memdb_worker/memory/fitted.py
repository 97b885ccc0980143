"""Fitted rows: a memory of a few key/value/bias rows per KV head, fitted to the calibration
queries' exact states on the prefix text; `fitted_state` answers queries with them (the fit
itself is `memdb_worker.build.fitting`).

The paper's entries (`memdb_worker.build.builder`, Eq. 5) store a state per cluster of
calibration queries and answer a live query with the state of its nearest cluster: a query far
from every calibration query gets a state that is not its own (on trec, even every calibration
record as its own entry leaves a relative error of ~0.16 on held-out queries). Fitted rows
instead keep the prefix's attention *as a function of the query*. Per layer and KV head g, M
rows (k_j, v_j, b_j) answer a post-RoPE query q of a head of g with

    lse(q) = log sum_j exp(s * q.k_j + b_j)
    out(q) = sum_j softmax_j(s * q.k_j + b_j) v_j

which is attention over M tokens with an additive bias: exact for every query when the rows are
the prefix's own keys and values (M = N, b = 0), and the same bytes per row as one token of KV.

Keys are post-RoPE at their prefix positions, so live queries must sit where calibration put
the traces (right after the prefix), as for every memory. The stored shard of a layer holds
keys [Hkv, M, d], values [Hkv, M, 1, d] and bias [Hkv, M, 1] (`memdb.shards`; metadata
entry_state "fitted", granularity kv_group, group_key "mean"). Knows nothing of shards, servers
or models.
"""

from __future__ import annotations

import torch

from memdb_worker.memory.state import State, attention_state


def fitted_state(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scale: float
) -> State:
    """State of post-RoPE queries q [B, H, T, d] on fitted rows: keys and values [Hkv, M, d],
    biases [Hkv, M] (float32). Attention over the rows with the bias added to the scores."""
    h, hkv = q.shape[1], keys.shape[0]
    b = bias.float().repeat_interleave(h // hkv, dim=0)  # [H, M]
    dt = q.dtype
    return attention_state(
        q, keys.to(dt).unsqueeze(0), values.to(dt).unsqueeze(0), scale, b[None, :, None, :].to(dt)
    )
