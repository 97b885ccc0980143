"""Queries and lookup keys: undoing RoPE, the key modes, whitening and index groups.

A query reaches the attention function rotated by RoPE at its position. Lookup keys are built
from the *pre-RoPE* query `q_pre` (RoPE undone with the known position), so that they do not
depend on where the live token sits:

- `pre_rope`:    key = q_pre
- `rope_common`: key = RoPE(q_pre) at one common position for every query (default: the
                 position right after the prefix)

each optionally whitened per layer and head, `key <- S^-1/2 (key - mu)`, with `S` the second
moment (or, with centering, the covariance) of calibration keys, estimated at build time and
stored with the memory. Keys are then grouped by the granularity:

- `head`:      I = H groups, h = 1 head each, Dk = d
- `kv_group`:  I = Hkv groups (the query heads sharing one KV head), h = H / Hkv,
               Dk = h * d (the group's heads' keys concatenated; a memory's group_key "mean"
               averages them instead, Dk = d: see `memory.lookup_keys`)
- `layer`:     I = 1, h = H, Dk = H * d

This module knows nothing of memories, shards or the model beyond its RoPE parameters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

import torch

from memdb.build_options import GRANULARITIES, KEY_MODES, Granularity, KeyMode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RopeSpec:
    """The model's rotary embedding: inverse frequencies [d/2] and the attention scaling."""

    inv_freq: torch.Tensor  # [d/2] float32
    attention_scaling: float = 1.0

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> RopeSpec:
        """Read the rotary embedding of a transformers model (static RoPE types only)."""
        for mod in model.modules():
            if hasattr(mod, "inv_freq") and hasattr(mod, "attention_scaling"):
                rope_type = getattr(mod, "rope_type", "default")
                if "dynamic" in str(rope_type):
                    raise ValueError(f"RoPE type {rope_type!r} is position-dependent; unsupported")
                inv = mod.inv_freq.detach().float().cpu()
                return cls(inv_freq=inv, attention_scaling=float(mod.attention_scaling))
        raise ValueError("the model has no rotary embedding module (inv_freq); is it a Llama?")

    def cos_sin(
        self, positions: torch.Tensor, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [..., d] for integer positions [...] (computed as transformers does)."""
        inv = self.inv_freq.to(device or positions.device)
        freqs = positions[..., None].float() * inv  # [..., d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., d] by cos/sin broadcastable to it."""
    return x * cos + rotate_half(x) * sin


def undo_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of `apply_rope` (also right when cos^2 + sin^2 != 1, i.e. scaled RoPE)."""
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


def rope_transpose(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The transpose of `apply_rope` (its Jacobian, a * R): pulls a gradient g [..., d] with
    respect to the post-RoPE vector back to the pre-RoPE one.

    transformers scales cos and sin by the attention scaling a (YaRN, longrope), so
    apply_rope(x) = a * R x and the pull-back is a * R^T g = a^2 * undo_rope(g): equal to
    `undo_rope` only when a = 1.
    """
    return g * cos - rotate_half(g) * sin


@dataclass
class LayerQuery:
    """The queries of one attention call, as the attention function sees them.

    q is post-RoPE in the model's dtype; positions are the RoPE positions it was rotated at.
    """

    layer: int
    q: torch.Tensor  # [B, H, T, d] post-RoPE
    positions: torch.Tensor  # [B, T] long
    scaling: float
    rope: RopeSpec
    num_kv_heads: int

    @cached_property
    def _cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rope.cos_sin(self.positions, device=self.q.device)  # [B, T, d]
        return cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, d]

    @cached_property
    def q_pre(self) -> torch.Tensor:
        """The queries before RoPE, float32 [B, H, T, d]."""
        cos, sin = self._cos_sin
        return undo_rope(self.q.float(), cos, sin)

    def pull_back(self, g: torch.Tensor) -> torch.Tensor:
        """Gradients [B, H, T, d] with respect to these post-RoPE queries, as gradients with
        respect to the pre-RoPE queries `q_pre` (`rope_transpose`)."""
        cos, sin = self._cos_sin
        return rope_transpose(g.float(), cos, sin)

    def select(self, rows: torch.Tensor) -> LayerQuery:
        """The same queries for a subset of batch rows."""
        return LayerQuery(
            self.layer,
            self.q.index_select(0, rows),
            self.positions.index_select(0, rows),
            self.scaling,
            self.rope,
            self.num_kv_heads,
        )


