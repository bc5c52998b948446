"""`clipsearch verify`: check every shard's files, contents and catalog rows, marks or not.

Also the quick health check that `status` and `index` run (`corrupt_shards`), which hashes only
the files that no verified mark vouches for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from indexer.binding import claim_problem
from retrieval.catalog.database import Catalog
from retrieval.catalog.tables import ShardRow
from retrieval.errors import CorruptShard
from retrieval.index.integrity import (
    ShardCheck,
    ShardExpectation,
    check_marked,
    check_shard,
)
from retrieval.index.marks import SERVED, VerifiedMarks, file_identities
from retrieval.index.shard import INDEX_FILE, Shard, list_shard_dirs, shard_path
from retrieval.index.shard_set import ShardSet

REPAIR_COMMAND = "clipsearch repair"
# Keys of problems that are not one file's.
CATALOG = "catalog"
SERVING = "serving"
# Rows of a shard searched to probe its FAISS index.
_PROBE_ROWS = 32


@dataclass
class VerifyReport:
    """What `clipsearch verify` found: nothing wrong when `ok`."""

    shards: int = 0
    bytes: int = 0
    # shard id -> {file name, "catalog" or "serving" -> what is wrong}
    corrupt: dict[str, dict[str, str]] = field(default_factory=dict)
    catalog_problems: list[str] = field(default_factory=list)  # not any one shard's
    orphans: list[str] = field(default_factory=list)  # shard dirs without a row: harmless
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.catalog_problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "shards": self.shards,
            "bytes": self.bytes,
            "corrupt": self.corrupt,
            "catalog_problems": self.catalog_problems,
            "orphans": self.orphans,
            "repair": REPAIR_COMMAND if self.corrupt else None,
            "seconds": round(self.seconds, 3),
        }


def corrupt_shards(catalog: Catalog, index_dir: Path) -> dict[str, str]:
    """The active shards that are corrupt, with what is wrong (see `integrity.check_marked`)."""
    marks = VerifiedMarks(index_dir)
    found: dict[str, str] = {}
    for row in catalog.shards():
        problem = check_marked(index_dir, ShardExpectation.of(row), marks)
        if problem is not None:
            found[row.id] = problem
    marks.save()
    return found


def verify_index(
    catalog: Catalog, index_dir: Path, *, progress: bool | None = None
) -> VerifyReport:
    """Check everything, regardless of verified marks.

    Per active shard: shard.json against the catalog row, every file's size and sha256, the
    array headers, ids ascending, every stored vector finite and of unit length, the ids
    against the catalog's images of that shard, and the FAISS index opened and probed with some
    of the shard's own vectors (no impossible scores). Then the catalog: every active image in
    an active shard. Marks are updated with the outcome, so the next start need not hash again.
    CatalogMismatch (exit 8) when the catalog does not belong to the index dir.
    """
    started = time.monotonic()
    # A lost, reset or other index's catalog would verify as an empty, sound index.
    problem = claim_problem(catalog, index_dir, writing=False)
    if problem is not None:
        raise problem
    report = VerifyReport()
    marks = VerifiedMarks(index_dir)
    rows = catalog.shards()
    report.shards = len(rows)
    bar = tqdm(
        total=sum(int(row.bytes or 0) for row in rows),
        desc="verify",
        unit="B",
        unit_scale=True,
        disable=None if progress is None else not progress,
    )

    def counted(n: int) -> None:
        report.bytes += n
        bar.update(n)

    with bar:
        for row in rows:
            problems = verify_shard(catalog, index_dir, row, marks, counted)
            if problems:
                report.corrupt[row.id] = problems
    marks.save()
    report.catalog_problems = _catalog_problems(catalog, {row.id for row in rows})
    known = catalog.known_shard_ids()
    report.orphans = [name for name in list_shard_dirs(index_dir) if name not in known]
    report.seconds = time.monotonic() - started
    return report


def verify_shard(
    catalog: Catalog,
    index_dir: Path,
    row: ShardRow,
    marks: VerifiedMarks,
    on_bytes: Callable[[int], object] | None = None,
) -> dict[str, str]:
    """Everything wrong with one active shard (empty: nothing), by file, "catalog" or "serving";
    see `verify_index`. The outcome is recorded in `marks`, except over a serving verdict."""
    identity = file_identities(shard_path(index_dir, row.id))  # before hashing: see marks.py
    earlier = marks.lookup(row.id, identity) if identity is not None else None
    check = check_shard(
        index_dir, row.id, ShardExpectation.of(row), content=True, on_bytes=on_bytes
    )
    problems = dict(check.problems)
    if check.ok:
        member_problem = _member_problem(catalog, row.id, check)
        if member_problem:
            problems[CATALOG] = member_problem
        index_problem = _probe_index(index_dir, row.id)
        if index_problem:
            problems[INDEX_FILE] = index_problem
    if earlier is not None and earlier.source == SERVED and earlier.corrupt is not None:
        # The files are what they were when the service saw an impossible score from them.
        problems[SERVING] = f"the service stopped serving it ({earlier.at}): {earlier.corrupt}"
    elif identity is not None:
        reason = "; ".join(f"{name}: {why}" for name, why in problems.items()) or None
        marks.record(row.id, identity, corrupt=reason)
    return problems


def _member_problem(catalog: Catalog, shard_id: str, check: ShardCheck) -> str | None:
    """How ids.npy differs from the catalog's images of the shard (None: the same ids)."""
    assert check.ids is not None
    listed = np.array([record.id for record in catalog.shard_members(shard_id)], dtype=np.int64)
    if np.array_equal(listed, check.ids):
        return None
    only_files = np.setdiff1d(check.ids, listed)
    only_catalog = np.setdiff1d(listed, check.ids)
    parts = [f"the catalog lists {listed.size} images in this shard, ids.npy {check.ids.size}"]
    if only_files.size:
        parts.append(f"ids only in ids.npy: {_some(only_files)}")
    if only_catalog.size:
        parts.append(f"ids only in the catalog: {_some(only_catalog)}")
    return "; ".join(parts)


def _some(ids: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    return shown + (f" and {ids.size - limit} more" if ids.size > limit else "")


def _probe_index(index_dir: Path, shard_id: str) -> str | None:
    """Open the FAISS index and search it for some stored vectors: None when nothing is amiss."""
    try:
        shard = Shard.open(index_dir, shard_id)
    except CorruptShard as exc:
        return str(exc)
    if shard.count == 0:
        return None
    rows = np.unique(np.linspace(0, shard.count - 1, num=min(_PROBE_ROWS, shard.count)).astype(int))
    with ShardSet([shard], threads=1, exact_below=0, exact_fraction=0.0) as probe:
        probe.search(shard.rows_f32(rows), min(10, shard.count))
        return probe.corrupt_shards.get(shard_id)


def _catalog_problems(catalog: Catalog, active_shards: set[str]) -> list[str]:
    """Active images whose vector is in no active shard."""
    problems: list[str] = []
    for shard_id, count in catalog.active_images_by_shard().items():
        if shard_id is None:
            problems.append(f"{count} active images have no shard")
        elif shard_id not in active_shards:
            problems.append(f"{count} active images point to shard {shard_id}, which is not active")
    return problems
