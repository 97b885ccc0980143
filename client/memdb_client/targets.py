"""Where a client connects: one server address or several (`a:1,b:2,c:3`), as a gRPC target,
with client-side round_robin load balancing and retries of idempotent calls on UNAVAILABLE.

Several addresses become one static target (`ipv4:...` / `ipv6:...`; host names are resolved
once, here), so every call goes to the next ready server and a dead one is skipped. Unary calls
that change nothing (Lookup, reads of prefixes, tenants, keys and stats, health) are retried by
gRPC itself on UNAVAILABLE, on another server; writes are not (a write whose server died fails
cleanly: nothing was published, see the cluster backend). The streaming reads are not given to
gRPC's retries: with a retryPolicy, grpcio 1.85's retry filter never ends a server-streaming
call whose connection dies before the server's first answer, deadline or not (a FetchMemory in
flight when its node was killed hung for good). MemdbClient retries FetchMemory itself, within
the call's deadline; a Watch fails with UNAVAILABLE and its caller opens it again. Knows
nothing of memdb's messages.
"""

from __future__ import annotations

import ipaddress
import json
import socket

IDEMPOTENT = {  # unary only: no server-streaming method (FetchMemory, Watch), see above
    "memdb.v1.MemoryService": ("Lookup",),
    "memdb.v1.AdminService": ("GetPrefix", "ListPrefixes", "ListTenants", "ListApiKeys", "Stats"),
    "grpc.health.v1.Health": ("Check",),
}
RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config() -> str:
    names = [{"service": s, "method": m} for s, methods in IDEMPOTENT.items() for m in methods]
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [{"name": names, "retryPolicy": RETRY_POLICY}],
        }
    )


def split_addresses(address: str) -> list[str]:
    """`a:1, b:2` -> ["a:1", "b:2"] (ValueError without a port)."""
    parts = [a.strip() for a in address.split(",") if a.strip()]
    for part in parts:
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a memdb server address must be HOST:PORT, got {part!r}")
    return parts


def channel_target(address: str) -> str:
    """The gRPC target of one address (as given) or of several (one static list)."""
    parts = split_addresses(address)
    if len(parts) == 1:
        return parts[0]
    resolved = [_resolve(p) for p in parts]
    families = {"ipv6" if a.startswith("[") else "ipv4" for a in resolved}
    if len(families) > 1:
        raise ValueError(f"mix of IPv4 and IPv6 server addresses in {address!r}")
    return f"{families.pop()}:{','.join(resolved)}"


def _resolve(part: str) -> str:
    host, _, port = part.rpartition(":")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = ipaddress.ip_address(
            socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][4][0]
        )
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def channel_options(address: str) -> list[tuple[str, object]]:
    """Balancing and retry options; with several named hosts, TLS checks the first name."""
    options: list[tuple[str, object]] = [
        ("grpc.service_config", service_config()),
        ("grpc.enable_retries", 1),
    ]
    parts = split_addresses(address)
    host = parts[0].rpartition(":")[0].strip("[]")
    if len(parts) > 1 and not _is_ip(host):
        options.append(("grpc.ssl_target_name_override", host))
    return options


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
