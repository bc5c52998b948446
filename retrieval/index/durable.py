"""Files and directories of the index dir, written and removed so that a crash at any moment
leaves either the old state or the new one: fsyncs, digests, and manifest-first removal."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsync_file(path: Path) -> None:
    # FAISS writes through its own FILE*; fsync on a second descriptor flushes the same inode.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def child_dirs(root: Path) -> list[str]:
    """Names of the directories in `root` (none if it does not exist), sorted."""
    if not root.is_dir():
        return []
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir())


def remove_dir_manifest_first(path: Path, manifest: str) -> bool:
    """Delete a directory whose `manifest` file says it is complete; False if it was already
    gone. The manifest goes first and durably: a removal cut short leaves a directory that reads
    as incomplete (deleted again next time), never a complete-looking one with missing files."""
    if not path.exists():
        return False
    try:
        (path / manifest).unlink()
    except FileNotFoundError:
        pass
    else:
        fsync_dir(path)
    shutil.rmtree(path)
    fsync_dir(path.parent)
    return True
