"""Tenant isolation over random interleavings (a seeded sample of bench.reliability.isolation)
and revocation of a key with an open Watch stream."""

from __future__ import annotations

from bench.reliability import isolation
from bench.reliability.isolation import IsolationReport, revoked_watch
from memdb_client import MemdbClient
from memdb_server.process import server_process


def test_no_tenant_sees_alters_or_learns_of_another_tenants_prefixes(tmp_path):
    report = isolation.run(tmp_path, ops=120, seed=9, max_seconds=60)
    assert report.ops == 120 and report.foreign_name_probes > 5, report
    assert report.cross_tenant_leaks == 0, report.problems


def test_a_revoked_key_gets_no_event_after_the_revocation(tmp_path):
    report = IsolationReport()
    with server_process(tmp_path) as s, MemdbClient(s.address, s.admin_key) as root:
        revoked_watch(s.address, root, report)
    assert report.revoked_key_events_before == 1  # the stream was live before the revocation
    assert report.revoked_key_events == 0 and not report.revoked_stream_open, report.problems
