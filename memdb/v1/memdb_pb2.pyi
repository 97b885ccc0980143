import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PutMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUT_MODE_UNSPECIFIED: _ClassVar[PutMode]
    PUT_MODE_CREATE: _ClassVar[PutMode]
    PUT_MODE_UPDATE: _ClassVar[PutMode]
    PUT_MODE_UPSERT: _ClassVar[PutMode]

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_PUT: _ClassVar[EventType]
    EVENT_TYPE_DELETE: _ClassVar[EventType]

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_READER: _ClassVar[Role]
    ROLE_WRITER: _ClassVar[Role]
    ROLE_ADMIN: _ClassVar[Role]
    ROLE_WORKER: _ClassVar[Role]

class BuildState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUILD_STATE_UNSPECIFIED: _ClassVar[BuildState]
    BUILD_STATE_QUEUED: _ClassVar[BuildState]
    BUILD_STATE_CLAIMED: _ClassVar[BuildState]
    BUILD_STATE_RUNNING: _ClassVar[BuildState]
    BUILD_STATE_DONE: _ClassVar[BuildState]
    BUILD_STATE_FAILED: _ClassVar[BuildState]
    BUILD_STATE_CANCELLED: _ClassVar[BuildState]
PUT_MODE_UNSPECIFIED: PutMode
PUT_MODE_CREATE: PutMode
PUT_MODE_UPDATE: PutMode
PUT_MODE_UPSERT: PutMode
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_PUT: EventType
EVENT_TYPE_DELETE: EventType
ROLE_UNSPECIFIED: Role
ROLE_READER: Role
ROLE_WRITER: Role
ROLE_ADMIN: Role
ROLE_WORKER: Role
BUILD_STATE_UNSPECIFIED: BuildState
BUILD_STATE_QUEUED: BuildState
BUILD_STATE_CLAIMED: BuildState
BUILD_STATE_RUNNING: BuildState
BUILD_STATE_DONE: BuildState
BUILD_STATE_FAILED: BuildState
BUILD_STATE_CANCELLED: BuildState

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PrefixInfo(_message.Message):
    __slots__ = ("tenant", "name", "version", "model_fingerprint", "num_layers", "num_groups", "budget", "key_dim", "heads_per_group", "head_dim", "dtype", "token_count", "build_params", "extra_tensors", "bytes", "index_kind", "metric", "created_at", "updated_at")
    class BuildParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_GROUPS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    KEY_DIM_FIELD_NUMBER: _ClassVar[int]
    HEADS_PER_GROUP_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    BUILD_PARAMS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_TENSORS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    INDEX_KIND_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    version: int
    model_fingerprint: str
    num_layers: int
    num_groups: int
    budget: int
    key_dim: int
    heads_per_group: int
    head_dim: int
    dtype: str
    token_count: int
    build_params: _containers.ScalarMap[str, str]
    extra_tensors: _containers.RepeatedScalarFieldContainer[str]
    bytes: int
    index_kind: str
    metric: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_groups: _Optional[int] = ..., budget: _Optional[int] = ..., key_dim: _Optional[int] = ..., heads_per_group: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., token_count: _Optional[int] = ..., build_params: _Optional[_Mapping[str, str]] = ..., extra_tensors: _Optional[_Iterable[str]] = ..., bytes: _Optional[int] = ..., index_kind: _Optional[str] = ..., metric: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PutPrefixRequest(_message.Message):
    __slots__ = ("header", "chunk", "commit")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    header: PutPrefixHeader
    chunk: ShardChunk
    commit: PutPrefixCommit
    def __init__(self, header: _Optional[_Union[PutPrefixHeader, _Mapping]] = ..., chunk: _Optional[_Union[ShardChunk, _Mapping]] = ..., commit: _Optional[_Union[PutPrefixCommit, _Mapping]] = ...) -> None: ...

