"""The portable file of one memory: what `prefix export` writes and `prefix import` reads.

A tar archive (or, when the target is a directory, the same files in it):

    manifest.json                    format, the PrefixInfo fields, one entry per shard
    shards/layer-00000.safetensors   each layer's shard, byte for byte as the server stores it
    ...

The manifest records every shard's size and sha256, checked on import; the shards are the
server's own safetensors blobs, so an import on another server stores the same bytes and
(with the same index kind and metric, also recorded) answers the same lookups. Writing goes to
a temporary name that is renamed at the end: an interrupted export leaves no partial file.
No torch, no gRPC here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "memdb-prefix"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class PortableError(ValueError):
    """A portable file that cannot be written or read (one line)."""


@dataclass
class Portable:
    prefix: dict[str, Any]  # the PrefixInfo fields (JSON values)
    blobs: list[bytes]  # each layer's safetensors bytes

    @property
    def name(self) -> str:
        return str(self.prefix.get("name", ""))

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.blobs)


def _shard_path(layer: int) -> str:
    return f"shards/layer-{layer:05d}.safetensors"


def manifest(p: Portable) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "prefix": p.prefix,
        "shards": [
            {
                "layer": i,
                "path": _shard_path(i),
                "bytes": len(b),
                "sha256": hashlib.sha256(b).hexdigest(),
            }
            for i, b in enumerate(p.blobs)
        ],
    }


def check_target(path: str | Path, *, overwrite: bool = False) -> bool:
    """Fail early if `path` cannot be written; True if it will be a directory."""
    target = Path(path)
    as_dir = str(path).endswith(("/", os.sep)) or target.is_dir()
    if target.exists() and not overwrite:
        if not (as_dir and target.is_dir() and not any(target.iterdir())):
            raise PortableError(f"'{path}' already exists; pass --force to overwrite it")
    if not target.parent.is_dir():
        raise PortableError(f"directory '{target.parent}' does not exist")
    return as_dir


def write(path: str | Path, p: Portable, *, overwrite: bool = False) -> str:
    """Write a tar file, or a directory when `path` is one or ends with '/'. Returns its kind."""
    as_dir = check_target(path, overwrite=overwrite)
    target = Path(path)
    parent = target.parent
    data = json.dumps(manifest(p), indent=2, sort_keys=True).encode()
    if as_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
        try:
            (tmp / "shards").mkdir()
            (tmp / MANIFEST).write_bytes(data)
            for i, b in enumerate(p.blobs):
                (tmp / _shard_path(i)).write_bytes(b)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return "directory"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
            _add(tar, MANIFEST, data)
            for i, b in enumerate(p.blobs):
                _add(tar, _shard_path(i), b)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return "tar"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def read(path: str | Path) -> Portable:
    """Read and check a portable file (tar or directory)."""
    src = Path(path)
    if not src.exists():
        raise PortableError(f"'{path}' does not exist")
    if src.is_dir():

        def get(name: str) -> bytes:
            f = src / name
            if not f.is_file():
                raise PortableError(f"'{path}' lacks {name}; is it a memdb export?")
            return f.read_bytes()

        return _parse(str(path), get)
    try:
        with tarfile.open(src, mode="r:*") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}

            def get(name: str) -> bytes:
                m = members.get(name)
                fobj = tar.extractfile(m) if m is not None else None
                if fobj is None:
                    raise PortableError(f"'{path}' lacks {name}; is it a memdb export?")
                return fobj.read()

            return _parse(str(path), get)
    except (tarfile.TarError, EOFError) as exc:
        raise PortableError(f"'{path}' is not a memdb export (not a tar file: {exc})") from None


def _parse(where: str, get) -> Portable:
    try:
        man = json.loads(get(MANIFEST))
    except (ValueError, UnicodeDecodeError) as exc:
        raise PortableError(f"{where}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise PortableError(f"{where}: not a memdb export (manifest format is not '{FORMAT}')")
    if man.get("format_version") != FORMAT_VERSION:
        raise PortableError(
            f"{where}: export format version {man.get('format_version')} is not supported "
            f"(this memdb-admin reads version {FORMAT_VERSION})"
        )
    prefix, shards = man.get("prefix"), man.get("shards")
    if not isinstance(prefix, dict) or not isinstance(shards, list) or not shards:
        raise PortableError(f"{where}: the manifest lacks the prefix info or its shards")
    if int(prefix.get("num_layers", -1)) != len(shards):
        raise PortableError(
            f"{where}: the manifest lists {len(shards)} shards for "
            f"{prefix.get('num_layers')} layers"
        )
    blobs = []
    for i, entry in enumerate(shards):
        if entry.get("layer") != i:
            raise PortableError(f"{where}: shard {i} of the manifest is layer {entry.get('layer')}")
        blob = get(str(entry.get("path", _shard_path(i))))
        if len(blob) != entry.get("bytes") or hashlib.sha256(blob).hexdigest() != entry.get(
            "sha256"
        ):
            raise PortableError(
                f"{where}: layer {i} is damaged (size or sha256 does not match the manifest)"
            )
        blobs.append(blob)
    return Portable(prefix, blobs)
