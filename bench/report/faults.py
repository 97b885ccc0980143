"""The cluster fault campaign's section (issue 23): faults injected per kind and what the
history checker found, from bench/results/cluster_faults.json."""

from __future__ import annotations

from bench.report.markdown import count, section, table
from bench.report.sources import load, machine, source

KINDS = {
    "node_kill": "memdb node killed (-9) and restarted",
    "node_pause": "memdb node paused (SIGSTOP) past its lease + the collector's grace",
    "node_etcd_partition": "memdb node cut off from etcd (its proxies blackhole) past its lease",
    "etcd_lost_reply": "etcd write reply dropped after the request was applied (proxy)",
    "redis_lost_reply": "Redis write reply dropped after the write (failpoint)",
    "etcd_delay": "etcd traffic of a node delayed 20-400 ms",
    "etcd_member_kill": "etcd follower killed (-9) and restarted",
    "etcd_leader_kill": "etcd leader killed (-9) and restarted",
    "redis_master_kill": "Redis master killed (-9), failed over, restarted as a replica",
}
FIGURES = (
    ("lost_acknowledged", "acknowledged writes lost"),
    ("unreadable_versions", "published versions not fully readable"),
    ("wrong_answers", "wrong answers to a write (once read back)"),
    ("bad_reads", "reads with other bytes or versions than their write's"),
    ("stale_reads", "reads older than a version the client's Watch had shown"),
    ("usage_mismatches", "tenants whose kept usage differs from a recount"),
    ("final_mismatches", "names not in their last read-back state at the end"),
)


def cluster_faults() -> str:
    r = load("cluster_faults.json")
    kinds = [[f"`{k}`", KINDS.get(k, k), count(n)] for k, n in r["fault_kinds"].items()]
    figures = [[what, f"**{r[key]}**"] for key, what in FIGURES]
    st = r["settings"]
    return section(
        f"### Cluster fault campaign ({machine('cluster_faults.json')})",
        "`bench.cluster_faults`: 3 memdb-server processes on a real 3-member etcd cluster and a "
        "3 + 3 Redis Cluster, each node's etcd traffic through a TCP proxy of the campaign; "
        f"lease {st['lease_s']} s, collector every {st['gc_interval_s']} s with "
        f"{st['gc_grace_s']} s of grace. {st['workers']} load processes write "
        f"{st['tenants'] * st['names_per_tenant']} names of {st['tenants']} tenants (one writer "
        "per name, each write read back), read them with Lookups and Fetches and watch them; "
        f"faults of {len(r['fault_kinds'])} kinds ran side by side, seeded (seed "
        f"{st['seed']}), for {r['fault_seconds'] / 60:.0f} minutes. "
        + source("cluster_faults.json"),
        table(["fault", "what", "injected"], kinds + [["", "all", f"**{count(r['faults'])}**"]]),
        f"{count(r['ops'])} operations ({count(r['writes'])} writes, "
        f"{count(r['acknowledged_writes'])} acknowledged), {count(r['reads_checked'])} reads "
        f"checked, {count(r['published_versions'])} stored versions read back at the end; "
        f"{count(r['ambiguous'])} writes answered 'outcome unknown' (allowed either way; "
        f"{count(r['ambiguous_applied'])} had happened).",
        table(["the checker found", ""], figures),
    )