class PutPrefixCommit(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PutPrefixHeader(_message.Message):
    __slots__ = ("name", "mode", "expected_version", "model_fingerprint", "num_layers", "token_count", "build_params", "index_kind", "metric", "total_bytes", "build_job", "build_worker")
    class BuildParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    BUILD_PARAMS_FIELD_NUMBER: _ClassVar[int]
    INDEX_KIND_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUILD_JOB_FIELD_NUMBER: _ClassVar[int]
    BUILD_WORKER_FIELD_NUMBER: _ClassVar[int]
    name: str
    mode: PutMode
    expected_version: int
    model_fingerprint: str
    num_layers: int
    token_count: int
    build_params: _containers.ScalarMap[str, str]
    index_kind: str
    metric: str
    total_bytes: int
    build_job: str
    build_worker: str
    def __init__(self, name: _Optional[str] = ..., mode: _Optional[_Union[PutMode, str]] = ..., expected_version: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., num_layers: _Optional[int] = ..., token_count: _Optional[int] = ..., build_params: _Optional[_Mapping[str, str]] = ..., index_kind: _Optional[str] = ..., metric: _Optional[str] = ..., total_bytes: _Optional[int] = ..., build_job: _Optional[str] = ..., build_worker: _Optional[str] = ...) -> None: ...

class ShardChunk(_message.Message):
    __slots__ = ("layer", "data", "last")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    layer: int
    data: bytes
    last: bool
    def __init__(self, layer: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class GetPrefixRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListPrefixesRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "name_prefix")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAME_PREFIX_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    name_prefix: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., name_prefix: _Optional[str] = ...) -> None: ...

