"""Who may import whom: the client imports nothing of the worker, the wire layer (memdb/)
nothing of the server, client or worker. Read from the source with `ast`, lazy imports
inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the worker extra's packages: a client-only install has none of them
WORKER = ("memdb_worker", "torch", "transformers", "faiss")


def imported(path: Path) -> set[str]:
    """The top-level package of every module `path` imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def offenders(folder: str, banned: tuple[str, ...]) -> dict[str, list[str]]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}"
    found = {str(p.relative_to(ROOT)): sorted(imported(p) & set(banned)) for p in files}
    return {k: v for k, v in found.items() if v}


def test_the_client_imports_nothing_of_the_worker():
    assert offenders("client/memdb_client", (*WORKER, "memdb_server")) == {}


def test_the_wire_layer_imports_neither_server_client_nor_worker():
    assert offenders("memdb", ("memdb_server", "memdb_client", *WORKER)) == {}


def test_build_options_need_no_numpy():
    assert imported(ROOT / "memdb" / "build_options.py") & {"numpy", "ml_dtypes", "grpc"} == set()


@pytest.mark.parametrize("source", ["import memdb_worker.x", "from torch import nn"])
def test_a_lazy_import_inside_a_function_is_found(tmp_path, source):
    p = tmp_path / "m.py"
    p.write_text(f"def f():\n    {source}\n")
    assert imported(p) & set(WORKER)
