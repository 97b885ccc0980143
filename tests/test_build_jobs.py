"""Build jobs end to end: a real server process, real `memdb-worker` processes with tiny random
Llamas (a character-level tokenizer, saved as model folders), the admin CLI.

A job is submitted, claimed by the worker of its model, built, stored through PutPrefix and
followed to its version; jobs and their leases survive a server restart; a worker killed
mid-build loses its job to another worker after the lease, and the job stores one version;
cancelled jobs stop; refusals (no live worker of the model, a tenant at its prefix quota) come
before any build, and what only the worker can tell (a budget the traces cannot fill, a memory
over the byte quota) fails the job with its reason.
"""

from __future__ import annotations

import json
import os
import random
import string
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from memdb.errors import Aborted, FailedPrecondition, NotFound, ResourceExhausted
from memdb.shards import Shard
from memdb_client import MemdbClient
from memdb_client.build_jobs import STATES, BuildJob, BuildSpec
from memdb_client.cli import cli
from memdb_server.process import start_server
from memdb_worker.serve.process import launch_worker, wait_worker
from tests.tiny import tiny_llama

LEASE_S = 3.0
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "zeta", "theta"]


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _save_model(folder: Path, **config) -> str:
    """A tiny Llama and a character-level tokenizer saved as a model folder; its fingerprint."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from memdb_worker.model.loading import model_fingerprint

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in sorted(set(string.printable)):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")  # fmt: skip
    fast.save_pretrained(folder)
    model = tiny_llama(len(vocab), **config)
    model.save_pretrained(folder)
    return model_fingerprint(model)


def _spec(name: str, rng: random.Random, *, words=60, traces=16, budget=16, **kw) -> BuildSpec:
    lines = [_text(rng, 12) for _ in range(traces)]
    return BuildSpec(name, prefix_text=_text(rng, words), traces=lines, budget=budget, **kw)


def _wait(client: MemdbClient, job_id: str, until, timeout: float = 60.0) -> BuildJob:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get_build(job_id)
        if until(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck at {job}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A server, tenant 'acme' (writer key), a worker key, worker A of model A (started first:
    it loads meanwhile) and a worker B1 of the larger model B."""
    work = tmp_path_factory.mktemp("build-jobs")
    fp_a = _save_model(work / "model-a")
    fp_b = _save_model(work / "model-b", num_hidden_layers=5)
    server = start_server(work / "data", build_lease_s=LEASE_S, build_worker_live_s=30)
    root = MemdbClient(server.address, server.admin_key)
    worker_key, _ = root.create_api_key("worker", description="test workers")
    flags = {"threads": 1, "build_poll_s": 0.1, "log_level": "INFO"}
    launched = {
        "a": launch_worker(server.address, worker_key, work, name="w-a",
                           model=str(work / "model-a"), **flags),
        "b1": launch_worker(server.address, worker_key, work, name="w-b1",
                            model=str(work / "model-b"), **flags),
    }  # fmt: skip
    root.create_tenant("acme")
    writer_key, _ = root.create_api_key("writer", tenant="acme")
    state = {"server": server, "root": root, "work": work, "fp_a": fp_a, "fp_b": fp_b,
             "worker_key": worker_key, "writer_key": writer_key, "flags": flags,
             "writer": MemdbClient(server.address, writer_key), "launched": launched}  # fmt: skip
    try:
        state["workers"] = {k: wait_worker(*v) for k, v in launched.items()}
        _wait_live(state["writer"], fp_a)
        yield state
    finally:
        for proc, _, _ in state["launched"].values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(20)
        state["writer"].close()
        root.close()
        server.stop()


