"""What `memdb-admin` prints: aligned tables for people, JSON for scripts, progress bars.

Results go to stdout; messages, warnings and progress bars go to stderr, so `--json` output
can always be piped. Knows nothing of gRPC or of how memories are built.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, is_dataclass
from datetime import UTC, datetime
from typing import Any

import click

from memdb_client.types import ApiKeyInfo, PrefixInfo, Stats, TenantInfo


# -- plain values --------------------------------------------------------------------------------
def human_bytes(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_time(t: datetime | None) -> str:
    if t is None or t.timestamp() <= 0:
        return "-"
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def human_duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    parts = [f"{d}d"] if d else []
    parts += [f"{h}h"] if h or d else []
    parts += [f"{m}m"] if m or h or d else []
    return " ".join([*parts, f"{s}s"])


def short_fingerprint(fp: str, n: int = 12) -> str:
    algo, _, digest = fp.partition(":")
    return f"{algo}:{digest[:n]}" if digest else fp[: n + 7]


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, datetimes and numpy scalars as plain JSON values (datetimes: ISO 8601)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, datetime):
        return obj.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return obj.item()
    return obj


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(to_jsonable(obj), indent=2, sort_keys=True))


# -- tables --------------------------------------------------------------------------------------
def table(headers: list[str], rows: list[list[Any]], *, empty: str = "(none)") -> str:
    """Left-aligned text columns (numbers right-aligned), a header and a rule."""
    if not rows:
        return empty
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in cells) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        out = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def fields(pairs: list[tuple[str, Any]]) -> str:
    """`key: value` lines with the values aligned."""
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in pairs)


def _is_number(s: str) -> bool:
    try:
        float(s.replace(",", ""))
    except ValueError:
        return False
    return True


# -- the objects of the API ----------------------------------------------------------------------
def prefix_rows(prefixes: list[PrefixInfo]) -> str:
    rows = [
        [
            p.name,
            p.version,
            p.num_layers,
            p.budget,
            p.token_count,
            human_bytes(p.bytes),
            short_fingerprint(p.model_fingerprint),
            human_time(p.updated_at),
        ]
        for p in prefixes
    ]
    head = ["NAME", "VERSION", "LAYERS", "BUDGET", "TOKENS", "SIZE", "MODEL", "UPDATED"]
    return table(head, rows, empty="(no prefixes)")


def prefix_detail(p: PrefixInfo) -> str:
    shape = (
        f"{p.num_layers} layers x {p.num_groups} groups x {p.budget} entries "
        f"(key dim {p.key_dim}, {p.heads_per_group} head(s) of dim {p.head_dim})"
    )
    pairs: list[tuple[str, Any]] = [
        ("name", p.name),
        ("tenant", p.tenant),
        ("version", p.version),
        ("model", p.model_fingerprint),
        ("budget", p.budget),
        ("layers", p.num_layers),
        ("shape", shape),
        ("dtype", p.dtype),
        ("tokens", p.token_count),
        ("size", f"{human_bytes(p.bytes)} ({p.bytes} bytes)"),
        ("index", f"{p.index_kind or '-'} / {p.metric or '-'}"),
        ("extra tensors", ", ".join(p.extra_tensors) or "-"),
        ("created", human_time(p.created_at)),
        ("updated", human_time(p.updated_at)),
    ]
    text = fields(pairs)
    if p.build_params:
        width = max(len(k) for k in p.build_params)
        lines = [f"  {k:<{width}}  {_clip(v)}" for k, v in sorted(p.build_params.items())]
        text += "\nbuild parameters:\n" + "\n".join(lines)
    return text


def _clip(v: str, n: int = 100) -> str:
    v = v.replace("\n", "\\n")
    return v if len(v) <= n else v[: n - 3] + "..."


def tenant_rows(tenants: list[TenantInfo]) -> str:
    rows = [
        [
            t.name,
            t.num_prefixes,
            human_bytes(t.bytes),
            human_bytes(t.max_bytes) if t.max_bytes else "unlimited",
            t.max_prefixes or "unlimited",
            human_time(t.created_at),
        ]
        for t in tenants
    ]
    head = ["TENANT", "PREFIXES", "SIZE", "MAX SIZE", "MAX PREFIXES", "CREATED"]
    return table(head, rows, empty="(no tenants)")


def key_rows(keys: list[ApiKeyInfo]) -> str:
    rows = [
        [k.key_id, k.tenant, k.role, k.description or "-", human_time(k.created_at)] for k in keys
    ]
    return table(["KEY ID", "TENANT", "ROLE", "DESCRIPTION", "CREATED"], rows, empty="(no keys)")


def status_text(address: str, health: str, stats: Stats | None) -> str:
    pairs: list[tuple[str, Any]] = [("server", address), ("health", health)]
    if stats is None:
        return fields(pairs) + "\n(no API key: pass --api-key or set MEMDB_API_KEY for statistics)"
    pct = 100.0 * stats.store_bytes / stats.map_size if stats.map_size else 0.0
    pairs += [
        ("version", stats.server_version),
        ("uptime", human_duration(stats.uptime_s)),
        (
            "store",
            f"{human_bytes(stats.store_bytes)} used of a {human_bytes(stats.map_size)} "
            f"map ({pct:.1f}%)",
        ),
        ("tenants", stats.num_tenants),
        ("prefixes", stats.num_prefixes),
        (
            "index cache",
            f"{human_bytes(stats.index_cache_bytes)}, {stats.index_cache_hits} "
            f"hits, {stats.index_cache_misses} misses",
        ),
    ]
    rows = [[t, n, human_bytes(b)] for t, (n, b) in sorted(stats.tenants.items())]
    text = fields(pairs) + "\n\n" + table(["TENANT", "PREFIXES", "SIZE"], rows)
    if stats.nodes:  # a cluster: its live nodes
        text += "\n\n" + table(["NODE", "ADDRESS"], [list(n) for n in stats.nodes])
    return text


# -- progress ------------------------------------------------------------------------------------
class ByteProgress:
    """A bytes progress bar on stderr (tqdm if installed, else silent); a context manager."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # the client-only install may lack tqdm: no bar then
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(
                    total=total or None,
                    desc=desc,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    file=sys.stderr,
                    leave=True,
                )

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
