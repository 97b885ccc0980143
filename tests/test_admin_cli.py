"""memdb-admin end to end: every subcommand against real server processes.

The CLI runs in-process through click's CliRunner (fast) and, where it matters (the installed
script, Ctrl-C during an upload), as a real `memdb-admin` subprocess. Builds use the real
SmolLM2 model from the session fixture (injected into the CLI's model cache, never loaded
twice) on a few TREC examples with a tiny budget.
"""

from __future__ import annotations

import _thread
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from click.testing import CliRunner

from memdb.shards import Shard, encode_shard
from memdb_client import MemdbClient, output, portable
from memdb_client.cli import cli
from memdb_server.process import DEFAULT_ADMIN_KEY as ROOT
from memdb_server.process import server_process, start_server
from memdb_worker.demo import DATA

TREC = DATA / "trec" / "train.jsonl"  # ../shared/data, or MEMDB_DATA
FP = "fp-admin-test"
CLEAN_ENV = {
    "MEMDB_SERVER": None,
    "MEMDB_API_KEY": None,
    "MEMDB_MODEL": None,
    "MEMDB_ADMIN_DEBUG": None,
    "MEMDB_TLS": None,
    "MEMDB_TLS_CA": None,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with server_process(tmp_path_factory.mktemp("admin-a")) as s:
        yield s


@pytest.fixture(scope="module")
def server2(tmp_path_factory):
    with server_process(tmp_path_factory.mktemp("admin-b")) as s:
        yield s


def run(server, *args, key=ROOT, input=None):
    """Invoke memdb-admin in-process; returns click's Result (stdout, stderr, exit_code)."""
    base = ["--server", server.address] if server is not None else []
    base += ["--api-key", key] if key else []
    runner = CliRunner(env=CLEAN_ENV)
    return runner.invoke(cli, [*base, "-q", *args], input=input, catch_exceptions=False)


def run_json(server, *args, key=ROOT):
    res = run(server, "--json", *args, key=key)
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def fail(res, code: int, *needles: str) -> None:
    """A failure: the exit code, one line on stderr naming the problem, no traceback."""
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    err = lines[-1] if lines else ""  # a confirmation prompt may come before it
    assert (
        err.startswith("memdb-admin: error: ") and res.stderr.count("memdb-admin: error:") == 1
    ), err
    assert "Traceback" not in res.output
    for n in needles:
        assert n in err, (n, err)


def synthetic(layers=3, groups=2, m=32, dk=16, seed=0) -> list[Shard]:
    rng = np.random.default_rng(seed)
    return [
        Shard(
            keys=rng.standard_normal((groups, m, dk)).astype(np.float32),
            out=rng.standard_normal((groups, m, 1, dk)).astype(np.float32),
            lse=rng.standard_normal((groups, m, 1)).astype(np.float32),
            metadata={"layer": str(i)},
        )
        for i in range(layers)
    ]


def put(server, name, shards=None, fp=FP, **kw):
    with MemdbClient(server.address, ROOT) as c:
        return c.put_prefix(
            name,
            shards or synthetic(),
            model_fingerprint=fp,
            token_count=77,
            build_params={"budget": "32", "note": "synthetic"},
            **kw,
        )


def names(server) -> set[str]:
    return {p["name"] for p in run_json(server, "prefix", "list")}


def lookups(server, name, fp, layers, queries_per_layer) -> list:
    with MemdbClient(server.address, ROOT) as c:
        return [
            c.lookup(name, layer, q, model_fingerprint=fp, k=3)
            for layer, q in zip(layers, queries_per_layer, strict=True)
        ]


def assert_same_lookups(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        for f in ("ids", "scores", "out", "lse"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))


# -- the installed script, status, tenants, keys --
def test_installed_script_runs_without_torch_and_prints_json(server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMDB_")}
    env.update(MEMDB_SERVER=server.address, MEMDB_API_KEY=ROOT)
    probe = (
        "import sys, memdb_client.cli; "
        "assert 'torch' not in sys.modules and 'memdb_worker' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, env=env, timeout=60)
    script = Path(sys.executable).parent / "memdb-admin"
    p = subprocess.run(
        [str(script), "--json", "status"], capture_output=True, text=True, env=env, timeout=60
    )
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    assert st["health"] == "SERVING" and st["stats"]["server_version"]
    p = subprocess.run(
        [str(script), "prefix", "show", "nope"], capture_output=True, text=True, env=env, timeout=60
    )
    assert p.returncode == 3 and p.stderr.strip() == "memdb-admin: error: prefix 'nope' not found"


def test_status_table_json_and_health_without_a_key(server):
    res = run(server, "status")
    assert res.exit_code == 0 and "health:      SERVING" in res.stdout
    assert "TENANT" in res.stdout and "default" in res.stdout
    st = run_json(server, "status")
    assert st["stats"]["num_tenants"] >= 1 and "default" in st["stats"]["tenants"]
    res = run(server, "status", key="")
    assert res.exit_code == 0 and "SERVING" in res.stdout and "no API key" in res.stdout


def test_tenants_and_keys_lifecycle(server):
    t = run_json(server, "tenant", "create", "acme", "--max-prefixes", "5", "--max-bytes", "1GiB")
    assert t["name"] == "acme" and t["max_prefixes"] == 5 and t["max_bytes"] == 1 << 30
    fail(run(server, "tenant", "create", "acme"), 4, "tenant 'acme' already exists")
    assert "acme" in {x["name"] for x in run_json(server, "tenant", "list")}
    assert "acme" in run(server, "tenant", "list").stdout

    w = run_json(
        server, "key", "create", "--tenant", "acme", "--role", "writer", "--description", "ci"
    )
    assert w["api_key"].startswith("mdb_") and w["role"] == "writer" and w["tenant"] == "acme"
    r = run_json(server, "key", "create", "--tenant", "acme", "--role", "reader")
    listed = run_json(server, "key", "list", "--tenant", "acme")
    assert {k["key_id"] for k in listed} == {w["key_id"], r["key_id"]}
    assert all("api_key" not in k for k in listed) and w["api_key"] not in str(listed)

    assert run_json(server, "prefix", "list", key=w["api_key"]) == []  # its own empty tenant
    fail(run(server, "tenant", "list", key=w["api_key"]), 5, "permission denied")
    fail(run(server, "prefix", "delete", "-y", "x", key=r["api_key"]), 5, "permission denied")

    assert run_json(server, "key", "revoke", w["key_id"])["revoked"] is True
    fail(run(server, "prefix", "list", key=w["api_key"]), 5, "refused the API key")
    fail(run(server, "key", "revoke", w["key_id"]), 3, "not found")

    res = run(server, "tenant", "delete", "acme", input="n\n")
    fail(res, 1, "aborted")
    assert run(server, "tenant", "delete", "acme", "--yes").exit_code == 0
    assert "acme" not in {x["name"] for x in run_json(server, "tenant", "list")}


def test_server_down_and_wrong_key_fail_with_one_line(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = CliRunner(env=CLEAN_ENV).invoke(
        cli, ["--server", f"127.0.0.1:{port}", "--api-key", ROOT, "prefix", "list"]
    )
    fail(res, 6, f"cannot reach the memdb server at 127.0.0.1:{port}")
    fail(run(server, "prefix", "list", key="mdb_nothere_secret"), 5, "refused the API key")
    fail(run(server, "prefix", "list", key=""), 5, "missing API key")


# -- prefixes without a model: list, show, delete, export, import --
def test_list_show_delete(server):
    put(server, "plain")
    rows = run_json(server, "prefix", "list", "--name-prefix", "pla")
    assert [r["name"] for r in rows] == ["plain"] and rows[0]["budget"] == 32
    table = run(server, "prefix", "list").stdout
    assert table.splitlines()[0].split()[:3] == ["NAME", "VERSION", "LAYERS"] and "plain" in table
    info = run_json(server, "prefix", "show", "plain")
    assert (info["version"], info["num_layers"], info["token_count"]) == (1, 3, 77)
    assert info["build_params"]["note"] == "synthetic" and info["created_at"].endswith("Z")
    text = run(server, "prefix", "show", "plain").stdout
    assert "budget:        32" in text and "note" in text
    fail(run(server, "prefix", "show", "missing"), 3, "prefix 'missing' not found")

    fail(run(server, "prefix", "delete", "plain", input="n\n"), 1, "aborted")
    fail(run(server, "prefix", "delete", "plain", "--version", "9", "-y"), 4, "version")
    res = run(server, "prefix", "delete", "plain", input="y\n")
    assert res.exit_code == 0 and "deleted prefix 'plain' (version 1)" in res.stdout
    assert "plain" not in names(server)


def test_export_import_round_trip_gives_identical_lookups(server, server2, tmp_path):
    put(server, "moved", synthetic(seed=3), index_kind="flat")
    tar = tmp_path / "moved.tar"
    out = run_json(server, "prefix", "export", "moved", str(tar))
    assert out["kind"] == "tar" and tar.is_file()
    fail(run(server, "prefix", "export", "moved", str(tar)), 2, "already exists", "--force")

    got = run_json(server2, "prefix", "import", str(tar))
    want = run_json(server, "prefix", "show", "moved")
    for f in (
        "name",
        "model_fingerprint",
        "budget",
        "num_layers",
        "num_groups",
        "key_dim",
        "token_count",
        "build_params",
        "bytes",
        "index_kind",
        "metric",
        "dtype",
    ):
        assert got[f] == want[f], f
    rng = np.random.default_rng(9)
    qs = [rng.standard_normal((5, 2, 16)).astype(np.float32) for _ in range(3)]
    assert_same_lookups(
        lookups(server, "moved", FP, range(3), qs), lookups(server2, "moved", FP, range(3), qs)
    )

    fail(run(server2, "prefix", "import", str(tar)), 4, "already exists", "--replace")
    assert run_json(server2, "prefix", "import", str(tar), "--replace")["version"] == 2
    folder = tmp_path / "as-dir"
    folder.mkdir()
    assert run_json(server, "prefix", "export", "moved", str(folder))["kind"] == "directory"
    assert (folder / "manifest.json").is_file()
    assert run_json(server2, "prefix", "import", str(folder), "--name", "copy")["name"] == "copy"

    bad = tmp_path / "bad.tar"
    good = portable.read(tar)
    blobs = list(good.blobs)
    blobs[1] = blobs[1][:-1] + bytes([blobs[1][-1] ^ 1])  # one bit flipped after export
    with tarfile.open(bad, "w") as t:
        for name, data in [
            ("manifest.json", json.dumps(portable.manifest(good)).encode()),
            *((f"shards/layer-{i:05d}.safetensors", b) for i, b in enumerate(blobs)),
        ]:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            t.addfile(member, io.BytesIO(data))
    fail(run(server2, "prefix", "import", str(bad), "--name", "bad"), 2, "layer 1 is damaged")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    fail(run(server2, "prefix", "import", str(tmp_path / "junk.tar")), 2, "not a memdb export")
    fail(run(server2, "prefix", "import", str(tmp_path / "none.tar")), 2, "does not exist")
    assert "bad" not in names(server2)


def test_rejected_uploads_leave_nothing_and_quotas_exit_7(server, tmp_path):
    nan = synthetic(layers=3, seed=4)
    blobs = [encode_shard(s) for s in nan]
    nan[1].out[0, 0, 0, 0] = np.nan  # encode_shard refuses NaN: write the layer by hand
    blobs[1] = safetensors.numpy.save({"keys": nan[1].keys, "out": nan[1].out, "lse": nan[1].lse})
    meta = {"name": "nan", "num_layers": 3, "model_fingerprint": FP}
    portable.write(tmp_path / "nan.tar", portable.Portable(meta, blobs))
    fail(
        run(server, "prefix", "import", str(tmp_path / "nan.tar")),
        2,
        "the server rejected the request",
        "layer 1",
        "NaN",
    )
    assert "nan" not in names(server)

    run_json(server, "tenant", "create", "tight", "--max-prefixes", "1")
    key = run_json(server, "key", "create", "--tenant", "tight", "--role", "writer")["api_key"]
    good = tmp_path / "good.tar"
    blobs = [encode_shard(s) for s in synthetic(layers=2)]
    portable.write(good, portable.Portable({**meta, "name": "one", "num_layers": 2}, blobs))
    assert run_json(server, "prefix", "import", str(good), key=key)["tenant"] == "tight"
    fail(run(server, "prefix", "import", str(good), "--name", "two", key=key), 7, "max_prefixes")
    assert {p["name"] for p in run_json(server, "prefix", "list", key=key)} == {"one"}


def test_ctrl_c_during_upload_cancels_it_and_stores_nothing(server, tmp_path, monkeypatch):
    tar = tmp_path / "intr.tar"
    blobs = [encode_shard(s) for s in synthetic(layers=4, seed=5)]
    portable.write(
        tar,
        portable.Portable(
            {"name": "intr", "num_layers": 4, "model_fingerprint": FP, "token_count": 1}, blobs
        ),
    )
    sent = []

    def ctrl_c_after_first_chunk(self, n):  # runs on gRPC's sending thread
        if not sent:
            sent.append(n)
            time.sleep(0.2)  # the main thread is now waiting for the answer
            _thread.interrupt_main()  # what Ctrl-C does
            time.sleep(1.0)  # hold the rest of the stream back meanwhile

    monkeypatch.setattr(output.ByteProgress, "update", ctrl_c_after_first_chunk)
    # Ctrl-C's own handler, also where the runner ignores SIGINT (a background job's does)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = run_json(server, "status")["stats"]["num_prefixes"]
        fail(run(server, "prefix", "import", str(tar)), 130, "interrupted")
        time.sleep(1.5)  # let the held-back sender notice the cancellation
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    assert "intr" not in names(server)
    assert run_json(server, "status")["stats"]["num_prefixes"] == before
    assert run_json(server, "prefix", "import", str(tar))["version"] == 1  # still serving


def test_sigint_to_a_real_process_mid_upload_leaves_no_trace(tmp_path):
    """SIGINT to `memdb-admin prefix import` while the (frozen) server is still receiving."""
    srv = start_server(tmp_path / "data")
    try:
        tar = tmp_path / "big.tar"
        blobs = [encode_shard(s) for s in synthetic(layers=4, groups=4, m=8192, dk=64, seed=1)]
        portable.write(
            tar, portable.Portable({"name": "big", "num_layers": 4, "model_fingerprint": FP}, blobs)
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMDB_")}
        script = Path(sys.executable).parent / "memdb-admin"
        p = subprocess.Popen(
            [str(script), "--server", srv.address, "--api-key", ROOT, "prefix", "import", str(tar)],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            # SIGINT as at a terminal, also where the runner ignores it (a background job's does)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        assert p.stderr is not None
        line = p.stderr.readline()
        assert line.startswith("uploading"), line
        srv.proc.send_signal(signal.SIGSTOP)  # the upload cannot finish now
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        rest = p.communicate(timeout=30)[1]
        srv.proc.send_signal(signal.SIGCONT)
        assert p.returncode == 130, rest
        assert "memdb-admin: error: interrupted" in rest and "Traceback" not in rest
        with MemdbClient(srv.address, ROOT) as c:
            assert c.list_prefixes() == [] and c.stats().num_prefixes == 0
        assert "stored default/big" not in srv.log()
    finally:
        srv.proc.send_signal(signal.SIGCONT)
        srv.stop()


# -- bad input --
def test_bad_inputs_fail_before_any_work(server, tmp_path):
    missing = tmp_path / "nope.txt"
    fail(run(server, "prefix", "insert", "x", "-p", str(missing)), 2, "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    fail(run(server, "prefix", "insert", "x", "-p", str(empty)), 2, "is empty")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": "b"}\n{"text": oops}\n')
    fail(
        run(server, "prefix", "insert", "x", "-p", str(broken)), 2, "broken.jsonl:2: not valid JSON"
    )
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a", "label": "b"}\n')
    fail(
        run(server, "prefix", "insert", "x", "-p", str(good), "--format", "{question}"),
        2,
        "needs the field 'question'",
        "label, text",
    )
    fail(
        run(server, "prefix", "update", "nothing-here", "-p", str(good)),
        3,
        "prefix 'nothing-here' not found",
        "prefix insert",
    )
    put(server, "taken")
    fail(
        run(server, "prefix", "insert", "taken", "-p", str(good)),
        4,
        "already exists",
        "prefix update",
    )
    fail(
        run(server, "prefix", "insert", "x", "--local", "-p", str(good), "--model", "/no"),
        2,
        "cannot load model",
    )
    fail(
        run(server, "prefix", "insert", "x", "-p", str(good), "--granularity", "head"),
        2,
        "bad build option",
        "pass entry_state='average'",
    )
    # a value outside a build option's choices is a usage error of click (flags from the fields)
    res = run(server, "prefix", "insert", "x", "-p", str(good), "--key-mode", "sideways")
    assert res.exit_code == 2 and "'--key-mode': 'sideways' is not one of" in res.stderr
    assert "Traceback" not in res.output
    assert "x" not in names(server)


# -- builds with the real model --
@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for torch and FAISS while these tests build: on a shared 2-core machine
    spinning OpenMP threads make builds 10-50x slower. Restored afterwards."""
    import faiss
    import torch

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    faiss.omp_set_num_threads(before[1])


@pytest.fixture
def model_in_cli(smollm2, one_thread, monkeypatch):
    """The CLI's `--model default` on CPU is the session's SmolLM2 (never loaded twice)."""
    from memdb_worker.build import local

    monkeypatch.setitem(local._MODELS, ("default", "cpu", "auto"), smollm2)
    return smollm2


def _trec_args(n_prefix=8, n_traces=4, local=True):
    """TREC prefix and traces; `local`: built in this process (--local, not a build job)."""
    if not TREC.is_file():
        pytest.skip(f"{TREC} not found")
    return ["--local"] * local + [
        "-p",
        str(TREC),
        "--prefix-limit",
        str(n_prefix),
        "-t",
        str(TREC),
        "--traces-skip",
        str(n_prefix),
        "--traces-limit",
        str(n_traces),
    ]


@pytest.mark.model
def test_insert_update_append_export_with_smollm2(server, server2, model_in_cli, tmp_path):
    model, tok = model_in_cli
    # looked-up entries, one per head with q_mean: `prefix append`'s exact path (group-mean
    # memories get estimated per-head queries, test_worker_append.py; the defaults, fitted rows,
    # take the chunk's rows: test_append_to_a_memory_built_with_default_options)
    head = ["--entry-state", "average", "--granularity", "head", "--lse-correction"]
    ins = run(server, "--json", "prefix", "insert", "trec", *_trec_args(), *head, "--budget", "8")
    assert ins.exit_code == 0, ins.stderr
    v1 = json.loads(ins.stdout)
    assert (v1["version"], v1["budget"], v1["num_layers"], v1["num_groups"]) == (1, 8, 30, 9)
    bp = v1["build_params"]
    assert bp["source"] == str(TREC) and bp["key_mode"] == "pre_rope" and bp["trace_count"] == "4"
    assert bp["chunk_mass"] == "mean"  # the default (one chunk here: no weighting)
    assert v1["token_count"] == int(bp["prefix_length"]) > 50
    fail(
        run(server, "prefix", "insert", "trec", *_trec_args(), "--budget", "8"), 4, "already exists"
    )

    upd = run(
        server, "--json", "prefix", "update", "trec", *_trec_args(), *head, "--budget", "16",
        "--seed", "1", "--chunk-mass", "sum",
    )  # fmt: skip
    assert upd.exit_code == 0, upd.stderr
    v2 = json.loads(upd.stdout)
    assert (v2["version"], v2["budget"], v2["build_params"]["seed"]) == (2, 16, "1")
    assert v2["build_params"]["chunk_mass"] == "sum"

    fail(
        run(server, "prefix", "update", "trec", *_trec_args(), *head, "--budget", "999"),
        2,
        "budget M=999 exceeds the",
        "calibration tokens",
    )

    app = run(
        server,
        "--json",
        "prefix",
        "append",
        "trec",
        "--local",
        "-p",
        str(TREC),
        "--prefix-skip",
        "100",
        "--prefix-limit",
        "3",
    )
    assert app.exit_code == 0, app.stderr
    v3 = json.loads(app.stdout)
    assert v3["version"] == 3 and v3["token_count"] > v2["token_count"]
    assert json.loads(v3["build_params"]["chunk_lengths"])[0] == v2["token_count"]
    with MemdbClient(server.address, ROOT) as c:
        fp = v3["model_fingerprint"]
        old = c.fetch_memory("trec", model_fingerprint=fp, version=2).shards
        new = c.fetch_memory("trec", model_fingerprint=fp, version=3).shards
    assert all(np.array_equal(a.keys, b.keys) for a, b in zip(old, new, strict=True))
    assert not np.allclose(old[5].out, new[5].out)
    assert new[0].metadata["appended_chunks"] == f"[{v3['token_count'] - v2['token_count']}]"

    tar = tmp_path / "trec.tar"
    assert run(server, "prefix", "export", "trec", str(tar)).exit_code == 0
    assert run(server2, "prefix", "import", str(tar)).exit_code == 0
    rng = np.random.default_rng(0)
    qs = [rng.standard_normal((4, 9, 64)).astype(np.float32) for _ in range(2)]
    assert_same_lookups(
        lookups(server, "trec", fp, [0, 29], qs), lookups(server2, "trec", fp, [0, 29], qs)
    )


@pytest.mark.model
def test_append_to_a_memory_built_with_default_options(server, model_in_cli):
    """The README's flow: `prefix insert` with the builder's defaults (fitted rows per KV head,
    float8 keys, bfloat16 values), then `prefix append`: a new version whose rows are the old
    ones and the appended text's own keys and values (bias 0). A budget past the prefix's
    tokens is bad input (exit 2) before anything is built or stored."""
    ins = run_json(server, "prefix", "insert", "trec-default", *_trec_args(), "--budget", "8")
    assert (ins["num_groups"], ins["key_dim"], ins["budget"]) == (3, 64, 8)  # rows per KV head
    n = ins["token_count"]
    fail(
        run(server, "prefix", "insert", "trec-over", *_trec_args(), "--budget", str(n + 1)),
        2,
        f"budget M={n + 1} exceeds the prefix's {n} tokens",
        "lower --budget",
    )
    assert "trec-over" not in names(server)
    app = run_json(
        server, "prefix", "append", "trec-default", "--local", "-p", str(TREC),
        "--prefix-skip", "100", "--prefix-limit", "3",
    )  # fmt: skip
    added = app["token_count"] - n
    assert app["version"] == 2 and added > 0 and app["budget"] == 8 + added
    with MemdbClient(server.address, ROOT) as c:
        fp = app["model_fingerprint"]
        old = c.fetch_memory("trec-default", model_fingerprint=fp, version=1).shards
        new = c.fetch_memory("trec-default", model_fingerprint=fp, version=2).shards
    assert old[0].metadata["entry_state"] == new[0].metadata["entry_state"] == "fitted"
    for a, b in zip(old, new, strict=True):
        assert a.keys.dtype.name == b.keys.dtype.name == "float8_e4m3fn" and not b.extras
        assert a.values.dtype.name == b.values.dtype.name == "bfloat16"
        assert a.keys.shape == (3, 8, 64) and b.keys.shape == (3, 8 + added, 64)
        assert a.values.shape == (3, 8, 1, 64) and b.bias.shape == (3, 8 + added, 1)
        for x, y in ((a.keys, b.keys), (a.key_scale, b.key_scale), (a.values, b.values),
                     (a.bias, b.bias)):  # fmt: skip
            assert np.array_equal(x, y[:, :8])  # the fitted rows, as they were
        assert (b.bias[:, 8:] == 0).all()  # the appended tokens' rows: their own KV, bias 0


@pytest.mark.model
def test_append_refuses_a_memory_of_another_model(server, model_in_cli, tmp_path):
    put(server, "foreign", fp="sha256:" + "0" * 64)
    text = tmp_path / "more.txt"
    text.write_text("More text for the memory.")
    fail(
        run(server, "prefix", "append", "foreign", "--local", "-p", str(text)),
        4,
        "was built with model sha256:000000000000",
        "append with the model that built it",
    )


@pytest.mark.model
def test_build_writes_a_portable_file_without_a_server(model_in_cli, tmp_path, server2):
    out = tmp_path / "built.tar"
    res = CliRunner(env=CLEAN_ENV).invoke(
        cli,
        ["-q", "--json", "prefix", "build", "offline", "-o", str(out), *_trec_args(local=0)]
        + ["-m", "4"],
    )
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["prefix"]["budget"] == 4
    info = run_json(server2, "prefix", "import", str(out))
    assert (info["name"], info["budget"], info["num_layers"]) == ("offline", 4, 30)


@pytest.mark.model
@pytest.mark.parametrize("mass", ["sum", "mean"])
def test_append_equals_a_rebuild_on_both_chunks_where_it_is_exact(model_in_cli, mass):
    """Layer-0 queries do not depend on the prefix, and M = records keeps every query exact:
    there, appending B to a memory of A must equal building on the chunks [A; B] when B
    restarts at position 0 without a sink (past the context). Within the context B is placed
    at its true positions after A instead (the live queries move with it)."""
    from memdb_worker.build import local
    from memdb_worker.build.append import entry_queries
    from memdb_worker.build.builder import build_memory, calibrate, cluster
    from memdb_worker.memory.memory import keyspace_from_metadata
    from tests.tiny import reference_options

    model, tok = model_in_cli
    a = tok("The secret password is zebra. Remember it well, the password is zebra.").input_ids
    b = tok(
        " Paris is the capital of France and Rome is the capital of Italy.",
        add_special_tokens=False,
    ).input_ids
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    traces = [[t] for t in tok(" what opens the door", add_special_tokens=False).input_ids]
    m = len(traces)
    opts = reference_options(chunk_tokens=n, sink_tokens=0, chunk_mass=mass)
    ref = build_memory(model, tok, a + b, traces, m, opts, progress=False)
    base = build_memory(model, tok, a, traces, m, opts, progress=False)
    got = local.append_chunk(model, tok, base.shards, b, chunk_tokens=n, progress=False)
    assert got.token_count == 2 * n and got.metadata["chunk_lengths"] == f"[{n}, {n}]"
    np.testing.assert_array_equal(ref.shards[0].keys, got.shards[0].keys)
    np.testing.assert_allclose(got.shards[0].out, ref.shards[0].out, atol=1e-5)
    np.testing.assert_allclose(got.shards[0].lse, ref.shards[0].lse, atol=1e-5)
    # within the context: B at its true positions, the queries after the whole prefix
    base = build_memory(model, tok, a, traces, m, reference_options(), progress=False)
    got = local.append_chunk(model, tok, base.shards, b, progress=False)
    assert got.metadata["prefix_length"] == str(2 * n) and got.query_position == 2 * n

    # every key mode gives back the entries' exact queries (the inputs of the merge)
    calib = calibrate(model, tok, a, traces, reference_options(), progress=False)
    for opts in (
        reference_options(key_mode="rope_common", whiten=True, granularity="kv_group"),
        reference_options(whiten=True, whiten_center=True, granularity="layer"),
    ):
        mem = cluster(calib, m, opts, progress=False)
        ks = keyspace_from_metadata(mem.shards[0].metadata, mem.shards)
        for layer in (0, 17):
            q = entry_queries(mem.shards[layer], ks, layer)  # [I, M, h, d]
            q = q.permute(1, 0, 2, 3).reshape(m, -1, q.shape[-1])
            want = calib.q_pre[layer]
            assert float((q - want).abs().max() / want.abs().max()) < 1e-4
