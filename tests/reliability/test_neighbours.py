"""Noisy neighbour (a short bench.reliability.neighbours run): one tenant's Watch streams and
heavy Lookups leave another tenant's calls answered (no call of the quiet tenant times out).
The 2x p99 target is a benchmark figure (python -m bench.reliability), not asserted here."""

from __future__ import annotations

from bench.reliability import neighbours


def test_a_noisy_tenant_does_not_starve_another_tenants_calls(tmp_path):
    report = neighbours.run(tmp_path, phase_s=3, streams=80, threads=2, heavy_q=512, deadline_s=2.0)
    assert report.noisy.get("streams_requested") == 80, report.noisy
    assert report.victim_calls > 20
    assert not report.victim_failures, report.victim_failures