@dataclass
class KeySpace:
    """How pre-RoPE queries [..., H, d] become lookup keys [..., I, Dk] at each layer."""

    mode: KeyMode
    granularity: Granularity
    num_heads: int
    num_kv_heads: int
    head_dim: int
    common_position: int = 0
    rope: RopeSpec | None = None  # needed for rope_common
    whiten: list[torch.Tensor] | None = None  # per layer [H, d, d]
    whiten_mean: list[torch.Tensor] | None = None  # per layer [H, d]
    _cs: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in KEY_MODES:
            raise ValueError(f"unknown key mode {self.mode!r}; use one of {KEY_MODES}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"unknown granularity {self.granularity!r}; use one of {GRANULARITIES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.mode == "rope_common" and self.rope is None:
            raise ValueError("key mode rope_common needs the model's RopeSpec")

    @property
    def num_groups(self) -> int:  # I
        return {"head": self.num_heads, "kv_group": self.num_kv_heads, "layer": 1}[self.granularity]

    @property
    def heads_per_group(self) -> int:  # h
        return self.num_heads // self.num_groups

    @property
    def key_dim(self) -> int:  # Dk
        return self.heads_per_group * self.head_dim

    def rotate(self, q_pre: torch.Tensor) -> torch.Tensor:
        """Apply the key mode's rotation to q_pre [..., H, d] (identity for pre_rope)."""
        if self.mode == "pre_rope":
            return q_pre.float()
        assert self.rope is not None
        dev = q_pre.device
        if dev not in self._cs:
            pos = torch.tensor(self.common_position, device=dev)
            self._cs[dev] = self.rope.cos_sin(pos, device=dev)  # [d] each
        cos, sin = self._cs[dev]
        return apply_rope(q_pre.float(), cos, sin)

    def keys(self, q_pre: torch.Tensor, layer: int) -> torch.Tensor:
        """Lookup keys [..., I, Dk] (float32) of pre-RoPE queries [..., H, d] at `layer`."""
        x = self.rotate(q_pre)
        if self.whiten is not None:
            w = self.whiten[layer].to(x.device, torch.float32)  # [H, d, d]
            mu = self.whiten_mean[layer].to(x.device, torch.float32) if self.whiten_mean else 0.0
            x = torch.einsum("...hd,hed->...he", x - mu, w)
        return self.group(x)

    def group(self, x: torch.Tensor) -> torch.Tensor:
        """[..., H, e] -> [..., I, h * e] (consecutive heads form a group)."""
        return x.reshape(*x.shape[:-2], self.num_groups, self.heads_per_group * x.shape[-1])

    def metadata(self) -> dict[str, str]:
        return {
            "key_mode": self.mode,
            "granularity": self.granularity,
            "common_position": str(self.common_position),
            "num_heads": str(self.num_heads),
            "num_kv_heads": str(self.num_kv_heads),
            "head_dim": str(self.head_dim),
            "whiten": "1" if self.whiten is not None else "0",
        }


def fit_whitening(
    x: torch.Tensor, center: bool = False, shrink: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head whitening of keys x [N, H, d]: returns W = S^-1/2 [H, d, d] and mu [H, d].

    S is the second moment (center=False, mu = 0) or the covariance (center=True), shrunk toward
    `shrink * trace(S)/d * I` so that few samples or dead directions stay invertible.
    """
    xd = x.double()
    n, h, d = xd.shape
    mu = xd.mean(0) if center else torch.zeros(h, d, dtype=torch.float64)
    xc = xd - mu
    s = torch.einsum("nhd,nhe->hde", xc, xc) / max(1, n)  # [H, d, d]
    tr = s.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-12) / d  # [H]
    s = s + (shrink * tr)[:, None, None] * torch.eye(d, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(s)
    w = evecs @ torch.diag_embed(evals.clamp_min(1e-12).rsqrt()) @ evecs.transpose(-1, -2)
    return w.float(), mu.float()
