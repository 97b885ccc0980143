"""Fuzzed requests against a real server (a seeded sample of bench.reliability.fuzz): every
answer is a deliberate status, never UNKNOWN / INTERNAL, and the server never dies; on one
node of the local backend and on one of the cluster backend (real etcd and Redis Cluster)."""

from __future__ import annotations

from bench.reliability import fuzz


def test_fuzzed_requests_get_deliberate_statuses_and_never_crash_the_server(tmp_path):
    report = fuzz.run(tmp_path, cases_n=300, seed_=3, max_seconds=120)
    assert report.cases == 300, report
    assert set(report.by_kind) == {"message", "put", "raw", "bounds"}, report.by_kind
    assert report.codes.get("OK", 0) > 10 and report.codes.get("INVALID_ARGUMENT", 0) > 10
    assert report.crashes == 0 and report.unresponsive == 0, report.examples
    assert report.internal_errors == 0, (report.internal_by_method, report.examples)


def test_fuzzed_requests_to_a_cluster_node_get_deliberate_statuses(tmp_path, cluster_planes):
    report = fuzz.run(tmp_path, cases_n=150, seed_=4, max_seconds=120, backend="cluster",
                      planes=cluster_planes)  # fmt: skip
    assert report.cases == 150 and report.backend == "cluster", report
    assert report.codes.get("OK", 0) > 5 and report.codes.get("INVALID_ARGUMENT", 0) > 5
    assert report.crashes == 0 and report.unresponsive == 0, report.examples
    assert report.internal_errors == 0, (report.internal_by_method, report.examples)
