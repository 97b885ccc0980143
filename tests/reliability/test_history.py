"""Concurrent Lookup / FetchMemory during updates and deletes (a seeded sample of
bench.reliability.history): every answer comes from one version current during the call."""

from __future__ import annotations

from bench.reliability import history
from bench.reliability.history import Answer, History, HistoryReport, State


def test_every_answer_comes_from_one_version_current_during_the_call(tmp_path):
    report = history.run(tmp_path, seconds=6, seed=5)
    assert report.updates > 10 and report.deletes > 0 and report.lookups > 50, report
    assert report.fetches > 10 and not report.errors, report.errors
    assert report.violations == 0, report.problems


def _checked(answers: list[Answer]) -> HistoryReport:
    h = History(["n"], seed=0)
    # tag 1 (v1) made in [0, 1]; tag 2 (v2) made in [2, 3]; deleted in [4, 5]
    h.states["n"] = [
        State(1, 1, 0.0, 1.0, 3.0),
        State(2, 2, 2.0, 3.0, 5.0, True),
        State(None, 0, 4.0, 5.0),
    ]
    h.answers = answers
    report = HistoryReport()
    h.check(report)
    return report


def test_the_checker_accepts_only_answers_possible_at_some_moment_of_the_call():
    ok = [
        Answer("lookup", "n", 0.5, 0.6, 1, 1),
        Answer("lookup", "n", 2.5, 2.6, 1, 1),
        Answer("fetch", "n", 2.5, 2.6, 2, 2),
        Answer("lookup", "n", 4.5, 4.6, 2, 2),
        Answer("lookup", "n", -1, -0.5, None, 0),
        Answer("fetch", "n", 4.5, 6, None, 0),
    ]
    assert _checked(ok).violations == 0
    bad = _checked(
        [
            Answer("lookup", "n", 3.5, 3.6, 1, 1),  # v1 was replaced by 3.0: stale
            Answer("lookup", "n", 5.5, 5.6, 2, 2),  # the delete returned at 5.0
            Answer("lookup", "n", 1.2, 1.5, None, 0),  # existed throughout
            Answer("fetch", "n", 0.5, 0.6, None, 1, mixed=True),
            Answer("lookup", "n", 2.5, 2.6, 2, 1),  # tag 2 was written as version 2
        ]
    )
    assert (bad.stale, bad.served_after_delete, bad.spurious_not_found, bad.mixed) == (1, 1, 1, 2)
