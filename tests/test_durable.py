"""memdb_server.durable: a new store's folder and a generated admin.key are fsynced (file and
folder)."""

from __future__ import annotations

import os
import stat

import pytest

from memdb_server.config import ServerConfig
from memdb_server.durable import write_file_durably
from memdb_server.server import _admin_key
from memdb_server.storage import Store


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """Paths of every fd passed to os.fsync (the real fsync still runs)."""
    seen: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return seen


def test_a_new_store_fsyncs_its_new_folders(tmp_path, fsynced):
    Store(tmp_path / "a" / "db", map_size=1 << 20).close()
    assert {str(tmp_path), str(tmp_path / "a"), str(tmp_path / "a" / "db")} <= set(fsynced)


def test_a_new_store_in_an_existing_folder_fsyncs_it(tmp_path, fsynced):
    (tmp_path / "db").mkdir()  # as run_server does before opening the store
    Store(tmp_path / "db", map_size=1 << 20).close()
    assert {str(tmp_path), str(tmp_path / "db")} <= set(fsynced)


def test_write_file_durably_fsyncs_file_and_folder_and_never_overwrites(tmp_path, fsynced):
    path = tmp_path / "secret"
    write_file_durably(path, b"x" * 100_000, mode=0o600)
    assert path.read_bytes() == b"x" * 100_000
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert fsynced == [str(path), str(tmp_path)]
    with pytest.raises(FileExistsError):
        write_file_durably(path, b"y")
    assert path.read_bytes() == b"x" * 100_000


def test_a_generated_admin_key_is_written_durably(tmp_path, fsynced):
    key = _admin_key(ServerConfig(data_dir=tmp_path))
    path = tmp_path / "admin.key"
    assert path.read_text() == key + "\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert {str(path), str(tmp_path)} <= set(fsynced)
    assert _admin_key(ServerConfig(data_dir=tmp_path)) == key  # read back, not regenerated
