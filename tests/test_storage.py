"""memdb_server.storage: the LMDB store of tenants, keys, prefixes, versioned shards and indices."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import safetensors.numpy as stnp

from memdb.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from memdb.shards import Shard, ShardShape, decode_shard, encode_shard
from memdb_server.storage import (
    DEFAULT_TENANT,
    KeyRecord,
    PrefixRecord,
    Store,
    TenantRecord,
    record_from_json,
    record_to_json,
)

T = DEFAULT_TENANT
MiB = 1 << 20


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "db", sync=False, map_size=4 * MiB)
    yield s
    s.close()


def shard_bytes(i=2, m=8, dk=4, h=2, d=3, value=None, seed=0, out_dtype=np.float16) -> bytes:
    rng = np.random.default_rng(seed)
    lse = np.full((i, m, h), value, np.float32) if value is not None else None
    return encode_shard(
        Shard(
            keys=rng.standard_normal((i, m, dk)).astype(np.float32),
            out=rng.standard_normal((i, m, h, d)).astype(out_dtype),
            lse=lse if lse is not None else rng.standard_normal((i, m, h)).astype(np.float32),
            extras={"k_bar": rng.standard_normal((i, m, dk)).astype(np.float32)},
            metadata={"layer": "0"},
        )
    )


def fake_indices(layers: int, groups: int, tag: str = "") -> list[list[bytes]]:
    return [[f"index {tag} {layer} {g}".encode() for g in range(groups)] for layer in range(layers)]


def write(
    store, name="p", *, tenant=T, mode="upsert", layers=3, groups=2, tag="", shards=None, **kw
):
    if shards is None:
        shards = [shard_bytes(i=groups, seed=layer) for layer in range(layers)]
    args = dict(
        mode=mode,
        expected_version=0,
        model_fingerprint="model-a",
        token_count=123,
        build_params={"key_mode": "pre_rope"},
        index_kind="flat",
        metric="cosine",
        shards=shards,
        indices=fake_indices(len(shards), groups, tag),
    )
    args.update(kw)
    return store.write_version(tenant, name, **args)


def empty_counts(store) -> dict[str, int]:
    return {"prefixes": 0, "versions": 0, "shards": 0, "indices": 0}


def item_counts(store) -> dict[str, int]:
    counts = store.count_records()
    return {db: counts[db] for db in ("prefixes", "versions", "shards", "indices")}


# ---------------------------------------------------------------- records


def test_record_json_round_trip():
    rec = PrefixRecord(
        tenant="t",
        name="n",
        version=3,
        model_fingerprint="f",
        num_layers=2,
        shape=ShardShape(1, 2, 3, 4, 5),
        dtype="float16",
        token_count=9,
        build_params={"a": "b"},
        extra_tensors=["k_bar"],
        bytes=100,
        index_kind="hnsw",
        metric="ip",
        created_at=1.5,
        updated_at=2.5,
        retained_versions=[2, 3],
    )
    assert record_from_json(PrefixRecord, record_to_json(rec)) == rec
    key = KeyRecord("k1", "t", "reader", "hash", "ci", 3.0)
    assert record_from_json(KeyRecord, record_to_json(key)) == key


# ---------------------------------------------------------------- tenants and keys


def test_default_tenant_exists_at_open(store):
    assert store.get_tenant(DEFAULT_TENANT).name == DEFAULT_TENANT


def test_tenant_put_get_list_and_duplicate(store):
    store.put_tenant(TenantRecord("acme", max_bytes=10, max_prefixes=2))
    got = store.get_tenant("acme")
    assert (got.max_bytes, got.max_prefixes) == (10, 2) and got.created_at > 0
    assert [t.name for t in store.list_tenants()] == ["acme", DEFAULT_TENANT]
    with pytest.raises(AlreadyExists, match="tenant 'acme'"):
        store.put_tenant(TenantRecord("acme"))
    with pytest.raises(NotFound, match="tenant 'nope' not found"):
        store.get_tenant("nope")


@pytest.mark.parametrize("name", ["", "a\0b", "x" * 200])
def test_bad_tenant_names_are_invalid_argument(store, name):
    with pytest.raises(InvalidArgument, match="tenant name"):
        store.put_tenant(TenantRecord(name))


def test_key_put_get_list_delete(store):
    store.put_tenant(TenantRecord("acme"))
    store.put_key(KeyRecord("k1", "acme", "writer", "h1", "ci"))
    store.put_key(KeyRecord("k2", T, "admin", "h2"))
    got = store.get_key("k1")
    assert (got.tenant, got.role, got.secret_hash, got.description) == (
        "acme",
        "writer",
        "h1",
        "ci",
    )
    assert store.get_key("missing") is None and store.get_key("") is None
    assert [k.key_id for k in store.list_keys()] == ["k1", "k2"]
    assert [k.key_id for k in store.list_keys("acme")] == ["k1"]
    with pytest.raises(AlreadyExists):
        store.put_key(KeyRecord("k1", "acme", "writer", "h"))
    store.delete_key("k1")
    assert store.get_key("k1") is None
    with pytest.raises(NotFound, match="API key 'k1' not found"):
        store.delete_key("k1")


def test_key_of_unknown_tenant_or_role_is_refused(store):
    with pytest.raises(NotFound, match="tenant 'ghost'"):
        store.put_key(KeyRecord("k", "ghost", "reader", "h"))
    with pytest.raises(InvalidArgument, match="role 'root'"):
        store.put_key(KeyRecord("k", T, "root", "h"))


def test_delete_tenant_with_prefixes_needs_force_and_force_removes_everything(store):
    store.put_tenant(TenantRecord("acme"))
    store.put_key(KeyRecord("k1", "acme", "writer", "h"))
    store.put_key(KeyRecord("k2", T, "writer", "h"))
    write(store, "a", tenant="acme")
    write(store, "a")  # the same name in another tenant survives
    before = item_counts(store)
    with pytest.raises(FailedPrecondition, match="still has 1 prefix"):
        store.delete_tenant("acme")
    store.delete_tenant("acme", force=True)
    with pytest.raises(NotFound):
        store.get_tenant("acme")
    assert store.get_key("k1") is None and store.get_key("k2") is not None
    assert item_counts(store) == {db: n // 2 for db, n in before.items()}
    assert store.get_prefix(T, "a").version == 1


def test_delete_empty_tenant_needs_no_force(store):
    store.put_tenant(TenantRecord("acme"))
    store.delete_tenant("acme")
    assert [t.name for t in store.list_tenants()] == [DEFAULT_TENANT]


# ---------------------------------------------------------------- versions


def test_write_version_then_read_version_gives_exact_bytes(store):
    shards = [shard_bytes(seed=layer) for layer in range(3)]
    rec = write(store, shards=shards, tag="v1")
    assert rec.version == 1 and rec.retained_versions == [1]
    assert rec.shape == ShardShape(2, 8, 4, 2, 3)
    assert (rec.num_layers, rec.dtype, rec.extra_tensors) == (3, "float16", ["k_bar"])
    assert rec.bytes == sum(map(len, shards)) and rec.token_count == 123
    snap = store.read_version(T, "p")
    assert snap.record == rec == store.get_prefix(T, "p")
    assert [snap.shards[layer] for layer in range(3)] == shards
    assert snap.indices == dict(enumerate(fake_indices(3, 2, "v1")))
    assert store.get_shard(T, "p", 0, 2) == shards[2]
    assert store.get_index(T, "p", 1, 1, 0) == b"index v1 1 0"


def test_snapshot_accessors_check_layer_and_group(store):
    shards = [shard_bytes(seed=layer) for layer in range(3)]
    write(store, shards=shards, tag="t")
    snap = store.read_version(T, "p", layers=[0, 2])
    assert snap.shard(2) == shards[2] and snap.index(2, 1) == b"index t 2 1"
    with pytest.raises(InvalidArgument, match="layer 1 was not read"):
        snap.shard(1)
    with pytest.raises(InvalidArgument, match="group 2 out of range.*2 groups"):
        snap.index(0, 2)
    with pytest.raises(InvalidArgument, match="layer 5 out of range"):
        store.get_shard(T, "p", 0, 5)


def test_shards_decoded_by_the_caller_are_not_decoded_again(store, monkeypatch):
    shards = [shard_bytes(seed=layer) for layer in range(3)]
    decoded = [decode_shard(b) for b in shards]
    monkeypatch.setattr("memdb_server.records.decode_shard", lambda *a, **k: pytest.fail("decoded"))
    assert write(store, shards=shards, decoded=decoded).shape == decoded[0].shape


def test_read_version_of_some_layers_only(store):
    shards = [shard_bytes(seed=layer) for layer in range(3)]
    write(store, shards=shards)
    snap = store.read_version(T, "p", layers=[1])
    assert list(snap.shards) == [1] and snap.shards[1] == shards[1]
    with pytest.raises(InvalidArgument, match=r"layer 3 out of range.*3 layers"):
        store.read_version(T, "p", layers=[3])


def test_versions_increment_and_only_the_last_retained_are_kept(store):
    for v in range(1, 4):
        rec = write(store, tag=f"v{v}", token_count=v)
        assert rec.version == v
    assert rec.retained_versions == [2, 3]
    old = store.read_version(T, "p", 2)
    assert old.record.token_count == 2 and old.record.retained_versions == [2, 3]
    assert old.indices[0][0] == b"index v2 0 0"
    with pytest.raises(NotFound, match=r"no version 1 \(stored versions: 2, 3\)"):
        store.read_version(T, "p", 1)
    assert item_counts(store) == {"prefixes": 1, "versions": 2, "shards": 6, "indices": 12}
    assert store.get_prefix(T, "p").created_at < rec.updated_at


def test_retain_one_keeps_only_the_current_version(tmp_path):
    with Store(tmp_path, sync=False, retain_versions=1) as s:
        write(s)
        write(s)
        assert item_counts(s) == {"prefixes": 1, "versions": 1, "shards": 3, "indices": 6}


def test_create_update_upsert_semantics(store):
    with pytest.raises(NotFound, match="prefix 'p' not found; use create or upsert"):
        write(store, mode="update")
    assert write(store, mode="create").version == 1
    with pytest.raises(AlreadyExists, match="prefix 'p' already exists"):
        write(store, mode="create")
    assert write(store, mode="update").version == 2
    assert write(store, mode="upsert").version == 3
    assert write(store, "q", mode="upsert").version == 1


def test_expected_version_must_be_current(store):
    write(store)
    with pytest.raises(FailedPrecondition, match="at version 1, not the expected 5"):
        write(store, mode="update", expected_version=5)
    assert write(store, mode="update", expected_version=1).version == 2
    with pytest.raises(FailedPrecondition, match="at version 2, not the expected 1"):
        store.delete_prefix(T, "p", expected_version=1)
    assert store.delete_prefix(T, "p", expected_version=2) == 2


def test_unknown_tenant_is_not_found(store):
    with pytest.raises(NotFound, match="tenant 'ghost' not found"):
        write(store, tenant="ghost")


def test_delete_removes_every_record_of_the_prefix(store):
    write(store, "other")
    baseline = item_counts(store)
    for _ in range(3):
        write(store, "p")
    assert store.delete_prefix(T, "p") == 3
    assert item_counts(store) == baseline
    with pytest.raises(NotFound, match="prefix 'p' not found"):
        store.read_version(T, "p")
    with pytest.raises(NotFound):
        store.delete_prefix(T, "p")
    assert write(store, "p", mode="create").version == 1


def test_names_sharing_a_start_do_not_share_records(store):
    write(store, "ab")
    write(store, "a")
    store.delete_prefix(T, "a")
    assert store.read_version(T, "ab").record.num_layers == 3
    assert item_counts(store) == {"prefixes": 1, "versions": 1, "shards": 3, "indices": 6}


def test_reopen_keeps_everything(tmp_path):
    with Store(tmp_path / "db") as s:
        s.put_tenant(TenantRecord("acme", max_prefixes=5))
        s.put_key(KeyRecord("k1", "acme", "reader", "h"))
        rec = write(s, tenant="acme", tag="x")
        snap = s.read_version("acme", "p")
    with Store(tmp_path / "db", map_size=MiB) as s:
        assert s.get_tenant("acme").max_prefixes == 5
        assert s.get_key("k1").role == "reader"
        again = s.read_version("acme", "p")
        assert again.record == rec
        assert again.shards == snap.shards and again.indices == snap.indices
        assert s.info()["map_size"] >= MiB


def test_durable_by_default(tmp_path):
    with Store(tmp_path) as s:
        assert s._env.flags()["sync"] and s._env.flags()["metasync"]


# ---------------------------------------------------------------- validation


def raw_shard(**tensors) -> bytes:
    return stnp.save({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def good_tensors(m=8):
    rng = np.random.default_rng(0)
    return dict(
        keys=rng.standard_normal((2, m, 4)).astype(np.float32),
        out=rng.standard_normal((2, m, 2, 3)).astype(np.float16),
        lse=rng.standard_normal((2, m, 2)).astype(np.float32),
    )


def with_nan(t):
    t = t.copy()
    t.flat[0] = np.nan
    return t


BAD_LAYER_1 = {
    "missing tensor": (
        lambda t: raw_shard(keys=t["keys"], out=t["out"]),
        r"layer 1: required tensor 'lse' is missing",
    ),
    "nan": (
        lambda t: raw_shard(**{**t, "out": with_nan(t["out"])}),
        r"layer 1: tensor 'out' holds NaN",
    ),
    "wrong dtype": (
        lambda t: raw_shard(**{**t, "lse": t["lse"].astype(np.float64)}),
        r"layer 1: tensor 'lse' has dtype float64",
    ),
    "dtype differs from layer 0": (
        lambda t: raw_shard(**{**t, "out": t["out"].astype(np.float32)}),
        r"layer 1: tensor 'out' is float32, layer 0 has float16",
    ),
    "shape differs from layer 0": (
        lambda t: raw_shard(**good_tensors(m=9)),
        r"layer 1 has shape .*budget=9",
    ),
    "not safetensors": (lambda t: b"\x08" + b"\0" * 7 + b"garbage!", r"layer 1: not a valid"),
}


@pytest.mark.parametrize("case", sorted(BAD_LAYER_1))
def test_bad_shards_are_invalid_argument_naming_layer_and_tensor(store, case):
    make, message = BAD_LAYER_1[case]
    shards = [raw_shard(**good_tensors()), make(good_tensors())]
    with pytest.raises(InvalidArgument, match=message):
        write(store, shards=shards)
    assert item_counts(store) == empty_counts(store)


def test_wrong_number_of_indices_is_invalid_argument(store):
    with pytest.raises(InvalidArgument, match=r"layer 0: got 1 indices.*\(2\)"):
        write(store, indices=[[b"x"], [b"x", b"y"], [b"x", b"y"]])
    with pytest.raises(InvalidArgument, match="indices for 2 layers, expected 3"):
        write(store, indices=fake_indices(2, 2))
    assert item_counts(store) == empty_counts(store)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"mode": "replace"}, "mode 'replace'"),
        ({"metric": "l2"}, "metric 'l2'"),
        ({"index_kind": "auto"}, "index kind 'auto'"),
        ({"model_fingerprint": ""}, "model_fingerprint is empty"),
        ({"shards": [], "indices": []}, "at least one layer"),
    ],
)
def test_bad_write_arguments_are_invalid_argument(store, kw, message):
    with pytest.raises(InvalidArgument, match=message):
        write(store, **kw)


# ---------------------------------------------------------------- quotas and size


def raw_tenant_bytes(store, tenant: str) -> int:
    """Key + value bytes of every record of `tenant`, read straight from LMDB (an exact count
    independent of the store's usage counters)."""
    env, dbs, total = store._env, store._db, 0
    with env.begin() as txn:
        for db in ("prefixes", "versions", "shards", "indices"):
            for key, value in txn.cursor(db=dbs[db]):
                if key.startswith(f"{tenant}\0".encode()):
                    total += len(key) + len(value)
        for key, value in txn.cursor(db=dbs["keys"]):
            if record_from_json(KeyRecord, value).tenant == tenant:
                total += len(key) + len(value)
    return total


def test_usage_counts_every_record_of_retained_versions_indices_and_keys(store):
    store.put_tenant(TenantRecord("acme"))
    check = lambda: (store.tenant_usage("acme"), raw_tenant_bytes(store, "acme"))  # noqa: E731
    steps = [
        lambda: store.put_key(KeyRecord("k1", "acme", "reader", "h" * 64, "d" * 500)),
        lambda: write(store, "a", tenant="acme"),
        lambda: write(store, "a", tenant="acme", tag="big" * 1000),  # large indices count too
        lambda: write(store, "a", tenant="acme"),  # version 1 drops out (retain 2)
        lambda: write(store, "b", tenant="acme", layers=1),
        lambda: store.delete_prefix("acme", "a"),
        lambda: store.delete_key("k1"),
        lambda: store.delete_prefix("acme", "b"),
    ]
    for step in steps:
        step()
        usage, raw = check()
        assert usage.bytes == raw and usage == store.recount_usage("acme")
    assert store.tenant_usage("acme").bytes == 0 and store.usage("acme") == (0, 0)


def test_byte_quota_counts_retained_versions_and_refuses_inside_the_write(store):
    store.put_tenant(TenantRecord("probe"))
    write(store, "a", tenant="probe")
    one = store.tenant_usage("probe").bytes  # one version: shards, indices, records
    store.put_tenant(TenantRecord("small", max_bytes=int(one * 1.5)))
    write(store, "a", tenant="small")
    with pytest.raises(ResourceExhausted, match="tenant 'small' to .* stored bytes.*max_bytes"):
        write(store, "a", tenant="small")  # two retained versions do not fit
    assert store.get_prefix("small", "a").version == 1
    assert store.usage("small") == (1, raw_tenant_bytes(store, "small"))
    with pytest.raises(ResourceExhausted, match="quota"):
        write(store, "b", tenant="small")
    with pytest.raises(ResourceExhausted, match="quota"):  # indices count: same shards, big index
        write(store, "a", tenant="small", indices=[[b"x" * one] * 2] * 3)
    store.delete_prefix("small", "a")
    write(store, "b", tenant="small")


def test_api_keys_count_against_a_per_tenant_limit_and_the_byte_quota(tmp_path):
    with Store(tmp_path, sync=False, max_keys_per_tenant=3) as s:
        s.put_tenant(TenantRecord("acme"))
        for i in range(3):
            s.put_key(KeyRecord(f"k{i}", "acme", "reader", "h"))
        with pytest.raises(ResourceExhausted, match="has 3 API keys.*revoke"):
            s.put_key(KeyRecord("k3", "acme", "reader", "h"))
        s.delete_key("k0")
        s.put_key(KeyRecord("k3", "acme", "reader", "h"))
        assert s.tenant_usage("acme").keys == 3
        s.put_tenant(TenantRecord("tiny", max_bytes=300))
        s.put_key(KeyRecord("t0", "tiny", "reader", "h", "x" * 100))
        with pytest.raises(ResourceExhausted, match="API key 't1' would bring tenant 'tiny'"):
            s.put_key(KeyRecord("t1", "tiny", "reader", "h", "x" * 100))


def test_usage_of_a_store_without_counters_is_recounted_at_open(tmp_path):
    with Store(tmp_path, sync=False) as s:
        s.put_tenant(TenantRecord("acme"))
        write(s, "a", tenant="acme")
        s.put_key(KeyRecord("k", "acme", "reader", "h"))
        expected = s.tenant_usage("acme")
        with s._env.begin(write=True) as txn:  # as a store written before the counters
            txn.drop(s._db["usage"], delete=False)
    with Store(tmp_path, sync=False) as s:
        assert s.tenant_usage("acme") == expected and expected.bytes > 0


def test_prefix_count_quota_is_resource_exhausted(store):
    store.put_tenant(TenantRecord("small", max_prefixes=1))
    write(store, "a", tenant="small")
    with pytest.raises(ResourceExhausted, match="has 1 prefixes, its quota is 1"):
        write(store, "b", tenant="small")
    write(store, "a", tenant="small")  # updates do not count


def big_shards(layers: int, mib: float) -> list[bytes]:
    m = int(mib * MiB / (2 * 64 * 4 * 2))  # keys + out of about `mib` MiB per layer
    return [
        shard_bytes(i=2, m=m, dk=64, h=1, d=64, seed=s, out_dtype=np.float32) for s in range(layers)
    ]


def test_map_grows_from_a_tiny_map_size(tmp_path):
    with Store(tmp_path, sync=False, map_size=MiB) as s:
        shards = big_shards(5, 1.0)
        write(s, shards=shards)
        assert s.info()["map_size"] > 5 * MiB
        assert [s.read_version(T, "p").shards[layer] for layer in range(5)] == shards


def test_past_max_map_size_is_resource_exhausted_and_the_store_still_works(tmp_path):
    with Store(tmp_path, sync=False, map_size=MiB, max_map_size=2 * MiB) as s:
        with pytest.raises(ResourceExhausted, match="store is full.*max map size"):
            write(s, "big", shards=big_shards(5, 1.0))
        assert item_counts(s) == empty_counts(s)
        write(s, "small")
        assert s.read_version(T, "small").record.version == 1
        s.put_tenant(TenantRecord("acme"))


def test_usage_count_records_and_info(store):
    write(store, "a")
    write(store, "b")
    assert store.usage(T) == (2, raw_tenant_bytes(store, T))
    info = store.info()
    assert (info["num_tenants"], info["num_prefixes"]) == (1, 2)
    assert 0 < info["used_bytes"] <= info["map_size"]
    assert store.count_records()["meta"] == 1


def test_list_prefixes_sorted_paged_and_filtered(store):
    for name in ["c", "ba", "a", "bb", "b"]:
        write(store, name, layers=1)
    store.put_tenant(TenantRecord("other"))
    write(store, "b0", tenant="other", layers=1)
    names = lambda **kw: [r.name for r in store.list_prefixes(T, **kw)]  # noqa: E731
    assert names() == ["a", "b", "ba", "bb", "c"]
    assert names(limit=2) == ["a", "b"]
    assert names(start_after="b", limit=2) == ["ba", "bb"]
    assert names(name_prefix="b") == ["b", "ba", "bb"]
    assert names(name_prefix="b", start_after="ba") == ["bb"]
    assert names(start_after="c") == []
    with pytest.raises(InvalidArgument):
        names(limit=0)


# ---------------------------------------------------------------- concurrency, crashes


def test_concurrent_readers_see_whole_versions_while_a_writer_writes_and_grows(tmp_path):
    s = Store(tmp_path, sync=False, map_size=256 * 1024)
    write(s, shards=[shard_bytes(value=1.0, seed=i) for i in range(3)], tag="1", token_count=1)
    errors: list[str] = []
    reads = [0]
    done = threading.Event()

    def check(snap):
        v = snap.record.version
        if snap.record.token_count != v:
            errors.append(f"record of {v} says {snap.record.token_count}")
        for layer, blob in snap.shards.items():
            if not (decode_shard(blob).lse == v).all():
                errors.append(f"version {v} layer {layer} has another version's shard")
            if snap.indices[layer][0] != f"index {v} {layer} 0".encode():
                errors.append(f"version {v} layer {layer} has another version's index")

    def reader():
        while not done.is_set():
            check(s.read_version(T, "p"))
            reads[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for v in range(2, 12):
            shards = [shard_bytes(m=256, value=float(v), seed=i) for i in range(3)]
            write(s, shards=shards, tag=str(v), token_count=v)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert reads[0] > 0 and s.info()["map_size"] > 256 * 1024
    assert s.get_prefix(T, "p").version == 11
    s.close()


def test_reader_slots_of_a_crashed_process_are_reclaimed(tmp_path):
    with Store(tmp_path, sync=False) as s:
        assert s.reclaim_readers() == 0
        crash = textwrap.dedent(
            f"""
            import os, lmdb
            env = lmdb.open({str(tmp_path)!r}, max_dbs=8)
            txn = env.begin()
            txn.get(b"x")
            os._exit(0)  # dies holding a reader slot
            """
        )
        subprocess.run([sys.executable, "-c", crash], check=True, timeout=60)
        assert s.reclaim_readers() == 1


# ---------------------------------------------------------------- a full map, metadata limits


def fill_with_small_records(s: Store) -> int:
    """Tenants and API keys until the store refuses more; returns how many of each."""
    n = 0
    with pytest.raises(ResourceExhausted, match="store is full"):
        while True:
            s.put_tenant(TenantRecord(f"t{n:06d}"))
            s.put_key(KeyRecord(f"k{n:06d}", f"t{n:06d}", "reader", "h" * 64, "d" * 100))
            n += 1
    return n


def test_a_map_full_of_small_records_still_takes_deletes_and_then_writes(tmp_path):
    with Store(tmp_path, sync=False, map_size=MiB, max_map_size=2 * MiB) as s:
        write(s, "p", layers=1)
        n = fill_with_small_records(s)
        assert n > 1000
        s.delete_key("k000001")  # revocation
        s.delete_tenant("t000002", force=True)
        s.delete_prefix(T, "p")
        for i in range(3, 60):
            s.delete_tenant(f"t{i:06d}", force=True)
        assert s.info()["map_size"] <= 2 * MiB
        write(s, "p", layers=1)  # freed pages take writes again
        s.put_tenant(TenantRecord("fresh"))
    with Store(tmp_path, sync=False, map_size=MiB, max_map_size=2 * MiB) as s:
        assert s.get_prefix(T, "p").version == 1 and s.get_tenant("fresh")


def test_a_delete_never_leaves_the_reserve_to_other_writes(tmp_path):
    with Store(tmp_path, sync=False, map_size=MiB, max_map_size=2 * MiB) as s:
        fill_with_small_records(s)
        cap = s.info()["map_size"]
        s.delete_key("k000000")
        s.delete_tenant("t000001", force=True)
        assert s.info()["map_size"] <= max(cap, s.info()["used_bytes"])


def test_a_reserve_as_big_as_the_map_is_invalid(tmp_path):
    with pytest.raises(InvalidArgument, match="reserve_bytes"):
        Store(tmp_path, max_map_size=2 * MiB, reserve_bytes=2 * MiB)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"model_fingerprint": "f" * 100_000}, "model_fingerprint is 100000 bytes; at most 256"),
        ({"build_params": {f"k{i}": "v" for i in range(20_000)}}, "20000 entries; at most 64"),
        ({"build_params": {"k": "v" * 5000}}, "entry 'k' is too big"),
        ({"build_params": {f"k{i}": "v" * 4000 for i in range(5)}}, "at most 16384"),
    ],
)
def test_oversized_metadata_is_invalid_argument_with_a_short_message(store, kw, message):
    with pytest.raises(InvalidArgument, match=message) as err:
        write(store, **kw)
    assert len(str(err.value)) < 200
    assert item_counts(store) == empty_counts(store)


def test_oversized_names_and_descriptions_are_invalid_argument_with_a_short_message(store):
    cases = [
        lambda: write(store, "n" * 10_000),
        lambda: write(store, "n\x01" * 5_000),
        lambda: store.put_tenant(TenantRecord("t" * 10_000)),
        lambda: store.put_key(KeyRecord("k", T, "reader", "h", "d" * (60 << 20))),
    ]
    for case in cases:
        with pytest.raises(InvalidArgument) as err:
            case()
        assert len(str(err.value)) < 200, str(err.value)[:300]
    assert store.list_keys(T) == []