def _wait_live(client: MemdbClient, fp: str) -> None:
    """Until the server has heard a worker of `fp` poll (a submit is then accepted)."""
    deadline = time.monotonic() + 60
    while True:
        try:  # a budget no prefix fills: if a worker takes it, it fails at once
            job = client.submit_build(BuildSpec("probe-x", prefix_text="x", traces=["x"],
                                                budget=10**6, model_fingerprint=fp))  # fmt: skip
        except FailedPrecondition:
            assert time.monotonic() < deadline, f"no worker of {fp} polled in 60 s"
            time.sleep(0.1)
            continue
        try:
            client.cancel_build(job.job_id)
        except FailedPrecondition:
            pass  # the worker failed it first
        return


def test_a_submitted_job_is_claimed_built_stored_and_streams_its_progress(stack):
    writer, rng = stack["writer"], random.Random(1)
    job = writer.submit_build(_spec("doc", rng, model_fingerprint=stack["fp_a"]))
    assert job.state == "queued" and job.tenant == "acme" and job.base_version == 0
    seen = list(writer.watch_build(job.job_id))
    assert seen[-1].state == "done" and all(j.state in STATES for j in seen)
    assert [j.state for j in seen].index("done") == len(seen) - 1  # done is final: the end
    done = seen[-1]
    assert done.version == 1 and done.attempts == 1 and done.worker_id
    assert done.tokens_prefilled == done.prefix_tokens > 0
    assert done.layers_fitted == done.num_layers == 3
    assert done.bytes_uploaded == done.total_bytes > 0
    info = writer.get_prefix("doc")
    assert info.version == 1 and info.model_fingerprint == stack["fp_a"]
    assert info.build_params["build_job"] == job.job_id and info.num_layers == 3
    mem = writer.fetch_memory("doc", model_fingerprint=stack["fp_a"])
    assert len(mem.shards) == 3 and mem.shards[0].keys.shape[1] == 16
    # an update builds version 2 from the version it saw; the model is the stored prefix's
    upd = writer.submit_build(_spec("doc", rng, mode="update", budget=8))
    assert upd.spec.model_fingerprint == stack["fp_a"] and upd.base_version == 1
    end = _wait(writer, upd.job_id, lambda j: j.final)
    assert (end.state, end.version) == ("done", 2)
    assert writer.get_prefix("doc").budget == 8
    # appending: the worker reads the memory for the job's tenant and stores version 3
    app = writer.submit_build(BuildSpec("doc", "update", _text(rng, 20), append=True))
    end = _wait(writer, app.job_id, lambda j: j.final)
    assert (end.state, end.version) == ("done", 3), end.error
    assert writer.get_prefix("doc").token_count > info.token_count


def test_refusals_come_before_any_build_and_the_worker_fails_what_only_it_can_tell(stack):
    writer, root, rng = stack["writer"], stack["root"], random.Random(2)
    before = len(writer.list_builds(include_finished=True))
    with pytest.raises(FailedPrecondition, match="no worker holding model sha256:dead"):
        writer.submit_build(_spec("x", rng, model_fingerprint="sha256:deadbeef"))
    with pytest.raises(NotFound, match="not found"):
        writer.submit_build(_spec("never-stored", rng, mode="update"))
    assert len(writer.list_builds(include_finished=True)) == before  # nothing was queued
    # a tenant at its prefix quota is refused at submission
    root.create_tenant("one", max_prefixes=1)
    one = MemdbClient(stack["server"].address, root.create_api_key("writer", tenant="one")[0])
    one.put_prefix("held", _one_shard(), model_fingerprint=stack["fp_a"])
    with pytest.raises(ResourceExhausted, match="1 of its 1 prefixes"):
        one.submit_build(_spec("second", rng, model_fingerprint=stack["fp_a"]))
    assert one.list_builds(include_finished=True) == []
    # a budget the traces cannot fill: the worker fails the job with the builder's reason
    job = writer.submit_build(_spec("big", rng, budget=10_000, model_fingerprint=stack["fp_a"]))
    end = _wait(writer, job.job_id, lambda j: j.final)
    assert end.state == "failed" and "exceeds the prefix's" in end.error and end.version == 0
    # a memory larger than what the tenant's byte quota leaves: the upload is refused
    root.create_tenant("small", max_bytes=2000)
    small = MemdbClient(stack["server"].address, root.create_api_key("writer", tenant="small")[0])
    job = small.submit_build(_spec("m", rng, model_fingerprint=stack["fp_a"]))
    end = _wait(small, job.job_id, lambda j: j.final)
    assert end.state == "failed" and "quota" in end.error
    with pytest.raises(NotFound):
        small.get_prefix("m")


