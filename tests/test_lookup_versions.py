"""Lookup during updates with retain_versions=1: the version and its layer are read in one
transaction, so an update committed in between never turns an existing prefix into NOT_FOUND."""

from __future__ import annotations

import threading

import numpy as np

from memdb_client import MemdbClient
from memdb_server.config import ServerConfig
from memdb_server.server import run_server
from memdb_server.storage import Store
from tests.test_server import FP, ROOT_KEY, make_shards
from tests.test_storage import T, shard_bytes, write


def test_lookups_during_updates_at_retain_one_never_miss_the_prefix(tmp_path):
    cfg = ServerConfig(
        data_dir=tmp_path,
        listen="127.0.0.1:0",
        metrics_listen="",
        admin_key=ROOT_KEY,
        retain_versions=1,
        sync=False,
        index_cache_bytes=0,
    )  # fmt: skip  (no cache: every Lookup reads a layer)
    with run_server(cfg) as srv, MemdbClient(srv.address, ROOT_KEY) as c:
        c.put_prefix("p", make_shards(layers=1, m=16, fill=1.0), model_fingerprint=FP)
        done, errors, answers = threading.Event(), [], [0]
        q = np.zeros((1, 2, 16), np.float32)

        def reader():
            with MemdbClient(srv.address, ROOT_KEY) as rc:
                while not done.is_set():
                    try:
                        res = rc.lookup("p", 0, q, model_fingerprint=FP)
                    except Exception as exc:  # NotFound before the fix
                        errors.append(repr(exc))
                        continue
                    if not (res.out == res.version).all():  # rows of the version it names
                        errors.append(f"version {res.version} answered other rows")
                    answers[0] += 1

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            for v in range(2, 60):
                shards = make_shards(layers=1, m=16, fill=float(v), seed=v)
                c.put_prefix("p", shards, model_fingerprint=FP, mode="update")
        finally:
            done.set()
            for t in threads:
                t.join()
        assert not errors, (len(errors), errors[:3])
        assert answers[0] > 0


def test_read_current_layer_reads_the_version_it_resolved(tmp_path):
    with Store(tmp_path, sync=False, retain_versions=1) as s:
        write(s, shards=[shard_bytes(value=1.0)], tag="1")
        seen = []

        def open_layer(rec, read):
            write(s, shards=[shard_bytes(value=2.0)], tag="2")  # commits 2, deletes 1
            snap = read()  # still version 1: the read transaction began before
            seen.append((rec.version, snap.record.version, snap.index(0, 0)))
            return "opened"

        rec, opened = s.read_current_layer(T, "p", 0, open_layer=open_layer)
        assert opened == "opened" and rec.version == 1
        assert seen == [(1, 1, b"index 1 0 0")]
        assert s.get_prefix(T, "p").version == 2 and s.get_prefix(T, "p").retained_versions == [2]
