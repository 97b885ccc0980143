"""memdb_server.failpoints: the MEMDB_FAILPOINTS grammar, when a point acts, and that every named
point is marked in the write path."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from memdb_server import failpoints
from memdb_server.failpoints import Failpoint, parse

ROOT = Path(__file__).resolve().parents[2]


def test_parse_reads_actions_probabilities_and_nth_hits():
    points = parse("after_shards_put=crash, before_commit=crash@0.3,put_indexed=sleep:0.25#2,")
    assert points == {
        "after_shards_put": Failpoint("after_shards_put", "crash"),
        "before_commit": Failpoint("before_commit", "crash", probability=0.3),
        "put_indexed": Failpoint("put_indexed", "sleep", seconds=0.25, nth=2),
    }
    assert parse("") == {} and parse(" , ") == {}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope=crash", "unknown failpoint 'nope'"),
        ("before_commit", "not NAME=ACTION"),
        ("before_commit=", "not NAME=ACTION"),
        ("before_commit=explode", "action must be"),
        ("before_commit=crash:3", "action must be"),
        ("before_commit=sleep:x", "action must be"),
        ("before_commit=crash@0", "probability"),
        ("before_commit=crash@1.5", "probability"),
        ("before_commit=crash#0", "whole number"),
        ("before_commit=crash#x", "whole number"),
        ("before_commit=crash,before_commit=crash", "given twice"),
    ],
)
def test_parse_refuses_a_bad_spec_and_says_why(spec, message):
    with pytest.raises(ValueError, match=message):
        parse(spec)


def test_nth_hit_acts_once_and_unarmed_points_do_nothing(monkeypatch):
    slept = []
    monkeypatch.setattr(failpoints.time, "sleep", slept.append)
    monkeypatch.setattr(failpoints, "_POINTS", parse("before_commit=sleep:0.5#3"))
    for _ in range(5):
        failpoints.hit("before_commit")
        failpoints.hit("after_commit")  # not armed
    assert slept == [0.5]


def test_probability_acts_on_about_that_share_of_hits(monkeypatch):
    slept = []
    monkeypatch.setattr(failpoints.time, "sleep", slept.append)
    monkeypatch.setattr(failpoints, "_POINTS", parse("after_commit=sleep:0@0.25"))
    monkeypatch.setattr(failpoints, "_RNG", __import__("random").Random(7))
    for _ in range(2000):
        failpoints.hit("after_commit")
    assert 400 < len(slept) < 600  # binomial(2000, 0.25): mean 500, sd 19


def test_crash_kills_the_process_with_sigkill_at_the_nth_hit():
    code = (
        "from memdb_server import failpoints\nfor i in range(5):\n    print(i, flush=True)\n"
        "    failpoints.hit('before_commit')\n"
    )
    env = {"MEMDB_FAILPOINTS": "before_commit=crash#3", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -9 and proc.stdout.split() == ["0", "1", "2"], proc.stderr


def test_every_failpoint_is_marked_in_the_write_path():
    source = "".join(
        (ROOT / "server" / "memdb_server" / f).read_text()
        for f in (
            "storage.py",
            "admin_service.py",
            "backends/etcd_gateway.py",
            "backends/redis_blobs.py",
            "backends/cluster_publish.py",
        )
    )
    marked = re.findall(r'failpoints\.hit\("(\w+)"\)', source)
    assert sorted(marked) == sorted(failpoints.POINTS)


def test_fail_and_lost_reply_are_returned_to_the_caller():
    with failpoints.armed("etcd_txn=fail#1,etcd_put=lost_reply"):
        assert [failpoints.hit("etcd_txn") for _ in range(2)] == ["fail", None]
        assert failpoints.hit("etcd_put") == "lost_reply"
    assert failpoints.hit("etcd_put") is None  # disarmed after the block


def test_a_failpoints_file_rearms_a_running_process_and_firings_are_logged(monkeypatch, tmp_path):
    spec, log_file = tmp_path / "failpoints", tmp_path / "fired.log"
    monkeypatch.setattr(failpoints, "_FILE", str(spec))
    monkeypatch.setattr(failpoints, "_LOG", str(log_file))
    monkeypatch.setattr(failpoints, "_file_state", {"checked": 0.0, "mtime": None})
    monkeypatch.setattr(failpoints, "RELOAD_S", 0.0)
    monkeypatch.setattr(failpoints, "_POINTS", {})
    assert failpoints.hit("redis_stage") is None  # no file yet: nothing armed
    spec.write_text("redis_stage=lost_reply\n")
    assert failpoints.hit("redis_stage") == "lost_reply"
    spec.write_text("not a spec")  # a bad file is refused and the points stay as they were
    assert failpoints.hit("redis_stage") == "lost_reply"
    spec.write_text("")
    assert failpoints.hit("redis_stage") is None
    lines = log_file.read_text().splitlines()
    assert [line.split()[1:] for line in lines] == [["redis_stage", "lost_reply"]] * 2
