"""Build jobs as the client sees them: `BuildJob` (a job's state and progress) and `BuildSpec`
(what to build), to and from the wire's messages.

`MemdbClient.submit_build` and friends send and return these; the admin CLI shows them and the
worker's job loop runs them. Knows nothing of models or how a memory is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memdb.v1 import memdb_pb2 as pb

STATES = ("queued", "claimed", "running", "done", "failed", "cancelled")  # BuildState 1..6
FINAL = ("done", "failed", "cancelled")
STATE_VALUES = {s: i + 1 for i, s in enumerate(STATES)}


@dataclass
class BuildSpec:
    """What a job builds. `options` are `BuildOptions.to_metadata()`; `prefix_text` and `traces`
    are rendered text (a job's listing carries neither: only ClaimBuild's answer does)."""

    name: str
    mode: str = "create"  # create | update (append: update)
    prefix_text: str = ""
    traces: list[str] = field(default_factory=list)
    budget: int = 0
    options: dict[str, str] = field(default_factory=dict)
    model_fingerprint: str = ""
    expected_version: int = 0
    append: bool = False
    index_kind: str = ""
    metric: str = ""
    build_params: dict[str, str] = field(default_factory=dict)
    query_position: int | None = None

    def to_pb(self) -> pb.BuildSpec:
        s = pb.BuildSpec(
            name=self.name, mode=pb.PUT_MODE_UPDATE if self.mode == "update" else
            pb.PUT_MODE_CREATE, append=self.append, expected_version=self.expected_version,
            prefix_text=self.prefix_text, traces=self.traces, options=self.options,
            budget=self.budget, model_fingerprint=self.model_fingerprint,
            index_kind=self.index_kind, metric=self.metric, build_params=self.build_params,
        )  # fmt: skip
        if self.query_position is not None:
            s.query_position = self.query_position
        return s

    @classmethod
    def from_pb(cls, s: pb.BuildSpec) -> BuildSpec:
        return cls(
            s.name, "update" if s.mode == pb.PUT_MODE_UPDATE else "create", s.prefix_text,
            list(s.traces), s.budget, dict(s.options), s.model_fingerprint, s.expected_version,
            s.append, s.index_kind, s.metric, dict(s.build_params),
            s.query_position if s.HasField("query_position") else None,
        )  # fmt: skip


@dataclass
class BuildJob:
    job_id: str
    tenant: str
    spec: BuildSpec
    state: str
    base_version: int
    worker_id: str
    stage: str
    prefix_tokens: int
    tokens_prefilled: int
    num_layers: int
    layers_fitted: int
    total_bytes: int
    bytes_uploaded: int
    version: int
    error: str
    attempts: int
    created_at: float
    updated_at: float
    lease_until: float
    prefix_chars: int
    trace_count: int

    @property
    def final(self) -> bool:
        return self.state in FINAL

    @classmethod
    def from_pb(cls, m: pb.BuildJob) -> BuildJob:
        return cls(
            m.job_id, m.tenant, BuildSpec.from_pb(m.spec), STATES[m.state - 1] if m.state else
            "unknown", m.base_version, m.worker_id, m.stage, m.prefix_tokens, m.tokens_prefilled,
            m.num_layers, m.layers_fitted, m.total_bytes, m.bytes_uploaded, m.version, m.error,
            m.attempts, _seconds(m.created_at), _seconds(m.updated_at), _seconds(m.lease_until),
            m.prefix_chars, m.trace_count,
        )  # fmt: skip


def _seconds(ts) -> float:
    return ts.seconds + ts.nanos / 1e9
