"""Generates the Python stubs of proto/memdb/v1/memdb.proto into memdb/v1/.

Run `python -m memdb.protogen` after editing the proto; `tests/test_proto.py` fails while the
committed stubs differ from freshly generated ones. Needs grpcio-tools (the `dev` extra),
pinned in pyproject.toml so the output is reproducible.
"""

from __future__ import annotations

import argparse
import importlib.resources
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("memdb/v1/memdb.proto")


def generate(out_dir: Path, proto_root: Path = ROOT / "proto") -> list[Path]:
    """Run protoc on the memdb proto; returns the files written under `out_dir`."""
    from grpc_tools import protoc

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(proto_root / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto_root / PROTO}")
    stem = out_dir / PROTO.parent
    return sorted(stem.glob("memdb_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repo)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
