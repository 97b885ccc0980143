"""kill -9 during writes (a seeded sample of bench.reliability.kills): every acknowledged write
survives byte for byte, nothing partial, at every failpoint and at random moments."""

from __future__ import annotations

import lmdb

from bench.reliability import kills
from bench.reliability.kills import LOCAL_POINTS, KillCampaign, Written, orphan_records


def test_kill9_at_every_failpoint_and_at_random_loses_and_tears_nothing(tmp_path):
    report = kills.run(tmp_path, kills=10, seed=11, max_seconds=120)
    assert report.kills == 10 and sorted(report.failpoint_kills) == sorted(LOCAL_POINTS), report
    assert report.acked_writes > 0 and report.checks >= 10 * 3
    assert report.lost_writes == 0 and report.partial_writes == 0, report.problems
    assert report.orphan_records == 0 and not report.problems, report.problems


def test_the_checker_sees_a_lost_write_and_an_orphan_record(tmp_path):
    campaign = KillCampaign(tmp_path, names=1, seed=0, max_delay_s=0.1)
    campaign.model["k0"] = Written(version=1, tag=99, blobs=[b"never stored"])
    report = campaign.finish()  # the store holds nothing: the "acknowledged" write is lost
    assert report.lost_writes == 1 and "lost" in report.problems[0]
    env = lmdb.open(str(tmp_path), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(
            b"default\0k9\0" + (3).to_bytes(8, "big") + (0).to_bytes(4, "big"),
            b"x",
            db=env.open_db(b"shards", txn=txn),
        )
    env.close()
    assert orphan_records(tmp_path) == 1