def test_jobs_and_their_leases_survive_a_server_restart_and_cancel_is_final(stack, tmp_path):
    fake, fp = "fake-worker", "sha256:restart"
    server = start_server(tmp_path / "data", build_lease_s=60)
    try:
        root = MemdbClient(server.address, server.admin_key)
        worker = MemdbClient(server.address, root.create_api_key("worker")[0])
        assert worker.claim_build(fake, fp) == (None, 60.0)  # the server now knows fp is live
        rng = random.Random(3)
        first = root.submit_build(_spec("p1", rng, model_fingerprint=fp))
        second_spec = _spec("p2", rng, model_fingerprint=fp)
        second = root.submit_build(second_spec)
        third = root.submit_build(_spec("p3", rng, model_fingerprint=fp))
        claimed, _ = worker.claim_build(fake, fp)
        assert claimed.job_id == first.job_id and claimed.spec.traces  # oldest first, inputs
        worker.report_build(first.job_id, fake, "running", stage="fitting", layers_fitted=2)
        root.close(), worker.close()
        server.stop()
        server = start_server(tmp_path / "data", build_lease_s=60)
        root = MemdbClient(server.address, server.admin_key)
        worker = MemdbClient(server.address, root.create_api_key("worker")[0])
        jobs = {j.job_id: j for j in root.list_builds()}
        assert jobs[first.job_id].state == "running" and jobs[first.job_id].layers_fitted == 2
        assert jobs[second.job_id].state == "queued"
        # the lease held across the restart: the worker reports on, nobody else takes it
        assert worker.report_build(first.job_id, fake, "running").state == "running"
        got, _ = worker.claim_build("other", fp)
        assert got.job_id == second.job_id and got.spec.prefix_text == second_spec.prefix_text
        # cancel: a queued job is never handed out; a running one tells its worker to stop
        assert root.cancel_build(third.job_id).state == "cancelled"
        assert root.cancel_build(first.job_id).state == "cancelled"
        assert worker.report_build(first.job_id, fake, "running").state == "cancelled"
        with pytest.raises(Aborted, match="cancelled"):
            worker.put_prefix("p1", _one_shard(), model_fingerprint=fp,
                              build_job=(first.job_id, fake))  # fmt: skip
        with pytest.raises(FailedPrecondition, match="already cancelled"):
            root.cancel_build(third.job_id)
        assert worker.claim_build("other", fp)[0] is None
        assert {j.job_id: j.state for j in root.list_builds(include_finished=True)} == {
            first.job_id: "cancelled",
            second.job_id: "claimed",
            third.job_id: "cancelled",
        }
        root.close(), worker.close()
    finally:
        server.stop()


def _one_shard() -> list[Shard]:
    return [Shard(keys=np.ones((1, 2, 4), np.float32), out=np.ones((1, 2, 1, 4), np.float32),
                  lse=np.zeros((1, 2, 1), np.float32), metadata={"layer": "0"})]  # fmt: skip


