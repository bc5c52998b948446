"""The writer's side of the index identity: claim index_dir for its catalog, or refuse.

Every job that writes to or deletes from index_dir claims it first, under the IndexLock. A
catalog that is empty or new while index_dir holds shards (deleted, reset, pointed at the wrong
database) is refused before anything is written or deleted: to that catalog every shard would be
an orphan. `clipsearch index --rebuild-catalog` is the explicit way on: it moves the old shards
and index.json aside, never deletes them, and starts a new index.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from retrieval.catalog.database import Catalog
from retrieval.catalog.identity import (
    fsync_directory,
    index_file,
    new_index_id,
    pairing_problem,
    read_index_file,
    read_index_id,
    shards_missing,
    write_index_file,
)
from retrieval.catalog.schema import read_schema
from retrieval.catalog.tables import utcnow
from retrieval.errors import CatalogMismatch
from retrieval.index.shard import list_shard_dirs

log = logging.getLogger(__name__)

SET_ASIDE_DIR = "set-aside"


@dataclass(frozen=True)
class Claim:
    """The index a job works on, and where --rebuild-catalog moved the previous one."""

    index_id: str
    set_aside: Path | None = None
    set_aside_shards: int = 0


def claim_problem(
    catalog: Catalog, index_dir: Path, *, writing: bool = True
) -> CatalogMismatch | None:
    """Why a job must not write (or, with `writing` False, read) index_dir through this catalog;
    None if it may. Changes nothing: a database that holds no catalog yet (a SQLite file not
    there, an empty or reset database) is read as an empty catalog, and not created."""
    present = read_schema(catalog).holds_catalog
    catalog_id = catalog.state().index_id if present else None
    found = read_index_file(index_dir)
    if catalog_id is not None and found is not None and catalog_id == found.index_id:
        return None
    active = [row.id for row in catalog.shards()] if present else []
    problem = pairing_problem(
        catalog_id,
        found,
        shards_missing(active, index_dir),
        writing=writing,
        catalog=catalog.shown_url,
        index_dir=index_dir,
    )
    if problem is not None:
        if problem.reason == "catalog_lost" and _nothing_to_lose(catalog, index_dir, present):
            return None  # only an index.json is left: the new catalog adopts its id
        return problem
    if found is not None and catalog_id is not None:
        return None  # a read-only copy, reading
    known = catalog.known_shard_ids() if present else set()
    dirs = set(list_shard_dirs(index_dir))
    if dirs and not known:
        return CatalogMismatch(
            "catalog_lost",
            f"The index directory {index_dir} holds {len(dirs)} shard directories, but the "
            f"catalog {catalog.shown_url} knows none of them: the catalog was deleted, reset "
            "or replaced, or belongs to another index. Restore the catalog from a backup; or, "
            "to re-encode every image into a new index and set the old shards aside (nothing "
            "is deleted), run `clipsearch index --rebuild-catalog`.",
            catalog.shown_url,
            str(index_dir),
        )
    if known and not (known & dirs):
        return CatalogMismatch(
            "index_dir_lost",
            f"None of the {len(known)} shards of the catalog {catalog.shown_url} is in the "
            f"index directory {index_dir}: it is not this catalog's index directory, or it "
            "was lost. Check CLIPSEARCH_INDEX_DIR, or restore the index directory from the "
            "backup taken with this catalog.",
            catalog.shown_url,
            str(index_dir),
        )
    return None


def claim_index(catalog: Catalog, index_dir: Path, *, rebuild: bool = False) -> Claim:
    """Make sure this catalog owns index_dir (recording a new identity on a first run), or raise.

    With `rebuild`, a lost catalog (one that holds no shard) is answered by setting the old
    index aside and starting a new one. The caller holds the IndexLock.
    """
    problem = claim_problem(catalog, index_dir)
    set_aside: Path | None = None
    moved = 0
    if problem is not None:
        if not rebuild:
            raise problem
        if problem.reason != "catalog_lost" or catalog.known_shard_ids():
            raise CatalogMismatch(
                problem.reason,
                f"{problem} (--rebuild-catalog only starts over in a catalog that holds no shard.)",
                problem.catalog,
                problem.index_dir,
            )
        set_aside, moved = _set_aside(index_dir)
        return Claim(_bind(catalog, index_dir, None, None), set_aside, moved)
    return Claim(_bind(catalog, index_dir, catalog.state().index_id, read_index_id(index_dir)))


def hand_over(source: Catalog, target: Catalog, index_dir: Path) -> str | None:
    """After a catalog copy: index_dir is written through `target` from now on, while `source`
    may still read it. Returns the target's new index id; None (nothing changed) when `source`
    does not own index_dir. The caller holds the IndexLock.

    Two catalogs with one identity could each take the other's new shards for orphans; so the
    copy gets an identity of its own, and index.json lists the source as read-only.
    """
    if claim_problem(source, index_dir) is not None:
        return None
    old_id = claim_index(source, index_dir).index_id
    found = read_index_file(index_dir)
    read_only = tuple(found.read_only) if found else ()
    new_id = new_index_id()
    # index.json first: cut short here, both catalogs may read and neither may write.
    write_index_file(index_dir, new_id, (*read_only, old_id))
    target.set_index_id(new_id)
    log.info("index %s is now written through %s (was %s)", new_id, target.shown_url, old_id)
    return new_id


def _nothing_to_lose(catalog: Catalog, index_dir: Path, present: bool) -> bool:
    return not list_shard_dirs(index_dir) and not (present and catalog.holds_anything())


def _bind(catalog: Catalog, index_dir: Path, catalog_id: str | None, file_id: str | None) -> str:
    """Give both sides the same id. The catalog first: an index.json whose catalog has no id
    reads as a lost catalog, while a catalog id without index.json is a first run's."""
    index_id = catalog_id or file_id or new_index_id()
    if catalog_id != index_id:
        catalog.set_index_id(index_id)
        log.info("catalog %s now holds index %s", catalog.shown_url, index_id)
    if file_id != index_id:
        write_index_file(index_dir, index_id)
    return index_id


def _set_aside(index_dir: Path) -> tuple[Path, int]:
    """Move every shard directory and index.json under index_dir/set-aside/<time>-<id>/."""
    old_id = read_index_id(index_dir) or "unknown"
    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    target = Path(index_dir) / SET_ASIDE_DIR / f"{stamp}-{old_id[:12]}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = target.with_name(f"{stamp}-{old_id[:12]}-{suffix}")
    shards_target = target / "shards"
    shards_target.mkdir(parents=True)
    shard_ids = list_shard_dirs(index_dir)
    source_root = Path(index_dir) / "shards"
    for shard_id in shard_ids:
        os.rename(source_root / shard_id, shards_target / shard_id)
    fsync_directory(shards_target)
    if source_root.is_dir():
        fsync_directory(source_root)
    # index.json last: a move cut short leaves a lost catalog, refused again until rerun.
    if index_file(index_dir).exists():
        os.rename(index_file(index_dir), target / index_file(index_dir).name)
    fsync_directory(target)
    fsync_directory(Path(index_dir))
    log.warning(
        "set aside %d shard directories of index %s in %s (delete it when no longer needed)",
        len(shard_ids),
        old_id,
        target,
    )
    return target, len(shard_ids)
