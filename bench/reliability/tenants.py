"""Tenants and API keys the campaign's parts set up through the root key of a server.

Knows nothing of the checks.
"""

from __future__ import annotations

from memdb_client import MemdbClient


def make_tenant(root: MemdbClient, name: str, roles=("admin", "writer", "reader"), **quotas):
    """Create tenant `name` (if missing) and one key per role: {role: (key, key_id)}."""
    if name not in {t.name for t in root.list_tenants()}:
        root.create_tenant(name, **quotas)
    keys = {}
    for role in roles:
        key, info = root.create_api_key(role, tenant=name)
        keys[role] = (key, info.key_id)
    return keys
