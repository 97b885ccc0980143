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
    __slots__ = ("name", "mode", "expected_version", "model_fingerprint", "num_layers", "token_count", "build_params", "index_kind", "metric", "total_bytes")
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
    def __init__(self, name: _Optional[str] = ..., mode: _Optional[_Union[PutMode, str]] = ..., expected_version: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., num_layers: _Optional[int] = ..., token_count: _Optional[int] = ..., build_params: _Optional[_Mapping[str, str]] = ..., index_kind: _Optional[str] = ..., metric: _Optional[str] = ..., total_bytes: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("name", "model_fingerprint", "version", "chunk_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_fingerprint: str
    version: int
    chunk_bytes: int
    def __init__(self, name: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., version: _Optional[int] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

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

class StatsResponse(_message.Message):
    __slots__ = ("server_version", "store_bytes", "map_size", "num_tenants", "num_prefixes", "tenants", "index_cache_bytes", "index_cache_hits", "index_cache_misses", "uptime_s")
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
    def __init__(self, server_version: _Optional[str] = ..., store_bytes: _Optional[int] = ..., map_size: _Optional[int] = ..., num_tenants: _Optional[int] = ..., num_prefixes: _Optional[int] = ..., tenants: _Optional[_Iterable[_Union[TenantStats, _Mapping]]] = ..., index_cache_bytes: _Optional[int] = ..., index_cache_hits: _Optional[int] = ..., index_cache_misses: _Optional[int] = ..., uptime_s: _Optional[float] = ...) -> None: ...
