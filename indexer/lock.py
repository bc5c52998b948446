"""The single-writer lock: one index, label, compact or catalog-copy job at a time.

An flock belongs to the open file description, not to the process: every process holding a
descriptor of it keeps the lock, and any of them can release it for all. So the descriptor is
close-on-exec (no program we start inherits it), and a forked child, a DataLoader worker
above all, closes its copy at once (`os.register_at_fork`). Killing the indexer therefore
frees the lock at the moment it dies, whatever its workers are doing, and no child can unlock
it for its parent.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from retrieval.catalog.tables import utcnow
from retrieval.errors import IndexLocked


class IndexLock:
    """An exclusive flock on index_dir/indexer.lock. The kernel drops it when we die."""

    # Locks this process holds, for the fork hook below. Fork handlers are process-wide by
    # nature, so this is the one registry they can read.
    _held: ClassVar[set[IndexLock]] = set()

    def __init__(self, index_dir: Path) -> None:
        self.path = Path(index_dir) / "indexer.lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> IndexLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise IndexLocked(str(self.path), holder or "unknown process") from None
        except BaseException:
            os.close(fd)
            raise
        note = f"pid {os.getpid()} on {os.uname().nodename} since {utcnow().isoformat()}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, note.encode(), 0)
        self._fd = fd
        IndexLock._held.add(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        fd, self._fd = self._fd, None
        IndexLock._held.discard(self)
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _forget_in_child(self) -> None:
        """In a forked child: close our copy of the descriptor, never unlocking the parent's."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _close_inherited_locks() -> None:
    for lock in list(IndexLock._held):
        lock._forget_in_child()
    IndexLock._held.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)
