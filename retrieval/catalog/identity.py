"""The index identity: one random id, kept in the catalog and in index_dir/index.json.

A catalog and an index directory belong together only while both hold the same id. A deleted,
reset or restored-from-elsewhere catalog, or a catalog pointed at another index directory, then
shows as a mismatch, on SQLite and Postgres alike, before anything is served, written or deleted.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.catalog.tables import utcnow
from retrieval.errors import CatalogMismatch
from retrieval.index.shard import list_shard_dirs

INDEX_FILE = "index.json"
_FORMAT = 1


def new_index_id() -> str:
    return uuid.uuid4().hex


def index_file(index_dir: Path) -> Path:
    return Path(index_dir) / INDEX_FILE


@dataclass(frozen=True)
class IndexFile:
    """What index_dir/index.json says: the index's id, and the ids of catalogs that may still
    read the index but never write it (the copies `clipsearch db migrate-to` leaves behind)."""

    index_id: str
    read_only: tuple[str, ...] = ()


def read_index_file(index_dir: Path) -> IndexFile | None:
    """index_dir/index.json; None if there is no such file."""
    path = index_file(index_dir)
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CatalogMismatch(
            "unreadable_identity",
            f"{path} cannot be read ({type(exc).__name__}: {exc}); restore it from a backup "
            "of this index directory.",
            index_dir=str(index_dir),
        ) from None
    index_id = data.get("index_id") if isinstance(data, dict) else None
    read_only = data.get("read_only_catalogs", []) if isinstance(data, dict) else []
    if (
        not isinstance(index_id, str)
        or not index_id
        or not isinstance(read_only, list)
        or not all(isinstance(other, str) for other in read_only)
    ):
        raise CatalogMismatch(
            "unreadable_identity",
            f"{path} holds no valid index_id; restore it from a backup of this index directory.",
            index_dir=str(index_dir),
        )
    return IndexFile(index_id, tuple(read_only))


def read_index_id(index_dir: Path) -> str | None:
    """The index id in index_dir/index.json; None if there is no such file."""
    found = read_index_file(index_dir)
    return found.index_id if found else None


def write_index_file(index_dir: Path, index_id: str, read_only: tuple[str, ...] = ()) -> None:
    """Write index_dir/index.json durably (a temporary file, fsynced, renamed, dir fsynced)."""
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    body = {
        "format": _FORMAT,
        "index_id": index_id,
        "read_only_catalogs": list(read_only),
        "created_at": utcnow().isoformat(),
        "about": "The clipsearch index this directory holds; its catalog records the same id. "
        "Catalogs listed as read-only (copies left by `clipsearch db migrate-to`) may read it "
        "but never write it.",
    }
    temporary = index_dir / f".{INDEX_FILE}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(body, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, index_file(index_dir))
    fsync_directory(index_dir)


def fsync_directory(path: Path) -> None:
    """Make the entries of a directory (a rename, a new file) durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def shards_missing(shard_ids: Iterable[str], index_dir: Path) -> bool:
    """True if any of these shards has no directory in index_dir."""
    present = set(list_shard_dirs(index_dir))
    return any(shard_id not in present for shard_id in shard_ids)


def pairing_problem(
    catalog_id: str | None,
    found: IndexFile | None,
    shards_missing: bool,
    *,
    writing: bool,
    catalog: str,
    index_dir: Path,
) -> CatalogMismatch | None:
    """Why this catalog must not read (or, `writing`, write) this index dir; None if it may.

    `shards_missing`: some active shard of the catalog has no directory in index_dir. A catalog
    written before identities existed (no id on either side) passes here; the writer's claim
    (indexer/binding.py) checks it against the shard directories.
    """
    where = str(index_dir)
    file_id = found.index_id if found else None
    if found is not None and catalog_id is not None and catalog_id in found.read_only:
        if not writing:
            return None
        return CatalogMismatch(
            "read_only_catalog",
            f"The catalog {catalog} is a copy left behind by `clipsearch db migrate-to`: the "
            f"index directory {where} is written through another catalog (index {file_id}) "
            "since. Point CLIPSEARCH_DATABASE_URL at that catalog; a job through this one "
            "would take that catalog's new shards for orphans.",
            catalog,
            where,
        )
    if catalog_id == file_id:
        return None
    if catalog_id is None:
        return CatalogMismatch(
            "catalog_lost",
            f"The catalog {catalog} holds no index, but the index directory {where} holds "
            f"index {file_id}: the catalog was deleted, reset or replaced. Restore the "
            "catalog from a backup; or, to re-encode every image into a new index and set "
            "the old shards aside (nothing is deleted), run `clipsearch index "
            "--rebuild-catalog`.",
            catalog,
            where,
        )
    if found is None:
        if not shards_missing:
            return None  # every shard is there: only index.json is missing (a writer restores it)
        return CatalogMismatch(
            "index_dir_lost",
            f"The catalog {catalog} belongs to index {catalog_id}, but the index directory "
            f"{where} has no {INDEX_FILE} and lacks the catalog's shards: it is not this "
            "catalog's index directory, or it was lost. Check CLIPSEARCH_INDEX_DIR, or "
            "restore the index directory from the backup taken with this catalog.",
            catalog,
            where,
        )
    return CatalogMismatch(
        "other_index",
        f"The catalog {catalog} belongs to index {catalog_id}, but the index directory "
        f"{where} holds index {file_id}. Point CLIPSEARCH_DATABASE_URL and "
        "CLIPSEARCH_INDEX_DIR at the catalog and the index directory of the same index.",
        catalog,
        where,
    )
