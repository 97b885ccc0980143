"""How `memdb-admin` reaches a builder, and the build parameters a memory carries to the server.

Builds run in the worker: `local_builder` loads the entry point "local" of the group
`memdb.builders` (the worker's `memdb_worker.build.local`, registered in pyproject.toml), so
this package imports nothing of the worker. Without the worker extra the build commands say
what to install and every other command still runs. Build options are
`memdb.build_options.BuildOptions`, read and checked without the worker. Errors a person can
fix raise `memdb.errors.BuildError` with one line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

from memdb.build_options import BuildOptions, build_params, specs
from memdb.errors import BuildError

BUILDERS = "memdb.builders"  # the entry point group of builders
INSTALL_WORKER = "pip install 'memdb[worker]'"


def local_builder() -> ModuleType:
    """The builder that runs on this machine (load_model, tokenize, check_budget,
    prefill_chunks, build, append_chunk, ...); BuildError saying what to install if none is."""
    found = entry_points(group=BUILDERS, name="local")
    if not found:
        raise BuildError(
            f"building a memory needs the worker (no '{BUILDERS}' entry point 'local'): "
            f"{INSTALL_WORKER}"
        )
    try:
        return next(iter(found)).load()
    except ImportError as exc:
        raise BuildError(
            f"building a memory needs the worker extra ({exc.name or exc} is missing): "
            f"{INSTALL_WORKER}"
        ) from None


def make_options(values: Mapping[str, Any]) -> BuildOptions:
    """BuildOptions from the CLI's values of its fields (None or absent = the default)."""
    given = {s.name: values[s.name] for s in specs() if values.get(s.name) is not None}
    try:
        return BuildOptions(**given)
    except ValueError as exc:
        raise BuildError(f"bad build option: {exc}") from None


def server_params(metadata: dict[str, str], extra: dict[str, Any]) -> dict[str, str]:
    """The build parameters stored on the server: the builder's options and key space, the
    prefix layout and where the inputs came from (flat strings, each at most 4096 chars)."""
    out: dict[str, str] = {}
    try:
        params = build_params(metadata)
    except ValueError:
        params = {}
    for k, v in params.items():
        out[k] = v if isinstance(v, str) else json.dumps(v)
    for k in (
        "key_mode",
        "granularity",
        "common_position",
        "whiten",
        "entry_state",
        "lse_correction",
        "budget",
        "prefix_length",
        "token_count",
        "chunk_lengths",
        "scaling",
        "appended_chunks",
        "heldout_errors",  # each layer's error on held-out traces (BuildOptions.holdout)
    ):
        if k in metadata:
            out[k] = metadata[k]
    for k, v in extra.items():
        if v is not None:
            out[k] = v if isinstance(v, str) else json.dumps(v)
    return {k[:256]: v[:4096] for k, v in out.items()}


def heldout_summary(metadata: dict[str, str]) -> str | None:
    """One line on a build's held-out errors (`heldout_errors`): the median layer's and the
    three hardest layers' relative output error; None without them."""
    raw = metadata.get("heldout_errors")
    if not raw:
        return None
    got = json.loads(raw)
    rel = got["rel_err"]
    median = sorted(rel)[len(rel) // 2]
    worst = sorted(range(len(rel)), key=lambda i: -rel[i])[:3]
    hard = ", ".join(f"layer {i} {rel[i]:.3f}" for i in worst)
    return (f"held-out error ({got['records']} queries of {got['traces']} traces): median layer "
            f"{median:.3f}, hardest {hard}")  # fmt: skip
