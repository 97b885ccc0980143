"""Writes of the cluster backend under lost replies and pauses (issue 23): a write whose etcd
reply is lost is settled by reading back (told OK exactly when it happened, applied once), a
publish fenced on its reservation never answers OK after its node lost its lease, and quota is
reserved before any blob is staged. Faults are injected with memdb_server.failpoints (the
request is sent and applied, then its reply dropped), on real etcd and Redis processes."""

from __future__ import annotations

import socket
import threading
import uuid

import pytest

from memdb.errors import NotFound, OutcomeUnknown, ResourceExhausted, Unavailable
from memdb_server import failpoints
from memdb_server.backends.etcd_gateway import EtcdClient, cmp_mod, op_put
from memdb_server.records import KeyRecord, TenantRecord
from tests import test_cluster_backend
from tests.test_storage import T, shard_bytes, write

nodes, root = test_cluster_backend.nodes, test_cluster_backend.root  # the fixtures

# A version write makes two etcd transactions: the reservation (1st), the publish (2nd).
LOST_PUBLISH = "etcd_txn=lost_reply#2"


def fully_readable(node, name: str, version: int = 0) -> bool:
    snap = node.read_version(T, name, version)
    return len(snap.shards) == snap.record.num_layers


def _uploads(node, name: str) -> list[str]:
    rec = node.get_prefix(T, name)
    return [node._version_entry(T, name, v)[1]["upload"] for v in rec.retained_versions]


def test_a_create_whose_publish_reply_is_lost_is_told_ok_and_stays_readable(nodes):
    (node,) = nodes(1)
    with failpoints.armed(LOST_PUBLISH) as points:
        rec = write(node, "p", mode="create")
    assert points["etcd_txn"].hits == 2  # the fault did fire, on the publish
    assert rec.version == 1 and node.get_prefix(T, "p").version == 1
    node.gc.grace_s = 0
    node.gc.collect()
    node.gc.collect()  # its blobs are named by the version: the collector keeps them
    assert fully_readable(node, "p")


def test_a_publish_settled_after_a_lost_reply_is_told_to_the_metadata_cache(nodes):
    (node,) = nodes(1)
    told: list[int] = []
    node.etcd.on_write(told.append)
    with failpoints.armed(LOST_PUBLISH):
        write(node, "p", mode="create")
    pointer = node.etcd.get(node.keys.pointer(T, "p"))
    # the publish's reply was lost, yet the node's copy was told a revision holding it, so a
    # read through it right after the write sees the new version (read-your-writes)
    assert told and max(told) >= pointer.mod_revision
    assert node.metadata.required >= pointer.mod_revision


def test_an_update_whose_publish_reply_is_lost_is_applied_once(nodes):
    (node,) = nodes(1)
    write(node, "p", token_count=1)
    with failpoints.armed(LOST_PUBLISH):
        rec = write(node, "p", mode="update", token_count=2)
    assert rec.version == 2
    assert node.get_prefix(T, "p").version == 2  # not published a second time as version 3
    assert write(node, "p", mode="update", token_count=3).version == 3
    assert len(set(_uploads(node, "p"))) == 2  # versions 2 and 3 name different uploads
    assert fully_readable(node, "p", 2) and fully_readable(node, "p", 3)
    assert node.tenant_usage(T) == node.recount_usage(T)


def test_an_expected_version_update_whose_reply_is_lost_is_told_ok(nodes):
    (node,) = nodes(1)
    write(node, "p")
    with failpoints.armed(LOST_PUBLISH):
        rec = write(node, "p", mode="update", expected_version=1)
    assert rec.version == 2 and node.get_prefix(T, "p").version == 2


def test_a_delete_whose_reply_is_lost_is_told_ok_not_not_found(nodes):
    (node,) = nodes(1)
    write(node, "p")
    with failpoints.armed("etcd_txn=lost_reply#1"):
        assert node.delete_prefix(T, "p") == 1
    with pytest.raises(NotFound):
        node.get_prefix(T, "p")
    assert node.tenant_usage(T) == node.recount_usage(T)


def test_tenant_and_key_writes_whose_reply_is_lost_are_told_ok(nodes):
    (node,) = nodes(1)
    with failpoints.armed("etcd_txn=lost_reply#1"):
        node.put_tenant(TenantRecord("acme"))
    assert node.get_tenant("acme").name == "acme"
    with failpoints.armed("etcd_txn=lost_reply#1"):
        node.put_key(KeyRecord("k1", "acme", "reader", "hash"))
    assert node.get_key("k1").tenant == "acme" and node.tenant_usage("acme").keys == 1
    with failpoints.armed("etcd_txn=lost_reply#1"):
        node.delete_key("k1")
    assert node.get_key("k1") is None and node.tenant_usage("acme") == node.recount_usage("acme")
    with failpoints.armed("etcd_txn=lost_reply#1"):
        node.delete_tenant("acme")
    with pytest.raises(NotFound):
        node.get_tenant("acme")


def test_a_node_whose_registration_reply_is_lost_starts_and_is_listed(nodes):
    with failpoints.armed("etcd_put=lost_reply#1") as points:
        (node,) = nodes(1)  # the registration is a put of the node's own key: sent again
    assert points["etcd_put"].hits >= 2
    assert node.node_id in [n["node"] for n in node.list_nodes()]


