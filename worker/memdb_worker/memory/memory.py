"""The in-device memory: shards turned into tensors on the model's device, and its lookup.

A `Memory` holds, per layer, I index groups of M entries: lookup keys [I, M, Dk], the entries'
states on the prefix (out [I, M, h, d], lse [I, M, h]) and optional extras: `q_mean`/`k_bar`
[I, M, h, d] for the first-order lse correction (q_mean derived from the keys at load when the
builder left it out: metadata q_mean "keys"), `whiten`/`whiten_mean` [H, d, d]/[H, d] for
whitened keys. Its common metadata (key mode, granularity, positions, RoPE, fingerprint, ...)
comes from the builder and travels in every shard.

Compact formats (the agreed tensor spec, `formats`): `keys` float32 | float16 | bfloat16 |
float8_e4m3fn, with `key_scale` [I, M] float32 iff float8 (the key is `keys.float() *
key_scale[..., None]`; it travels as a shard's `key_scale`); `out` and the extras float32 |
float16 | bfloat16; `lse` float32. Tensors keep their stored dtypes on the device. Group keys
(metadata "group_key"): "concat" (default) looks a group up with its heads' keys side by side
(Dk = h * d); "mean" (granularity kv_group only; the builder's "kv_group_mean") with the mean of
its heads' keys (Dk = d: one key of the head dimension per KV group), each head then
reading its own stored state out[I, m, j].

As a state source (`prefix_state`, see `attention.bind`) it turns the live queries into lookup
keys (`keys.KeySpace`), finds the entries of highest cosine similarity per layer and group
(exact, torch ops on the memory's device) and returns their states:

- top_k = 1 (default, the paper): the best entry's state;
- top_k > 1: a soft top-k, the weighted mean of the k entries' Z = exp(lse) with weights
  softmax(cosine / temperature) (the output Z-weighted like Eq. 5);
- lse_correction: lse <- lse + s * k_bar . (q_pre - q_mean), when the memory stores k_bar;
- lse_bias: a constant added to every entry's lse (against prefix decay), or one per layer.

A memory built with entry_state "fitted" (`fitted`) is not looked up: its layer holds M
key/value/bias rows per KV head (keys [Hkv, M, d] post-RoPE, values [Hkv, M, 1, d], bias
[Hkv, M, 1] added to the scores; held in the fields `out`/`lse` as in the shard,
`MemoryLayer.rows` reads them) and a live query's state is attention over all of them; only
`lse_bias` of the decode options applies.

`DecodeOptions` are chosen at decode time (`with_options` shares the tensors). Everything after
the search (correction, bias, soft top-k) is `hits_state`, shared with the worker's remote
lookups (`cache.RemoteMemory`) so that both answer alike. This module knows nothing of how
entries were built or of transformers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from memdb.shards import KEY_SCALE, Shard, check_consistent, holds_fitted_rows
from memdb_worker.memory.fitted import fitted_state
from memdb_worker.memory.formats import dequantize_keys, to_numpy, to_torch
from memdb_worker.memory.keys import Granularity, KeySpace, LayerQuery, RopeSpec
from memdb_worker.memory.state import State, combine_states

logger = logging.getLogger(__name__)

LSE_CORRECTION_EXTRAS = ("q_mean", "k_bar")  # the extra tensors of the first-order correction
KEY_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)
STATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GROUP_KEYS = ("concat", "mean")
# older builds wrote the group-mean key as this granularity: kv_group with group_key "mean"
OLDER_MEAN_GRANULARITY = "kv_group_mean"


@dataclass(frozen=True)
class DecodeOptions:
    """How a memory answers a query (decode-time choices; the paper's are the defaults)."""

    top_k: int = 1
    temperature: float = 0.05  # soft top-k: weights softmax(cosine / temperature)
    lse_correction: bool | None = None  # None: apply when the memory stores k_bar
    lse_bias: float | tuple[float, ...] = 0.0  # one value, or one per layer

    def bias_at(self, layer: int) -> float:
        """The lse bias of `layer` (the one value, or the layer's own)."""
        b = self.lse_bias
        return float(b[layer] if isinstance(b, tuple) else b)

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")


@dataclass
class MemoryLayer:
    """One layer of a memory on the device."""

    keys: torch.Tensor  # [I, M, Dk] (float8 keys are scaled by key_scale)
    inv_norm: torch.Tensor  # [I, M] float32, 1 / |key| (of the scaled key)
    out: torch.Tensor  # [I, M, h, d]; fitted rows' values
    lse: torch.Tensor  # [I, M, h] float32; fitted rows' biases
    extras: dict[str, torch.Tensor]
    key_scale: torch.Tensor | None = None  # [I, M] float32, iff keys are float8

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A fitted layer's values [Hkv, M, d] and biases [Hkv, M] float32: the fields `out`
        and `lse` without their head axis of one."""
        return self.out[:, :, 0], self.lse[:, :, 0]

    def key_values(self) -> torch.Tensor:
        """The keys as float32 [I, M, Dk] (float8 keys times their scale)."""
        return dequantize_keys(self.keys, self.key_scale)

    def check(self) -> None:
        """Raise ValueError unless the tensors follow the spec (module doc)."""
        if self.keys.dtype not in KEY_DTYPES:
            raise ValueError(f"keys are {self.keys.dtype}; use one of {KEY_DTYPES}")
        fp8 = self.keys.dtype == torch.float8_e4m3fn
        if fp8 != (self.key_scale is not None):
            raise ValueError("key_scale [I, M] float32 is needed iff keys are float8_e4m3fn")
        if self.key_scale is not None and (
            self.key_scale.shape != self.keys.shape[:2] or self.key_scale.dtype != torch.float32
        ):
            raise ValueError(
                f"key_scale is {self.key_scale.dtype} {list(self.key_scale.shape)}; "
                f"expected float32 {list(self.keys.shape[:2])}"
            )
        for name, t in (("out", self.out), *self.extras.items()):
            if name in LSE_CORRECTION_EXTRAS + ("out",) and t.dtype not in STATE_DTYPES:
                raise ValueError(f"{name} is {t.dtype}; use one of {STATE_DTYPES}")


def layer_from_tensors(
    keys: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, extras: dict[str, torch.Tensor]
) -> MemoryLayer:
    """A memory layer from a shard's tensors: `key_scale` moves out of the extras, the inverse
    key norms are computed (of the scaled keys)."""
    extras = dict(extras)
    scale = extras.pop(KEY_SCALE, None)
    lay = MemoryLayer(keys, keys.new_empty(0), out, lse.float(), extras, key_scale=scale)
    lay.inv_norm = lay.key_values().norm(dim=-1).clamp_min(1e-30).reciprocal()
    return lay


def lookup_keys(
    keyspace: KeySpace, group_key: str, q_pre: torch.Tensor, layer: int
) -> torch.Tensor:
    """Lookup keys [n, I, Dk] of pre-RoPE queries [n, H, d]: the key space's keys, or with
    group_key "mean" the mean of each group's heads' keys ([n, I, d])."""
    keys = keyspace.keys(q_pre, layer)  # [n, I, h * d]
    if group_key == "mean":
        n, i, _ = keys.shape
        keys = keys.view(n, i, keyspace.heads_per_group, -1).mean(dim=2)
    return keys


def group_key_of(metadata: Mapping[str, str], keyspace: KeySpace) -> str:
    """The metadata's group key ("concat" by default), checked against the granularity."""
    older = metadata.get("granularity") == OLDER_MEAN_GRANULARITY
    gk = metadata.get("group_key", "mean" if older else "concat")
    if gk not in GROUP_KEYS:
        raise ValueError(f"unknown group_key {gk!r}; use one of {GROUP_KEYS}")
    if gk == "mean" and keyspace.granularity != "kv_group":
        raise ValueError("group_key 'mean' needs granularity 'kv_group'")
    return gk


class Memory:
    """A memory on a device; a state source for `attention.bind`."""

    def __init__(
        self,
        layers: list[MemoryLayer],
        keyspace: KeySpace,
        metadata: dict[str, str],
        options: DecodeOptions | None = None,
    ) -> None:
        self.layers = layers
        self.keyspace = keyspace
        self.metadata = dict(metadata)
        self.options = options or DecodeOptions()
        self.group_key = group_key_of(self.metadata, keyspace)
        for lay in layers:
            lay.check()
        if self.fitted:
            check_fitted(self.options, layers[0], keyspace, self.group_key)
        self.lse_corrected = check_options(
            self.options, budget=self.budget, num_layers=len(layers), extras=layers[0].extras
        )  # whether the first-order lse correction applies

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_shards(
        cls,
        shards: Sequence[Shard],
        device: str | torch.device = "cpu",
        options: DecodeOptions | None = None,
    ) -> Memory:
        """Load one shard per layer (in layer order) onto `device`."""
        check_consistent(list(shards))
        # "layer" differs per shard; "memdb.format" belongs to the encoding (encode_shard adds it)
        meta = {k: v for k, v in shards[0].metadata.items() if k not in ("layer", "memdb.format")}
        for i, s in enumerate(shards):
            if "layer" in s.metadata and int(s.metadata["layer"]) != i:
                raise ValueError(
                    f"shard {i} says it is layer {s.metadata['layer']}; pass shards in order"
                )
        dev = torch.device(device)
        layers = [_layer(s, meta, dev) for s in shards]
        keyspace = keyspace_from_metadata(meta, [lay.extras for lay in layers])
        key_dim = keyspace.key_dim
        if group_key_of(meta, keyspace) == "mean":
            key_dim = keyspace.head_dim
        if keyspace.num_groups != layers[0].keys.shape[0] or key_dim != layers[0].keys.shape[2]:
            raise ValueError(
                f"metadata says granularity {keyspace.granularity!r} (I={keyspace.num_groups}, "
                f"Dk={key_dim}) but keys are {list(layers[0].keys.shape)}"
            )
        return cls(layers, keyspace, meta, options)

    def with_options(self, options: DecodeOptions) -> Memory:
        """The same tensors answering with other decode options."""
        return Memory(self.layers, self.keyspace, self.metadata, options)

    def to_shards(self) -> list[Shard]:
        """The shards this memory was loaded from (same arrays, same metadata)."""
        shards = []
        for i, layer in enumerate(self.layers):
            shards.append(
                Shard(
                    keys=to_numpy(layer.keys),
                    out=to_numpy(layer.out),
                    lse=to_numpy(layer.lse),
                    extras={k: to_numpy(v) for k, v in self._stored_extras(layer).items()},
                    metadata={**self.metadata, "layer": str(i)},
                    key_scale=None if layer.key_scale is None else to_numpy(layer.key_scale),
                )
            )
        return shards

    # -- properties ---------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def budget(self) -> int:  # M
        return int(self.layers[0].keys.shape[1])

    @property
    def prefix_length(self) -> int:
        """Position right after the prefix in calibration (live tokens start there)."""
        return int(self.metadata.get("prefix_length", "0"))

    @property
    def token_count(self) -> int:
        return int(self.metadata.get("token_count", "0"))

    @property
    def model_fingerprint(self) -> str:
        return self.metadata.get("model_fingerprint", "")

    @property
    def device(self) -> torch.device:
        return self.layers[0].keys.device

    @property
    def fitted(self) -> bool:
        """Whether the entries are fitted key/value rows (`fitted`), answered by attention
        over all of them rather than by a lookup."""
        return holds_fitted_rows(self.metadata)

    def nbytes(self) -> int:
        """Bytes of the memory as stored (keys, key_scale, states, stored extras;
        `formats.memory_bytes`)."""
        return sum(
            _bytes(*_tensors(lay), *self._stored_extras(lay).values()) for lay in self.layers
        )

    def device_nbytes(self) -> int:
        """Bytes the memory takes on its device (with extras derived at load, e.g. q_mean)."""
        return sum(_bytes(*_tensors(lay), *lay.extras.values()) for lay in self.layers)

    def _stored_extras(self, layer: MemoryLayer) -> dict[str, torch.Tensor]:
        derived = {"q_mean"} if self.metadata.get("q_mean") == "keys" else set()
        return {k: v for k, v in layer.extras.items() if k not in derived}

    @property
    def key_dim(self) -> int:
        """Dk of the stored keys (the head dim with group_key "mean")."""
        return int(self.layers[0].keys.shape[2])

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ValueError unless the model has this memory's layers and heads."""
        cfg = model.config
        want = {
            "num_layers": int(cfg.num_hidden_layers),
            "num_heads": int(cfg.num_attention_heads),
            "num_kv_heads": int(cfg.num_key_value_heads),
            "head_dim": int(
                getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            ),
        }
        have = {
            "num_layers": self.num_layers,
            "num_heads": self.keyspace.num_heads,
            "num_kv_heads": self.keyspace.num_kv_heads,
            "head_dim": self.keyspace.head_dim,
        }
        if want != have:
            raise ValueError(f"memory shape {have} does not fit the model {want}")

    # -- lookup -------------------------------------------------------------------------------

    def search(
        self, layer: int, keys: torch.Tensor, k: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k entries by cosine similarity: keys [n, I, Dk] -> (scores, ids) [n, I, k]."""
        lay = self.layers[layer]
        unit = torch.nn.functional.normalize(keys.float(), dim=-1)
        sims = torch.einsum("nik,imk->nim", unit, lay.key_values()) * lay.inv_norm  # [n, I, M]
        if k == 1:
            scores, ids = sims.max(dim=-1, keepdim=True)
            return scores, ids
        return sims.topk(k, dim=-1)

    def prefix_state(self, query: LayerQuery) -> State:
        """State source protocol: the memory's state for each live query (see module doc)."""
        b, h, t, d = query.q.shape
        ks = self.keyspace
        lay = self.layers[query.layer]
        if self.fitted:
            st = fitted_state(query.q, lay.key_values(), *lay.rows(), query.scaling)
            bias = self.options.bias_at(query.layer)
            return State(st.out, st.lse + bias) if bias else st
        q_pre = query.q_pre.transpose(1, 2).reshape(b * t, h, d)  # [n, H, d]
        keys = lookup_keys(ks, self.group_key, q_pre, query.layer)  # [n, I, Dk]
        scores, ids = self.search(query.layer, keys, self.options.top_k)  # [n, I, k]
        groups = torch.arange(ks.num_groups, device=ids.device).view(1, -1, 1)
        lse = lay.lse[groups, ids]  # [n, I, k, h]
        out = lay.out[groups, ids].float()  # [n, I, k, h, d]
        correction = None
        if self.lse_corrected:
            correction = tuple(lay.extras[x][groups, ids] for x in LSE_CORRECTION_EXTRAS)
        return hits_state(query, q_pre, scores, lse, out, self.options, correction)


def check_options(
    options: DecodeOptions, *, budget: int, num_layers: int, extras: Collection[str]
) -> bool:
    """Raise ValueError unless `options` fit a memory of `budget` entries per group, `num_layers`
    layers and these extra tensors; returns whether the first-order lse correction applies."""
    if options.top_k > budget:
        raise ValueError(f"top_k={options.top_k} exceeds the budget M={budget}")
    if isinstance(options.lse_bias, tuple) and len(options.lse_bias) != num_layers:
        raise ValueError(f"lse_bias has {len(options.lse_bias)} values for {num_layers} layers")
    has_kbar = all(x in extras for x in LSE_CORRECTION_EXTRAS)
    if options.lse_correction and not has_kbar:
        raise ValueError("lse_correction needs a memory built with lse_correction=True (k_bar)")
    return has_kbar if options.lse_correction is None else options.lse_correction


def check_fitted(
    options: DecodeOptions, layer: MemoryLayer, keyspace: KeySpace, group_key: str
) -> None:
    """Raise ValueError unless a fitted memory (entry_state "fitted") has its shapes (keys
    [Hkv, M, d], values [Hkv, M, 1, d], bias [Hkv, M, 1]) and asks for no lookup option."""
    want = (keyspace.num_kv_heads, keyspace.head_dim)
    if keyspace.granularity != "kv_group" or group_key != "mean":
        raise ValueError("a fitted memory has granularity 'kv_group' and group_key 'mean'")
    if (layer.keys.shape[0], layer.keys.shape[2]) != want or layer.out.shape[2] != 1:
        raise ValueError(
            f"a fitted memory holds keys [Hkv, M, d], values [Hkv, M, 1, d]: got keys "
            f"{list(layer.keys.shape)}, values {list(layer.out.shape)} for Hkv, d = {want}"
        )
    if options.top_k != 1 or options.lse_correction:
        raise ValueError(
            "a fitted memory attends over all its rows: top_k and lse_correction do not apply"
        )


def correct_lse(
    lse: torch.Tensor,
    q_pre: torch.Tensor,
    q_mean: torch.Tensor,
    k_bar: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The first-order lse correction of hits: lse + scaling * (q_pre - q_mean) . k_bar.

    lse [n, I, k, h] of the hits, q_pre [n, I, h, d] the live pre-RoPE queries by group,
    q_mean and k_bar [n, I, k, h, d] the hits' stored rows. `scaling * k_bar` is the gradient
    of the entry's lse with respect to q_pre: the builder stores the attention-weighted mean
    key pulled back through RoPE (`keys.rope_transpose`, a * R^T k for RoPE's attention
    scaling a), so no factor of a appears here (tests/test_worker_lse_correction.py).
    """
    return lse + scaling * ((q_pre.unsqueeze(2) - q_mean.float()) * k_bar.float()).sum(-1)


def hits_state(
    query: LayerQuery,
    q_pre: torch.Tensor,
    scores: torch.Tensor,
    lse: torch.Tensor,
    out: torch.Tensor,
    options: DecodeOptions,
    correction: Sequence[torch.Tensor] | None = None,
) -> State:
    """The state of each live query from its top-k hits: what a state source answers once it
    has found and gathered them.

    q_pre [n, H, d] (float32, n = B*T in (b, t) order), scores [n, I, k], lse [n, I, k, h] and
    out [n, I, k, h, d] (float32) of the hits; `correction`: the hits' (q_mean, k_bar) rows
    [n, I, k, h, d] to apply the first-order lse correction, None for none. Then the lse bias
    of `options`, and the soft top-k when k > 1. Returns the State [B, H, T(, d)] of `query`.
    """
    b, h, t, d = query.q.shape
    n, num_groups, k, heads_per_group = lse.shape
    if correction is not None:
        q_mean, k_bar = correction
        qg = q_pre.view(n, num_groups, heads_per_group, d)  # [n, I, h, d]
        lse = correct_lse(lse, qg, q_mean, k_bar, query.scaling)
    bias = options.bias_at(query.layer)
    if bias:
        lse = lse + bias
    if k == 1:
        lse, out = lse[:, :, 0], out[:, :, 0]  # [n, I, h], [n, I, h, d]
    else:
        logw = torch.log_softmax(scores / options.temperature, dim=-1)  # [n, I, k]
        lse, out = combine_states(lse, out, logw.unsqueeze(-1), dim=2)
    lse = lse.reshape(b, t, h).transpose(1, 2)  # [B, H, T]
    out = out.reshape(b, t, h, d).transpose(1, 2)  # [B, H, T, d]
    return State(out.contiguous(), lse.contiguous())


def _layer(shard: Shard, meta: Mapping[str, str], device: torch.device) -> MemoryLayer:
    """A shard's tensors on the device (private copies, stored dtypes); q_mean derived from the
    keys where the builder left it out (metadata q_mean "keys": the entry key is the member
    mean of the pre-RoPE queries, [I, M, h * d] = [I, M, h, d])."""
    extras = {k: to_torch(v, device) for k, v in shard.extras.items()}
    if shard.key_scale is not None:
        extras[KEY_SCALE] = to_torch(shard.key_scale, device)
    out = to_torch(shard.out, device)
    lay = layer_from_tensors(to_torch(shard.keys, device), out, to_torch(shard.lse, device), extras)
    if meta.get("q_mean") == "keys" and "k_bar" in lay.extras:
        lay.extras["q_mean"] = lay.key_values().view(out.shape).to(out.dtype)
    return lay


def _granularity(name: str) -> Granularity:
    return "kv_group" if name == OLDER_MEAN_GRANULARITY else name  # type: ignore[return-value]


def _tensors(layer: MemoryLayer) -> tuple[torch.Tensor, ...]:
    scale = () if layer.key_scale is None else (layer.key_scale,)
    return (layer.keys, *scale, layer.out, layer.lse)


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def keyspace_from_metadata(
    meta: dict[str, str], layers: Sequence[Shard] | Sequence[Mapping[str, torch.Tensor]]
) -> KeySpace:
    """Rebuild the key space a memory was built with from its metadata and, per layer, the
    shards (or their extra tensors as a mapping) that hold the whitening, if any."""
    extras = [x.extras if isinstance(x, Shard) else x for x in layers]
    try:
        rope_meta = json.loads(meta["rope"])
        rope = RopeSpec(
            inv_freq=torch.tensor(rope_meta["inv_freq"], dtype=torch.float32),
            attention_scaling=float(rope_meta["attention_scaling"]),
        )
        whiten = None
        whiten_mean = None
        if meta.get("whiten", "0") == "1":
            whiten = [torch.as_tensor(e["whiten"]).float() for e in extras]  # per layer
            whiten_mean = [torch.as_tensor(e["whiten_mean"]).float() for e in extras]
        return KeySpace(
            mode=meta["key_mode"],  # type: ignore[arg-type]
            granularity=_granularity(meta["granularity"]),
            num_heads=int(meta["num_heads"]),
            num_kv_heads=int(meta["num_kv_heads"]),
            head_dim=int(meta["head_dim"]),
            common_position=int(meta.get("common_position", "0")),
            rope=rope,
            whiten=whiten,
            whiten_mean=whiten_mean,
        )
    except KeyError as exc:
        raise ValueError(
            f"memory metadata lacks {exc}; was it built by memdb_worker.build.builder?"
        ) from None
