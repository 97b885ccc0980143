"""A short soak (bench.reliability.soak): mixed traffic runs without errors, every window
serves Lookups, Watch streams follow the updates, and the run stops by itself."""

from __future__ import annotations

import math

from bench.reliability import soak


def test_a_short_soak_serves_every_window_without_errors(tmp_path):
    report = soak.run(tmp_path, seconds=6, window_s=2, seed=1)
    assert len(report.soak_p99_ms) == 3 and not any(map(math.isnan, report.soak_p99_ms))
    assert report.lookups > 50 and report.updates > 3 and report.watch_events > 0, report
    assert not report.errors, report.errors
    assert report.seconds < 60