def test_a_worker_killed_mid_build_loses_the_job_to_another_which_stores_it_once(stack):
    writer, rng = stack["writer"], random.Random(4)
    spec = _spec("long", rng, words=200, traces=80, budget=64, model_fingerprint=stack["fp_b"])
    job = writer.submit_build(spec)
    b1 = stack["workers"]["b1"]
    running = _wait(writer, job.job_id, lambda j: j.state == "running")
    b1.proc.kill()  # SIGKILL: no goodbye, its lease just stops being renewed
    b1.proc.wait(10)
    killed = writer.get_build(job.job_id)
    assert killed.state != "done", "the build ended before its worker was killed: make it longer"
    # another worker of the model takes it once the lease lapsed, and finishes it
    proc, ready, log = launch_worker(stack["server"].address, stack["worker_key"], stack["work"],
                                     name="w-b2", model=str(stack["work"] / "model-b"),
                                     **stack["flags"])  # fmt: skip
    stack["launched"]["b2"] = (proc, ready, log)
    wait_worker(proc, ready, log)
    end = _wait(writer, job.job_id, lambda j: j.final, timeout=90)
    assert (end.state, end.version, end.attempts) == ("done", 1, 2), end.error
    assert end.worker_id != running.worker_id
    assert writer.get_prefix("long").version == 1
    # the killed worker's late upload (had it lived) is refused: the job is done, once
    worker = MemdbClient(stack["server"].address, stack["worker_key"])
    with pytest.raises(FailedPrecondition, match="already done"):
        worker.put_prefix("long", _one_shard(), model_fingerprint=stack["fp_b"],
                          build_job=(job.job_id, running.worker_id))  # fmt: skip
    worker.close()
    assert writer.get_prefix("long").version == 1


def test_the_cli_submits_follows_lists_and_shows_jobs(stack, tmp_path):
    rng = random.Random(5)
    prefix, traces = tmp_path / "prefix.txt", tmp_path / "traces.txt"
    prefix.write_text("\n\n".join(_text(rng, 15) for _ in range(4)))
    traces.write_text("\n\n".join(_text(rng, 10) for _ in range(12)))
    env = {"MEMDB_SERVER": stack["server"].address, "MEMDB_API_KEY": stack["writer_key"],
           "MEMDB_MODEL": None}  # fmt: skip
    runner = CliRunner()
    res = runner.invoke(cli, ["--json", "prefix", "insert", "cli-doc", "-p", str(prefix), "-t",
                              str(traces), "--budget", "8", "--model-fingerprint",
                              stack["fp_a"]], env=env)  # fmt: skip
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)
    assert (info["name"], info["version"], info["budget"]) == ("cli-doc", 1, 8)
    assert "queued for model" in res.stderr
    # with torch and the worker unimportable (a client-only install) the job path still works
    blocked = "import sys; sys.modules.update(torch=None, transformers=None, memdb_worker=None)"
    script = f"{blocked}; from memdb_client.cli import main; sys.argv[0] = 'memdb-admin'; main()"
    out = subprocess.run(
        [sys.executable, "-c", script, "-q", "--json", "prefix", "update", "cli-doc",
         "-p", str(prefix), "-t", str(traces), "--budget", "4"],
        env={**os.environ, **{k: v for k, v in env.items() if v}}, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0 and json.loads(out.stdout)["version"] == 2, out.stderr
    res = runner.invoke(cli, ["prefix", "append", "cli-doc", "-p", str(traces)], env=env)
    assert res.exit_code == 0 and "appended to prefix 'cli-doc' version 3" in res.stderr, res.stderr
    res = runner.invoke(cli, ["--json", "build", "list", "--all"], env=env)
    jobs = [j for j in json.loads(res.stdout) if j["spec"]["name"] == "cli-doc"]
    assert [j["state"] for j in jobs] == ["done"] * 3 and jobs[0]["spec"]["append"]
    res = runner.invoke(cli, ["build", "show", jobs[2]["job_id"]], env=env)
    assert res.exit_code == 0 and "done" in res.stdout and "cli-doc" in res.stdout
    res = runner.invoke(cli, ["build", "cancel", jobs[2]["job_id"]], env=env)
    assert res.exit_code == 4 and "already done" in res.stderr
    res = runner.invoke(cli, ["prefix", "insert", "cli-x", "-p", str(prefix), "-t", str(traces),
                              "--model-fingerprint", "sha256:nobody"], env=env)  # fmt: skip
    assert res.exit_code == 4 and "no worker holding model" in res.stderr


def test_on_etcd_a_job_is_claimed_once_across_nodes_and_requeued_after_its_lease(tmp_path):
    """The cluster backend's job records (backends.cluster_jobs): two nodes' `Jobs` on one
    etcd, eight workers claiming at once through both."""
    from concurrent.futures import ThreadPoolExecutor

    from memdb_server.backends.cluster_jobs import EtcdJobTable
    from memdb_server.backends.etcd_gateway import EtcdClient
    from memdb_server.build_jobs import JobRecord, Jobs
    from memdb_server.cluster_process import etcd_cluster

    with etcd_cluster(tmp_path, members=1) as etcd:
        clients = [EtcdClient(etcd.client_urls) for _ in range(2)]
        nodes = [Jobs(EtcdJobTable(c, b"/jobs-test/"), lease_s=1.0) for c in clients]
        rec = nodes[0].submit(JobRecord("", "t", "p", "create", "fp", budget=4), b'{"x": 1}')
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda i: nodes[i % 2].claim("fp", f"w{i}"), range(8)))
        winners = [g for g in got if g is not None]
        assert len(winners) == 1 and winners[0].job_id == rec.job_id
        assert nodes[1].table.inputs(rec.job_id) == b'{"x": 1}'
        holder = winners[0].worker_id
        assert nodes[1].report(rec.job_id, holder, "running", layers_fitted=1).state == "running"
        with pytest.raises(Aborted):
            nodes[0].report(rec.job_id, "intruder", "running")
        time.sleep(1.2)  # the lease lapses: the next claim, on either node, takes the job over
        again = nodes[1].claim("fp", "w-late")
        assert again.job_id == rec.job_id and again.attempts == 2
        with pytest.raises(Aborted, match="no longer held"):
            nodes[0].report(rec.job_id, holder, "running")
        assert nodes[0].finish(rec.job_id, 1).state == "done"
        assert nodes[1].get(rec.job_id).state == "done" and nodes[0].claim("fp", "w9") is None
        assert "fp" in nodes[1].live_models(60)
        for c in clients:
            c.close()


