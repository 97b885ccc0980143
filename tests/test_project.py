"""Project plumbing: generated stubs are fresh, docker-compose is sound, the README's commands
are the ones CI runs."""

from __future__ import annotations

from pathlib import Path

import yaml

from memdb.protogen import generate

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_freshly_generated_ones(tmp_path):
    fresh = generate(tmp_path)
    assert fresh, "protoc produced nothing"
    for path in fresh:
        committed = ROOT / "memdb" / "v1" / path.name
        assert committed.exists(), f"{committed} missing: run python -m memdb.protogen"
        assert committed.read_text() == path.read_text(), (
            f"{committed.name} is stale: run python -m memdb.protogen and commit the result"
        )


def test_docker_compose_has_server_with_health_check_and_gpu_worker():
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    server, worker = spec["services"]["server"], spec["services"]["worker"]
    assert "memdb_server.healthcheck" in " ".join(server["healthcheck"]["test"])
    assert any(v.endswith(":/data") for v in server["volumes"])
    assert "--data-dir" in server["command"] and "/data" in server["command"]
    assert "memdb-data" in spec["volumes"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert worker["depends_on"]["server"]["condition"] == "service_healthy"
    assert (ROOT / "Dockerfile").exists()


def test_healthcheck_module_reports_a_running_server(tmp_path):
    from memdb_server.config import ServerConfig
    from memdb_server.healthcheck import check
    from memdb_server.server import run_server

    cfg = ServerConfig(data_dir=tmp_path, listen="127.0.0.1:0", metrics_listen="", admin_key="k")
    with run_server(cfg) as s:
        assert check(s.address)
    assert not check(s.address, timeout=0.5)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci
