"""What only a real server process shows: restarts, crashes, signals, the CLI and config."""

from __future__ import annotations

import re
import signal
import urllib.request

import numpy as np
import pytest

from memdb_client import MemdbClient
from memdb_server.config import load_config
from memdb_server.process import server_process, start_server
from tests.test_server import FP, make_shards


def _metric(address: str, name: str) -> float:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in metrics"
    return float(m.group(1))


def test_restart_keeps_everything_and_rebuilds_no_index(tmp_path):
    shards = make_shards(seed=3)
    q = shards[1].keys[:, [7]].transpose(1, 0, 2)
    with server_process(tmp_path) as s, MemdbClient(s.address, s.admin_key) as c:
        c.create_tenant("t1")
        key, _ = c.create_api_key("writer", tenant="t1")
        c.put_prefix("keep", shards, model_fingerprint=FP)
        before = c.lookup("keep", 1, q, model_fingerprint=FP, k=5)
        assert _metric(s.metrics_address, "memdb_index_builds_total") == 3 * 2
    with server_process(tmp_path) as s, MemdbClient(s.address, s.admin_key) as c:
        after = c.lookup("keep", 1, q, model_fingerprint=FP, k=5)
        np.testing.assert_array_equal(after.ids, before.ids)
        np.testing.assert_array_equal(after.out, before.out)
        assert _metric(s.metrics_address, "memdb_index_builds_total") == 0
        assert _metric(s.metrics_address, "memdb_index_loads_total") >= 1
        assert [t.name for t in c.list_tenants()] == ["default", "t1"]
        with MemdbClient(s.address, key) as t1:
            assert t1.list_prefixes() == []  # the key survived, and sees its own tenant


def test_sigterm_shuts_down_gracefully(tmp_path):
    s = start_server(tmp_path)
    with MemdbClient(s.address, s.admin_key) as c:
        c.put_prefix("x", make_shards(layers=1), model_fingerprint=FP)
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(20) == 0
    assert "stopped" in s.log()


def test_crash_then_restart_recovers_the_store(tmp_path):
    s = start_server(tmp_path)
    with MemdbClient(s.address, s.admin_key) as c:
        c.put_prefix("x", make_shards(layers=2), model_fingerprint=FP)
        c.lookup("x", 0, np.zeros((1, 16), np.float32), model_fingerprint=FP)
    s.kill()  # SIGKILL: no cleanup, a stale reader slot may remain
    with server_process(tmp_path) as s2, MemdbClient(s2.address, s2.admin_key) as c:
        assert c.get_prefix("x").version == 1
        c.put_prefix("x", make_shards(layers=2), model_fingerprint=FP, mode="update")
        assert c.get_prefix("x").version == 2


def test_generated_admin_key_is_written_once_with_private_mode(tmp_path):
    from memdb_server.config import ServerConfig
    from memdb_server.server import run_server

    cfg = ServerConfig(data_dir=tmp_path, listen="127.0.0.1:0", metrics_listen="")
    with run_server(cfg) as s:
        key = s.admin_key
    path = tmp_path / "admin.key"
    assert path.read_text().strip() == key and (path.stat().st_mode & 0o777) == 0o600
    with run_server(cfg) as s, MemdbClient(s.address, key) as c:
        assert c.stats().num_tenants == 1


def test_config_precedence_is_flags_then_env_then_file(tmp_path, monkeypatch):
    f = tmp_path / "memdb.toml"
    f.write_text('listen = "127.0.0.1:1111"\nmax_k = 7\nsync = false\n')
    monkeypatch.setenv("MEMDB_CONFIG", str(f))
    c = load_config()
    assert (c.listen, c.max_k, c.sync) == ("127.0.0.1:1111", 7, False)
    monkeypatch.setenv("MEMDB_MAX_K", "9")
    assert load_config().max_k == 9
    assert load_config(max_k=11).max_k == 11
    with pytest.raises(ValueError, match="HOST:PORT"):
        load_config(listen="nonsense")


def test_tls_serves_clients_that_trust_the_certificate(tmp_path):
    import subprocess

    from memdb.errors import Unavailable
    from memdb_server.config import ServerConfig
    from memdb_server.server import run_server

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    cfg = ServerConfig(data_dir=tmp_path / "d", listen="127.0.0.1:0", metrics_listen="",
                       admin_key="k", tls_cert=cert, tls_key=key)  # fmt: skip
    with run_server(cfg) as s:
        with MemdbClient(s.address, "k", tls=True, root_certificates=cert.read_bytes()) as c:
            assert c.stats().num_tenants == 1
        with MemdbClient(s.address, "k", timeout=3) as plain, pytest.raises(Unavailable):
            plain.stats()  # a plaintext client cannot talk to a TLS server


def test_json_logs_are_one_object_per_line(tmp_path):
    import json

    s = start_server(tmp_path, log_format="json")
    s.stop()
    lines = [ln for ln in s.log().splitlines() if ln.startswith("{")]
    assert lines, s.log()
    records = [json.loads(ln) for ln in lines]
    assert {"levelname", "name", "message"} <= set(records[0])
    assert any("serving on" in r["message"] for r in records)
