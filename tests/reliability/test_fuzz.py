"""Fuzzed requests against a real server (a seeded sample of bench.reliability.fuzz): every
answer is a deliberate status, never UNKNOWN / INTERNAL, and the server never dies."""

from __future__ import annotations

from bench.reliability import fuzz


def test_fuzzed_requests_get_deliberate_statuses_and_never_crash_the_server(tmp_path):
    report = fuzz.run(tmp_path, cases_n=300, seed_=3, max_seconds=120)
    assert report.cases == 300 and set(report.by_kind) == {"message", "put", "raw"}, report
    assert report.codes.get("OK", 0) > 10 and report.codes.get("INVALID_ARGUMENT", 0) > 10
    assert report.crashes == 0 and report.unresponsive == 0, report.examples
    assert report.internal_errors == 0, (report.internal_by_method, report.examples)
