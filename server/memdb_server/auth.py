"""API keys, roles and the authenticated caller.

Owns: the key format (`mdb_<key_id>_<secret>`, shown once at creation), hashing (SHA-256 of the
secret, compared in constant time), the role each RPC needs, and the `Principal` of the current
call (set by `AuthHook`, read by the servicers through `current()`). The tenant always
comes from the key, never from a request body. Knows nothing of storage beyond `get_key`.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from memdb.errors import PermissionDenied, Unauthenticated
from memdb_server.interceptors import Call, Hook

log = logging.getLogger(__name__)

ROLES = ("reader", "writer", "admin", "worker")
ROOT = "root"  # the configured admin key: admin of tenant "default" and of every tenant
ROOT_KEY_ID = "root"  # the key id of the root key's Principal (it is never stored)
# a worker key is a writer of its own tenant that may also claim every tenant's build jobs
# (build_service); only the root key creates one
WORKER = "worker"
_RANK = {"reader": 0, "writer": 1, WORKER: 1, "admin": 2, ROOT: 3}
DEFAULT_TENANT = "default"

# The least role each RPC needs (short method name); health is not authenticated at all.
METHOD_ROLES: dict[str, str] = {
    "Lookup": "reader",
    "FetchMemory": "reader",
    "Watch": "reader",
    "GetPrefix": "reader",
    "ListPrefixes": "reader",
    "Stats": "reader",
    "PutPrefix": "writer",
    "DeletePrefix": "writer",
    "CreateApiKey": "admin",
    "ListApiKeys": "admin",
    "RevokeApiKey": "admin",
    "CreateTenant": ROOT,
    "ListTenants": ROOT,
    "DeleteTenant": ROOT,
    "SubmitBuild": "writer",
    "CancelBuild": "writer",
    "GetBuild": "reader",
    "ListBuilds": "reader",
    "WatchBuild": "reader",
    "ClaimBuild": WORKER,
    "ReportBuild": WORKER,
}
UNAUTHENTICATED_SERVICES = ("/grpc.health.v1.Health/",)
DEFAULT_ROLE = "reader"  # e.g. server reflection


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant their key belongs to and their role."""

    tenant: str
    role: str
    key_id: str

    @property
    def is_root(self) -> bool:
        return self.role == ROOT

    def has(self, role: str) -> bool:
        if role == WORKER:  # not a rank: admins of a tenant build nothing for others
            return self.role in (WORKER, ROOT)
        return _RANK[self.role] >= _RANK[role]

    def require(self, role: str, what: str) -> None:
        if not self.has(role):
            raise PermissionDenied(
                f"{what} needs the '{role}' role; this key ({self.key_id}) is '{self.role}'"
            )

    def require_tenant(self, tenant: str) -> None:
        """Admins manage their own tenant only; the root key manages every tenant."""
        if not self.is_root and tenant != self.tenant:
            raise PermissionDenied(f"this key belongs to tenant '{self.tenant}', not '{tenant}'")


class KeyLookup(Protocol):
    def get_key(self, key_id: str): ...  # -> KeyRecord | None


def new_key() -> tuple[str, str, str]:
    """A fresh API key: (key_id, full key to hand out once, hash to store)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return key_id, f"mdb_{key_id}_{secret}", hash_secret(secret)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(key: str) -> tuple[str, str]:
    """(key_id, secret) of `mdb_<key_id>_<secret>`; Unauthenticated if malformed."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != "mdb" or not parts[1] or not parts[2]:
        raise Unauthenticated("malformed API key: expected 'mdb_<id>_<secret>'")
    return parts[1], parts[2]


class Authenticator:
    """Turns the key of a call into a Principal."""

    def __init__(self, keys: KeyLookup, root_key: str) -> None:
        self._keys = keys
        self._root_hash = hash_secret(root_key)

    def authenticate(self, key: str | None) -> Principal:
        if not key:
            raise Unauthenticated(
                "missing API key: send metadata 'authorization: Bearer <key>' (or 'x-api-key')"
            )
        if hmac.compare_digest(hash_secret(key), self._root_hash):
            return Principal(tenant=DEFAULT_TENANT, role=ROOT, key_id=ROOT_KEY_ID)
        key_id, secret = parse_key(key)
        rec = self._keys.get_key(key_id)
        if rec is None or not hmac.compare_digest(hash_secret(secret), rec.secret_hash):
            raise Unauthenticated("invalid or revoked API key")
        return Principal(tenant=rec.tenant, role=rec.role, key_id=key_id)


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "memdb_principal", default=None
)


def current() -> Principal:
    """The Principal of the call being served (set by AuthHook)."""
    p = _current.get()
    if p is None:
        raise Unauthenticated("no authenticated caller")
    return p


def key_from_metadata(metadata: tuple) -> str | None:
    for k, v in metadata or ():
        if k == "authorization" and v.lower().startswith("bearer "):
            return v[7:].strip()
        if k == "x-api-key":
            return v.strip()
    return None


class AuthHook(Hook):
    """Authenticates every call but health and checks the role its method needs."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    def applies(self, method: str) -> bool:
        return not method.startswith(UNAUTHENTICATED_SERVICES)

    @contextmanager
    def around(self, call: Call) -> Iterator[None]:
        principal = self._auth.authenticate(key_from_metadata(call.invocation_metadata()))
        principal.require(METHOD_ROLES.get(call.short, DEFAULT_ROLE), call.short)
        token = _current.set(principal)
        try:
            yield
        finally:
            _current.reset(token)
