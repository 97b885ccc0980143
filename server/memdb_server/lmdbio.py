"""LMDB plumbing of the store: the lock that keeps this process's transactions off a map being
resized, prefix scans and range deletes, page arithmetic.

Knows nothing of what the records mean.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb

PAGE = 4096


class RWLock:
    """Many holders of `shared`, or one of `exclusive` (waiting exclusives go first).

    Every LMDB transaction of this process runs under `shared`; growing the map runs under
    `exclusive`, because the map must not be replaced while a transaction of this process is
    open. Not re-entrant: never take `shared` twice in one thread.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def scan(txn: lmdb.Transaction, db: object, start: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) pairs of `db` whose key starts with `start`, in key order."""
    cursor = txn.cursor(db=db)
    if cursor.set_range(start):
        for key, value in cursor:
            if not key.startswith(start):
                return
            yield key, value


def delete_range(txn: lmdb.Transaction, db: object, start: bytes) -> int:
    """Delete every key of `db` that starts with `start`; returns how many."""
    cursor = txn.cursor(db=db)
    deleted = 0
    if cursor.set_range(start):
        while cursor.key().startswith(start):  # delete() moves on; past the end key() is b""
            cursor.delete()
            deleted += 1
    return deleted


def round_up(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