def test_a_publish_not_sent_publishes_nothing_and_removes_its_blobs(nodes):
    (node,) = nodes(1)
    with failpoints.armed("etcd_txn=fail#2"), pytest.raises(Unavailable, match="not sent"):
        write(node, "p")
    with pytest.raises(NotFound):
        node.get_prefix(T, "p")
    assert node.blobs.keys_by_upload() == {} or all(
        u not in node.gc.live_uploads() for u in node.blobs.keys_by_upload()
    )
    assert list(node.etcd.scan(node.keys.staging)) == []  # the reservation was released


def test_a_publish_after_the_node_lost_its_lease_fails_and_publishes_nothing(nodes):
    """A pause past the lease: the reservation went with the lease, another node's collector
    deleted the staged blobs; the publish must not answer OK."""
    a, b = nodes(2)
    b.gc.grace_s = 0

    def paused(upload):
        a.etcd.revoke(a.lease.id)  # what etcd does when the lease runs out during a pause
        b.gc.collect()
        b.gc.collect()  # past the grace period: the upload's blobs are deleted
        assert list(a.blobs.scan(upload)) == []

    a.stage_hook = paused
    with pytest.raises(Unavailable, match="lost its reservation before it was published"):
        write(a, "p")
    with pytest.raises(NotFound):
        b.get_prefix(T, "p")


def test_a_lost_reply_that_cannot_be_settled_says_the_outcome_is_unknown(nodes):
    """The reservation is gone and no version names the upload: the node cannot tell (it may
    have been applied and dropped since), so it answers OutcomeUnknown, never OK or NotFound."""
    (node,) = nodes(1)
    node.stage_hook = lambda upload: node.etcd.revoke(node.lease.id)
    with failpoints.armed(LOST_PUBLISH), pytest.raises(OutcomeUnknown, match="read the prefix"):
        write(node, "p")


def test_a_reservation_older_than_the_limit_is_expired_and_its_publish_fenced(nodes):
    a, b = nodes(2)
    b.gc.max_staging_s = 0
    a.stage_hook = lambda upload: b.gc.expire_staging()
    with pytest.raises(Unavailable, match="lost its reservation"):
        write(a, "p")


def test_parallel_uploads_of_one_tenant_never_stage_more_than_its_quota(nodes):
    """12 uploads through 3 nodes held between staging and publishing: those past the
    reservation stage at most the quota; the others are refused before staging."""
    trio = nodes(3)
    one = shard_bytes(seed=0)
    write(trio[0], "probe", shards=[one] * 3)  # how much one version costs
    cost = trio[0].tenant_usage(T).bytes
    probe = _uploads(trio[0], "probe")[0]
    trio[0].delete_prefix(T, "probe")
    trio[0].put_tenant(TenantRecord("q", max_bytes=int(cost * 3.5)))
    held = threading.Semaphore(0)
    release = threading.Event()
    for node in trio:
        node.stage_hook = lambda upload: (held.release(), release.wait(30))
    outcomes: list = []

    def upload(i):
        try:
            outcomes.append(write(trio[i % 3], f"x{i}", tenant="q", shards=[one] * 3))
        except ResourceExhausted as exc:
            outcomes.append(exc)
            held.release()

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for _ in range(12):
        assert held.acquire(timeout=60)
    staged = {u: ks for u, ks in trio[0].blobs.keys_by_upload().items() if u != probe}
    staged_bytes = sum(len(k) + len(trio[0].blobs._rc.get(k)) for ks in staged.values() for k in ks)
    release.set()
    for t in threads:
        t.join(60)
    ok = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(ok) == 3 and len(outcomes) == 12  # 3.5 versions' room: 3 fit, 9 refused
    assert staged_bytes <= 3.5 * cost
    assert trio[1].tenant_usage("q").bytes <= 3.5 * cost
    assert trio[2].tenant_usage("q") == trio[2].recount_usage("q")


@pytest.fixture
def mute_endpoint():
    """An HTTP endpoint that reads each request and closes the connection without a reply."""
    server = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                seen.append(conn.recv(65536))

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", seen
    server.close()


def test_etcd_writes_whose_reply_is_lost_are_not_resent_and_reads_fail_over(
    mute_endpoint, cluster_planes
):
    mute, seen = mute_endpoint
    etcd = EtcdClient([mute, *cluster_planes[0].client_urls])
    key = f"/memdb-test-{uuid.uuid4().hex}".encode()
    with pytest.raises(OutcomeUnknown, match="it may have been applied"):
        etcd.txn([cmp_mod(key, 0)], [op_put(key, b"v")])
    assert len(seen) == 1 and etcd.get(key) is None  # sent once, never to a second endpoint
    assert etcd.txn([cmp_mod(key, 0)], [op_put(key, b"v")]) is True  # now from a live member
    etcd._first = 0  # start at the mute endpoint again
    assert etcd.get(key).value == b"v"  # a read fails over from the mute endpoint
    assert len(seen) == 3  # txn, then each read: the mute endpoint first
    etcd.close()
