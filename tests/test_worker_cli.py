"""memdb-worker configuration and command line, without a model: precedence of flags >
MEMDB_* environment > TOML file > defaults, validation, and usage errors before any loading."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from memdb_worker.serve.cli import main
from memdb_worker.serve.config import load_config


def test_flags_beat_environment_beat_file(tmp_path, monkeypatch):
    cfg_file = tmp_path / "worker.toml"
    cfg_file.write_text('server = "file:1"\nlisten = "0.0.0.0:9000"\nmax_batch = 3\n')
    monkeypatch.setenv("MEMDB_SERVER", "env:2")
    monkeypatch.setenv("MEMDB_API_KEY", "k-env")
    cfg = load_config(config=cfg_file, listen="127.0.0.1:0")
    assert cfg.server == "env:2" and cfg.listen == "127.0.0.1:0" and cfg.max_batch == 3
    assert cfg.api_key.get_secret_value() == "k-env" and "k-env" not in repr(cfg)
    assert load_config(config=cfg_file, server="flag:3").server == "flag:3"
    monkeypatch.delenv("MEMDB_SERVER")
    assert load_config(config=cfg_file).server == "file:1"
    assert load_config().model == "default" and load_config().memory_mode == "cache"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--listen", "nowhere"], "HOST:PORT"),
        (["serve", "--server", "x"], "HOST:PORT"),
        (["--memory-mode", "sideways"], "sideways"),
        (["serve", "--max-batch", "0"], "max_batch"),
    ],
)
def test_bad_settings_are_usage_errors_before_loading_anything(args, needle):
    result = CliRunner().invoke(main, args, env={"MEMDB_CONFIG": ""})
    assert result.exit_code == 2 and needle in result.output


def test_help_lists_the_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "serve" in result.output and "generate" in result.output
    assert "--memory" in CliRunner().invoke(main, ["generate", "--help"]).output
