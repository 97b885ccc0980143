"""The worker's configuration: one typed, validated object per `memdb-worker` process.

Precedence: command-line flags > `MEMDB_*` environment variables (`MEMDB_SERVER`,
`MEMDB_API_KEY`, `MEMDB_MODEL`, ...) > a TOML config file (`--config` or `MEMDB_CONFIG`) > the
defaults below. This module knows nothing of how the settings are used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

MiB = 1 << 20
GiB = 1 << 30


class WorkerConfig(BaseSettings):
    """Every knob of `memdb-worker`. Environment names are `MEMDB_<FIELD>` in upper case."""

    model_config = SettingsConfigDict(env_prefix="MEMDB_", extra="forbid")

    config: Path | None = Field(None, description="TOML file with any of these settings")
    server: str = Field("127.0.0.1:50051", description="memdb server HOST:PORT[,HOST:PORT...]")
    api_key: SecretStr = Field(
        SecretStr(""), description="API key of the tenant (reader or up; worker: build jobs too)"
    )
    tls: bool = Field(False, description="connect to the server with TLS")
    model: str = Field("default", description="'default' (SmolLM2 GGUF), a .gguf file or folder")
    model_name: str = Field("", description="model id in the API; default: the model's file name")
    device: str = Field("cpu", description="cpu, cuda, cuda:1, ...")
    dtype: Literal["", "float32", "bfloat16", "float16"] = Field(
        "", description="model dtype; default float32 on CPU, bfloat16 on GPUs"
    )
    listen: str = Field("127.0.0.1:8000", description="HTTP address; port 0 picks a free one")
    memory_mode: Literal["cache", "remote"] = Field(
        "cache", description="cache: FetchMemory into device memory; remote: Lookup per layer"
    )
    cache_bytes: int = Field(1 * GiB, ge=0, description="device bytes of cached memories (LRU)")
    live_positions: Literal["after_prefix", "zero"] = "after_prefix"
    max_batch: int = Field(8, ge=1, description="requests decoded together")
    prefix_cache_bytes: int = Field(
        512 * MiB, ge=0,
        description="device bytes of cached prompt prefixes' KV (automatic prefix caching; 0: off)",
    )  # fmt: skip
    prefix_cache_min_tokens: int = Field(256, ge=1, description="shortest prefix worth caching")
    static_live_tokens: int = Field(
        0, ge=0,
        description="live tokens per row of a static KV cache for CUDA-graphed decoding of "
        "batches with one memory/prefix (0: off, transformers' forward)",
    )  # fmt: skip
    batch_wait_ms: float = Field(5.0, ge=0, description="wait for more requests before a batch")
    max_tokens_limit: int = Field(1024, ge=1, description="largest max_tokens a request may ask")
    default_max_tokens: int = Field(16, ge=1)
    lookup_timeout_s: float = Field(10.0, gt=0, description="deadline of one remote Lookup")
    reconnect_max_s: float = Field(2.0, gt=0, description="longest wait between reconnects")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")
    build_jobs: bool = Field(
        True, description="claim and run the server's build jobs for this model (needs a "
        "worker key; builds load a second copy of the model on the first job)"
    )  # fmt: skip
    build_poll_s: float = Field(1.0, gt=0, description="seconds between polls for build jobs")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    ready_file: Path | None = Field(
        None, description="write {address, port} as JSON here once serving"
    )

    @field_validator("listen", "server")
    @classmethod
    def _has_port(cls, v: str) -> str:
        host, _, port = v.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"must be HOST:PORT, got {v!r}")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        given: Any = init_settings().get("config") or os.environ.get("MEMDB_CONFIG")
        if given:
            path = Path(given)
            if not path.is_file():
                raise ValueError(f"config file {path} does not exist")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def load_config(**flags: Any) -> WorkerConfig:
    """Build the config from flags (None means 'not given'), the environment and the file."""
    return WorkerConfig(**{k: v for k, v in flags.items() if v is not None})
