"""The index identity: one random id, kept in the catalog and in index_dir/index.json.

A catalog and an index directory belong together only while both hold the same id. A deleted,
reset or restored-from-elsewhere catalog, or a catalog pointed at another index directory, then
shows as a mismatch, on SQLite and Postgres alike, before anything is served, written or deleted.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from retrieval.catalog.tables import utcnow
from retrieval.errors import CatalogMismatch

INDEX_FILE = "index.json"
_FORMAT = 1


def new_index_id() -> str:
    return uuid.uuid4().hex


def index_file(index_dir: Path) -> Path:
    return Path(index_dir) / INDEX_FILE


def read_index_id(index_dir: Path) -> str | None:
    """The id in index_dir/index.json; None if there is no such file."""
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
    if not isinstance(index_id, str) or not index_id:
        raise CatalogMismatch(
            "unreadable_identity",
            f"{path} holds no index_id; restore it from a backup of this index directory.",
            index_dir=str(index_dir),
        )
    return index_id


def write_index_id(index_dir: Path, index_id: str) -> None:
    """Write index_dir/index.json durably (a temporary file, fsynced, renamed, dir fsynced)."""
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    body = {
        "format": _FORMAT,
        "index_id": index_id,
        "created_at": utcnow().isoformat(),
        "about": "The clipsearch index this directory holds; its catalog records the same id.",
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


def pairing_problem(
    catalog_id: str | None,
    file_id: str | None,
    catalog_holds_shards: bool,
    *,
    catalog: str,
    index_dir: Path,
) -> CatalogMismatch | None:
    """Why this catalog and this index dir must not be used together; None if they may be.

    A catalog written before identities existed (no id on either side) passes here; the
    writer's claim (indexer/binding.py) checks it against the shard directories.
    """
    if catalog_id == file_id:
        return None
    where = str(index_dir)
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
    if file_id is None:
        if not catalog_holds_shards:
            return None  # a first run between its two writes; nothing to serve yet
        return CatalogMismatch(
            "index_dir_lost",
            f"The catalog {catalog} belongs to index {catalog_id}, but the index directory "
            f"{where} has no {INDEX_FILE}: it is not this catalog's index directory, or it "
            "was lost. Check CLIPSEARCH_INDEX_DIR, or restore the index directory from the "
            "backup taken with this catalog.",
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
