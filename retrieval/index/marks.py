"""Verified marks: which shards had their files checked, keyed by each file's identity.

Hashing every shard file at every start would make a restart over a large index slow. A reader
that checked a shard records the identity of each of its files (size, mtime, ctime, inode and
device); the next reader skips the hashing while all four identities are unchanged. ctime is in
the key because no ordinary program can set it back: rewriting a file and restoring its mtime
still changes it. What a mark cannot see is a change below the file system (a failing disk);
`clipsearch verify` hashes everything regardless of marks, and the search path bounds scores.

A shard found corrupt is marked too, so that a reload does not hash it again, and so that a
shard the service stopped serving (it returned an impossible score) stays out after a restart
until its files change or it is repaired.

The marks live in one small JSON file in the index directory, not in the catalog: an identity is
only meaningful on the host that stat()s the file (inode and device numbers differ between hosts
that mount the same volume, while a Postgres catalog is shared by all of them), the API needs no
write access to the catalog for it, and losing the file costs time, never correctness. Several
processes may write it: each write merges with what is on disk and replaces the file atomically;
a lost race costs one more check.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from retrieval.index.shard import DATA_FILES, MANIFEST_FILE, SHARDS_DIR

log = logging.getLogger("clipsearch.shards")

MARKS_FILE = "verified-shards.json"
_FORMAT_VERSION = 1
SHARD_FILES = (*DATA_FILES, MANIFEST_FILE)

# How a mark was made: by checking the files, or by the search path seeing an impossible score.
CHECKED = "checked"
SERVED = "served"

Identity = dict[str, list[int]]


def file_identities(shard_dir: Path) -> Identity | None:
    """The identity of each of a shard's four files; None when one cannot be stat()ed."""
    found: Identity = {}
    for name in SHARD_FILES:
        try:
            st = os.stat(shard_dir / name)
        except OSError:
            return None
        found[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    return found


@dataclass(frozen=True)
class Mark:
    """What is known about one shard whose files still have the recorded identity."""

    corrupt: str | None  # None: the files were verified; else what is wrong
    source: str  # CHECKED or SERVED
    at: str  # when, ISO 8601 UTC

    @property
    def verified(self) -> bool:
        return self.corrupt is None


class VerifiedMarks:
    """The marks file of one index directory. Thread-safe; `save` writes what was recorded."""

    def __init__(self, index_dir: Path) -> None:
        self.index_dir = Path(index_dir)
        self.path = self.index_dir / MARKS_FILE
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        self._changed: dict[str, dict[str, Any] | None] = {}  # None: forget the shard
        self._warned = False
        self.reload()

    def reload(self) -> None:
        """Read the file again (another process may have added marks)."""
        entries = self._read()
        with self._lock:
            entries.update({k: v for k, v in self._changed.items() if v is not None})
            for shard_id in [k for k, v in self._changed.items() if v is None]:
                entries.pop(shard_id, None)
            self._entries = entries

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # A cache: a torn or damaged file only means the shards are checked again.
            log.warning("ignoring unreadable %s (%s); shards will be checked again", self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("format_version") != _FORMAT_VERSION:
            return {}
        shards = data.get("shards")
        if not isinstance(shards, dict):
            return {}
        return {str(k): v for k, v in shards.items() if isinstance(v, dict)}

    def lookup(self, shard_id: str, identity: Identity) -> Mark | None:
        """The mark of a shard whose files still have exactly this identity, else None."""
        with self._lock:
            entry = self._entries.get(shard_id)
        if entry is None or entry.get("files") != identity:
            return None
        corrupt = entry.get("corrupt")
        return Mark(
            corrupt=str(corrupt) if corrupt is not None else None,
            source=str(entry.get("source", CHECKED)),
            at=str(entry.get("at", "")),
        )

    def record(
        self, shard_id: str, identity: Identity, *, corrupt: str | None, source: str = CHECKED
    ) -> None:
        entry = {
            "files": identity,
            "corrupt": corrupt,
            "source": source,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        with self._lock:
            self._entries[shard_id] = entry
            self._changed[shard_id] = entry

    def forget(self, shard_id: str) -> None:
        with self._lock:
            self._entries.pop(shard_id, None)
            self._changed[shard_id] = None

    def save(self) -> bool:
        """Merge what was recorded into the file; False (and one warning) if it cannot be written.

        Marks of shard directories that no longer exist are dropped on the way.
        """
        with self._lock:
            if not self._changed:
                return True
            changed = dict(self._changed)
        entries = self._read()
        for shard_id, entry in changed.items():
            if entry is None:
                entries.pop(shard_id, None)
            else:
                entries[shard_id] = entry
        shards_root = self.index_dir / SHARDS_DIR
        entries = {k: v for k, v in entries.items() if (shards_root / k).is_dir()}
        text = json.dumps({"format_version": _FORMAT_VERSION, "shards": entries}, sort_keys=True)
        tmp = self.path.with_name(f".{MARKS_FILE}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if not self._warned:
                log.warning(
                    "cannot record verified shards in %s (%s); every start will check every "
                    "shard again",
                    self.path,
                    exc,
                )
                self._warned = True
            return False
        with self._lock:
            for shard_id, entry in changed.items():
                if self._changed.get(shard_id) is entry:
                    del self._changed[shard_id]
        return True