class ListPrefixesResponse(_message.Message):
    __slots__ = ("prefixes", "next_page_token")
    PREFIXES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    prefixes: _containers.RepeatedCompositeFieldContainer[PrefixInfo]
    next_page_token: str
    def __init__(self, prefixes: _Optional[_Iterable[_Union[PrefixInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeletePrefixRequest(_message.Message):
    __slots__ = ("name", "expected_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    expected_version: int
    def __init__(self, name: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class DeletePrefixResponse(_message.Message):
    __slots__ = ("deleted_version",)
    DELETED_VERSION_FIELD_NUMBER: _ClassVar[int]
    deleted_version: int
    def __init__(self, deleted_version: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("name", "layer", "model_fingerprint", "queries", "k", "include_states", "version", "extras")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STATES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    layer: int
    model_fingerprint: str
    queries: Tensor
    k: int
    include_states: bool
    version: int
    extras: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., layer: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., queries: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[int] = ..., include_states: _Optional[bool] = ..., version: _Optional[int] = ..., extras: _Optional[_Iterable[str]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("version", "ids", "scores", "out", "lse", "extras")
    class ExtrasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    OUT_FIELD_NUMBER: _ClassVar[int]
    LSE_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_FIELD_NUMBER: _ClassVar[int]
    version: int
    ids: Tensor
    scores: Tensor
    out: Tensor
    lse: Tensor
    extras: _containers.MessageMap[str, Tensor]
    def __init__(self, version: _Optional[int] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ..., out: _Optional[_Union[Tensor, _Mapping]] = ..., lse: _Optional[_Union[Tensor, _Mapping]] = ..., extras: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class FetchMemoryRequest(_message.Message):
    __slots__ = ("name", "model_fingerprint", "version", "chunk_bytes", "build_job", "build_worker")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUILD_JOB_FIELD_NUMBER: _ClassVar[int]
    BUILD_WORKER_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_fingerprint: str
    version: int
    chunk_bytes: int
    build_job: str
    build_worker: str
    def __init__(self, name: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., version: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., build_job: _Optional[str] = ..., build_worker: _Optional[str] = ...) -> None: ...

class FetchMemoryResponse(_message.Message):
    __slots__ = ("info", "chunk")
    INFO_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    info: PrefixInfo
    chunk: ShardChunk
    def __init__(self, info: _Optional[_Union[PrefixInfo, _Mapping]] = ..., chunk: _Optional[_Union[ShardChunk, _Mapping]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("names", "send_initial")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    SEND_INITIAL_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    send_initial: bool
    def __init__(self, names: _Optional[_Iterable[str]] = ..., send_initial: _Optional[bool] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("type", "name", "version", "model_fingerprint", "at")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    type: EventType
    name: str
    version: int
    model_fingerprint: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, type: _Optional[_Union[EventType, str]] = ..., name: _Optional[str] = ..., version: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Quotas(_message.Message):
    __slots__ = ("max_bytes", "max_prefixes")
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    max_bytes: int
    max_prefixes: int
    def __init__(self, max_bytes: _Optional[int] = ..., max_prefixes: _Optional[int] = ...) -> None: ...

class Tenant(_message.Message):
    __slots__ = ("name", "quotas", "created_at", "num_prefixes", "bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    quotas: Quotas
    created_at: _timestamp_pb2.Timestamp
    num_prefixes: int
    bytes: int
    def __init__(self, name: _Optional[str] = ..., quotas: _Optional[_Union[Quotas, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., num_prefixes: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class CreateTenantRequest(_message.Message):
    __slots__ = ("name", "quotas")
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    quotas: Quotas
    def __init__(self, name: _Optional[str] = ..., quotas: _Optional[_Union[Quotas, _Mapping]] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants",)
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[Tenant]
    def __init__(self, tenants: _Optional[_Iterable[_Union[Tenant, _Mapping]]] = ...) -> None: ...

class DeleteTenantRequest(_message.Message):
    __slots__ = ("name", "force")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    force: bool
    def __init__(self, name: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class DeleteTenantResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ApiKeyInfo(_message.Message):
    __slots__ = ("key_id", "tenant", "role", "description", "created_at")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    tenant: str
    role: Role
    description: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, key_id: _Optional[str] = ..., tenant: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., description: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("tenant", "role", "description")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    role: Role
    description: str
    def __init__(self, tenant: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., description: _Optional[str] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("info", "api_key")
    INFO_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    info: ApiKeyInfo
    api_key: str
    def __init__(self, info: _Optional[_Union[ApiKeyInfo, _Mapping]] = ..., api_key: _Optional[str] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKeyInfo]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKeyInfo, _Mapping]]] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class RevokeApiKeyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TenantStats(_message.Message):
    __slots__ = ("tenant", "num_prefixes", "bytes")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    num_prefixes: int
    bytes: int
    def __init__(self, tenant: _Optional[str] = ..., num_prefixes: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "address", "started_at")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    started_at: float
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., started_at: _Optional[float] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("server_version", "store_bytes", "map_size", "num_tenants", "num_prefixes", "tenants", "index_cache_bytes", "index_cache_hits", "index_cache_misses", "uptime_s", "nodes")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    STORE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAP_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_TENANTS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    INDEX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    INDEX_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    INDEX_CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    store_bytes: int
    map_size: int
    num_tenants: int
    num_prefixes: int
    tenants: _containers.RepeatedCompositeFieldContainer[TenantStats]
    index_cache_bytes: int
    index_cache_hits: int
    index_cache_misses: int
    uptime_s: float
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, server_version: _Optional[str] = ..., store_bytes: _Optional[int] = ..., map_size: _Optional[int] = ..., num_tenants: _Optional[int] = ..., num_prefixes: _Optional[int] = ..., tenants: _Optional[_Iterable[_Union[TenantStats, _Mapping]]] = ..., index_cache_bytes: _Optional[int] = ..., index_cache_hits: _Optional[int] = ..., index_cache_misses: _Optional[int] = ..., uptime_s: _Optional[float] = ..., nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class BuildSpec(_message.Message):
    __slots__ = ("name", "mode", "append", "expected_version", "prefix_text", "traces", "options", "budget", "model_fingerprint", "index_kind", "metric", "build_params", "query_position")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class BuildParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    APPEND_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TEXT_FIELD_NUMBER: _ClassVar[int]
    TRACES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    INDEX_KIND_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    BUILD_PARAMS_FIELD_NUMBER: _ClassVar[int]
    QUERY_POSITION_FIELD_NUMBER: _ClassVar[int]
    name: str
    mode: PutMode
    append: bool
    expected_version: int
    prefix_text: str
    traces: _containers.RepeatedScalarFieldContainer[str]
    options: _containers.ScalarMap[str, str]
    budget: int
    model_fingerprint: str
    index_kind: str
    metric: str
    build_params: _containers.ScalarMap[str, str]
    query_position: int
    def __init__(self, name: _Optional[str] = ..., mode: _Optional[_Union[PutMode, str]] = ..., append: _Optional[bool] = ..., expected_version: _Optional[int] = ..., prefix_text: _Optional[str] = ..., traces: _Optional[_Iterable[str]] = ..., options: _Optional[_Mapping[str, str]] = ..., budget: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., index_kind: _Optional[str] = ..., metric: _Optional[str] = ..., build_params: _Optional[_Mapping[str, str]] = ..., query_position: _Optional[int] = ...) -> None: ...

class BuildJob(_message.Message):
    __slots__ = ("job_id", "tenant", "spec", "state", "base_version", "worker_id", "stage", "prefix_tokens", "tokens_prefilled", "num_layers", "layers_fitted", "total_bytes", "bytes_uploaded", "version", "error", "attempts", "created_at", "updated_at", "lease_until", "prefix_chars", "trace_count")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PREFILLED_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FITTED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_UPLOADED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    LEASE_UNTIL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CHARS_FIELD_NUMBER: _ClassVar[int]
    TRACE_COUNT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    tenant: str
    spec: BuildSpec
    state: BuildState
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
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    lease_until: _timestamp_pb2.Timestamp
    prefix_chars: int
    trace_count: int
    def __init__(self, job_id: _Optional[str] = ..., tenant: _Optional[str] = ..., spec: _Optional[_Union[BuildSpec, _Mapping]] = ..., state: _Optional[_Union[BuildState, str]] = ..., base_version: _Optional[int] = ..., worker_id: _Optional[str] = ..., stage: _Optional[str] = ..., prefix_tokens: _Optional[int] = ..., tokens_prefilled: _Optional[int] = ..., num_layers: _Optional[int] = ..., layers_fitted: _Optional[int] = ..., total_bytes: _Optional[int] = ..., bytes_uploaded: _Optional[int] = ..., version: _Optional[int] = ..., error: _Optional[str] = ..., attempts: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lease_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., prefix_chars: _Optional[int] = ..., trace_count: _Optional[int] = ...) -> None: ...

class SubmitBuildRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: BuildSpec
    def __init__(self, spec: _Optional[_Union[BuildSpec, _Mapping]] = ...) -> None: ...

class GetBuildRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListBuildsRequest(_message.Message):
    __slots__ = ("limit", "include_finished")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FINISHED_FIELD_NUMBER: _ClassVar[int]
    limit: int
    include_finished: bool
    def __init__(self, limit: _Optional[int] = ..., include_finished: _Optional[bool] = ...) -> None: ...

class ListBuildsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[BuildJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[BuildJob, _Mapping]]] = ...) -> None: ...

class CancelBuildRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchBuildRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ClaimBuildRequest(_message.Message):
    __slots__ = ("worker_id", "model_fingerprint")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    model_fingerprint: str
    def __init__(self, worker_id: _Optional[str] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class ClaimBuildResponse(_message.Message):
    __slots__ = ("job", "lease_s")
    JOB_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    job: BuildJob
    lease_s: float
    def __init__(self, job: _Optional[_Union[BuildJob, _Mapping]] = ..., lease_s: _Optional[float] = ...) -> None: ...

class ReportBuildRequest(_message.Message):
    __slots__ = ("job_id", "worker_id", "state", "stage", "prefix_tokens", "tokens_prefilled", "num_layers", "layers_fitted", "total_bytes", "bytes_uploaded", "version", "error")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PREFILLED_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FITTED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_UPLOADED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    state: BuildState
    stage: str
    prefix_tokens: int
    tokens_prefilled: int
    num_layers: int
    layers_fitted: int
    total_bytes: int
    bytes_uploaded: int
    version: int
    error: str
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., state: _Optional[_Union[BuildState, str]] = ..., stage: _Optional[str] = ..., prefix_tokens: _Optional[int] = ..., tokens_prefilled: _Optional[int] = ..., num_layers: _Optional[int] = ..., layers_fitted: _Optional[int] = ..., total_bytes: _Optional[int] = ..., bytes_uploaded: _Optional[int] = ..., version: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class ReportBuildResponse(_message.Message):
    __slots__ = ("job", "lease_s")
    JOB_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    job: BuildJob
    lease_s: float
    def __init__(self, job: _Optional[_Union[BuildJob, _Mapping]] = ..., lease_s: _Optional[float] = ...) -> None: ...
