"""Files and folders that survive a power cut once written: fsync of the file and of the folder
that holds its name.

Owns only that; it knows nothing of what the files hold (the store's LMDB folder, admin.key).
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (names of files created or removed in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(path: Path) -> None:
    """`mkdir -p path`, fsyncing the parent of every folder it creates."""
    path = Path(path).absolute()
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        fsync_dir(folder.parent)


def write_file_durably(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create `path` (FileExistsError if it exists) with `data` and `mode`, then fsync the file
    and its folder: once this returns, the file and its content survive a crash."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
