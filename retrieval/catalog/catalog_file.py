"""Which file a SQLite catalog's connections opened, so a removed or replaced file is noticed.

SQLite keeps reading a deleted file through the connections that have it open, and a new
connection silently opens (or creates) whatever file now sits at the path. A process that
pooled connections before the file was replaced would then mix two catalogs. So the first
connection pins the file (an open descriptor, which also keeps its inode number from being
reused), every later connection must open that same file, and `check` compares the path with
it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from retrieval.errors import CatalogMismatch, NoCatalog


def sqlite_file(url: str) -> Path | None:
    """The catalog file of a SQLite URL; None for another database or an in-memory one."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[-1].split("?", 1)[0]
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return Path(path)


class CatalogFileWatch:
    """The file a SQLite catalog's connections use; refuses connections to any other file."""

    def __init__(self, path: Path, url: str = "") -> None:
        self.path = path
        self.url = url or f"sqlite:///{path}"
        # Opening a missing file would create an empty catalog: only a writer's upgrade may.
        self.may_create = False
        self._pinned: int | None = None  # descriptor of the file the connections opened
        self._lock = threading.Lock()

    def before_connect(self) -> None:
        """Refuse to open a new catalog file beside the write-ahead log of a deleted one, and
        (NoCatalog) to create one at all before a writer's `Catalog.upgrade` allows it.

        SQLite finds the log by name: a file created at the path of a catalog deleted while in
        use would have the old catalog's log replayed into it, a mix of two catalogs. And
        sqlite3 creates a missing file on connect: a reader would leave an empty catalog behind.
        """
        wal, shm = Path(f"{self.path}-wal"), Path(f"{self.path}-shm")
        try:
            log_bytes = wal.stat().st_size
        except FileNotFoundError:
            log_bytes = 0
        try:
            empty = self.path.stat().st_size == 0
        except FileNotFoundError:
            empty = True
        if log_bytes and empty:
            raise CatalogMismatch(
                "catalog_removed",
                f"The catalog file {self.path} is gone (or empty) but its write-ahead log "
                f"{wal} is still there: the catalog was deleted while in use, and a new one "
                "opened here would replay the old log. Restore the catalog from a backup; or "
                f"move {wal} and {shm} away to start a new catalog.",
                str(self.path),
            )
        if not self.may_create and not self.path.exists():
            raise NoCatalog(self.url)

    def connected(self) -> None:
        """Called for every new connection: pin the file, or refuse if it is another one."""
        with self._lock:
            if self._pinned is None:
                try:
                    self._pinned = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    pass
                return
            if not self._path_is_pinned_file():
                raise self._replaced()

    def check(self) -> bool:
        """True if the path now holds another file than the one pinned; raises if it is gone."""
        with self._lock:
            if self._pinned is None:
                return False
            if not self.path.exists():
                raise CatalogMismatch(
                    "catalog_removed",
                    f"The catalog file {self.path} was removed while in use. Restore it "
                    "from a backup (the index directory is untouched), then this process "
                    "reopens it.",
                    str(self.path),
                )
            return not self._path_is_pinned_file()

    def release(self) -> None:
        """Forget the pinned file (after every connection to it was closed)."""
        with self._lock:
            if self._pinned is not None:
                os.close(self._pinned)
                self._pinned = None

    def _path_is_pinned_file(self) -> bool:
        assert self._pinned is not None
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(self._pinned)
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

    def _replaced(self) -> CatalogMismatch:
        return CatalogMismatch(
            "catalog_replaced",
            f"The catalog file {self.path} was replaced by another file while in use; "
            "connections to the new file are refused until it is checked and reopened.",
            str(self.path),
        )