def test_on_the_cluster_backend_a_job_submitted_on_one_node_is_uploaded_through_another(
    cluster_planes, tmp_path
):
    """Two memdb-server nodes (etcd + Redis Cluster): the job's record, claim, upload and done
    are one job whichever node each call reaches."""
    from memdb_server.cluster_process import memdb_cluster

    etcd, redis = cluster_planes
    with memdb_cluster(tmp_path, etcd, redis, nodes=2, build_lease_s=60) as (n1, n2):
        root1, root2 = MemdbClient(n1.address, n1.admin_key), MemdbClient(n2.address, n2.admin_key)
        key, _ = root1.create_api_key("worker")
        w2 = MemdbClient(n2.address, key)
        assert w2.claim_build("w", "sha256:cluster") == (None, 60.0)
        job = root1.submit_build(_spec("c", random.Random(6), model_fingerprint="sha256:cluster"))
        got, _ = w2.claim_build("w", "sha256:cluster")
        assert got.job_id == job.job_id and got.spec.traces
        w2.report_build(job.job_id, "w", "running", stage="upload", total_bytes=100)
        info = w2.put_prefix("c", _one_shard(), model_fingerprint="sha256:cluster",
                             build_job=(job.job_id, "w"))  # fmt: skip
        assert info.version == 1 and info.tenant == "default"
        done = root1.get_build(job.job_id)
        assert (done.state, done.version) == ("done", 1)
        assert root1.get_prefix("c").build_params["build_job"] == job.job_id
        with pytest.raises(FailedPrecondition, match="already done"):
            w2.put_prefix("c", _one_shard(), model_fingerprint="sha256:cluster",
                          build_job=(job.job_id, "w"))  # fmt: skip
        for c in (root1, root2, w2):
            c.close()
