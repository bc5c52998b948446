"""The nightly index job: scan, diff, decode+encode on an engine, write shards, commit."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from indexer.backfill import backfill_photo_info, photo_fields
from indexer.binding import claim_index, claim_problem
from indexer.crash import crash_point
from indexer.decode import DecodedMeta, DecodeFailure
from indexer.engines import Engine, engine_for
from indexer.lock import IndexLock
from indexer.publish import cleanup_index_dir, write_shard_record
from indexer.scan import FileStat, ScanDiff, diff_scan, hash_files, normalise_root, scan_roots
from indexer.verify import corrupt_shards
from retrieval.catalog.database import Catalog
from retrieval.catalog.records import GenerationCommit, ImageRecord, PhotoFields
from retrieval.catalog.schema import read_schema
from retrieval.catalog.tables import ACTIVE, ERROR
from retrieval.config import Settings
from retrieval.errors import ConfigError, CorruptShard
from retrieval.index.faiss_gpu import resolve_faiss_gpu
from retrieval.index.integrity import ShardExpectation, open_checked
from retrieval.models.encoder import Encoder
from retrieval.models.identity import ModelIdentity
from retrieval.photo_info import PhotoInfo, capture_time

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    path: str
    reason: str
    detail: str


@dataclass
class IndexReport:
    new: int = 0
    changed: int = 0
    moved: int = 0
    copied: int = 0
    touched: int = 0
    deleted: int = 0
    unchanged: int = 0
    encoded: int = 0
    failed: list[Failure] = field(default_factory=list)
    shards_written: list[str] = field(default_factory=list)
    generation: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0
    decoded: int = 0
    labelled: dict[str, int] = field(default_factory=dict)  # label set -> images labelled
    corrupt_shards: dict[str, str] = field(default_factory=dict)  # shard id -> what is wrong
    set_aside: str | None = None  # where --rebuild-catalog moved the previous index
    # Images indexed before the catalog kept capture dates and cameras, read now (headers only).
    photo_info_read: int = 0
    engine: str = "local"  # what decoded and encoded: local, or ray (a cluster)
    encoders: int = 0  # models that encoded at once (Ray's encode actors); 0: nothing encoded

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.encode_seconds if self.encode_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("encode_seconds")
        data["seconds"] = round(self.seconds, 3)
        data["images_per_second"] = round(self.images_per_second, 2)
        return data


@dataclass
class _Item:
    """One row this job writes: encode `stat.path`, or reuse the vector of `source`."""

    id: int
    stat: FileStat
    sha256: str
    source: ImageRecord | None = None
    replaces: ImageRecord | None = None  # the old row of a changed file, tombstoned with us


@dataclass(frozen=True)
class _Work:
    """One changed file, before it has an id: what to read, and what it reuses or replaces."""

    stat: FileStat
    sha256: str | None  # None: the file could not be read
    source: ImageRecord | None = None  # a stored vector with these bytes, reused
    replaces: ImageRecord | None = None  # the old row of this path, tombstoned with us
    keep_id: int = 0  # an error row (which owns no vector) keeps its id; 0 = assign a new one


@dataclass(frozen=True)
class _Outcome:
    """What the encode pass made of one item: a vector (encoded now, or reused), or a failure."""

    item: _Item
    vector: np.ndarray | None
    decoded: DecodedMeta | None = None  # None for a reused vector: its source row has these
    failure: DecodeFailure | None = None


def _row(image_id: int, stat: FileStat, sha256: str | None, **fields: Any) -> ImageRecord:
    return ImageRecord(
        id=image_id,
        path=stat.path,
        sha256=sha256,
        size=stat.size,
        mtime_ns=stat.mtime_ns,
        **fields,
    )


def _split_after_vectors(
    pending: list[_Outcome], count: int
) -> tuple[list[_Outcome], list[_Outcome]]:
    """Cut the pending list just after its `count`-th outcome that has a vector."""
    seen = 0
    for position, outcome in enumerate(pending):
        if outcome.vector is not None:
            seen += 1
            if seen == count:
                return pending[: position + 1], pending[position + 1 :]
    return pending, []


class IndexJob:
    """One run of `clipsearch index`. Collaborators are passed in (tests pass their own)."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        encoder_factory: Callable[[], Encoder],
        *,
        progress: bool | None = None,
        rebuild_catalog: bool = False,
        engine: Engine | None = None,
    ) -> None:
        self.settings = settings
        # Built now: an engine that cannot be used at all (ray not installed) refuses the job
        # before the lock and the scan.
        self.engine = engine or engine_for(settings)
        self.catalog = catalog
        self.encoder_factory = encoder_factory
        self._encoder: Encoder | None = None
        self.index_dir = settings.resolved_index_dir
        # Only with this may a lost catalog start over (the old index is set aside, not deleted).
        self.rebuild_catalog = rebuild_catalog
        # Decided once, before any work: CLIPSEARCH_FAISS_GPU=on without a GPU fails here.
        self.use_faiss_gpu = resolve_faiss_gpu(settings.faiss_gpu, settings.device)
        # tqdm's disable=None hides bars when stderr is not a terminal (cron, CI).
        self.progress_disabled = None if progress is None else not progress

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = self.encoder_factory()
        return self._encoder

    def _check_model(self, indexed: dict[str, Any] | None) -> ModelIdentity:
        identity = self.encoder.identity
        identity.require_same(ModelIdentity.from_dict(indexed) if indexed else None)
        return identity

    def run(self, roots: Sequence[str | Path]) -> IndexReport:
        if not roots:
            raise ConfigError(
                "CLIPSEARCH_ROOTS", "no image folders given (pass ROOT arguments or set it)"
            )
        root_paths = [normalise_root(r) for r in roots]
        for root in root_paths:
            if not os.path.isdir(root):
                raise ConfigError("CLIPSEARCH_ROOTS", f"{root} is not a directory")
        started = time.monotonic()
        self.index_dir.mkdir(parents=True, exist_ok=True)
        with IndexLock(self.index_dir):
            if not self.rebuild_catalog and not read_schema(self.catalog).holds_catalog:
                # A lost catalog is refused before one is created: no file, no tables.
                problem = claim_problem(self.catalog, self.index_dir)
                if problem is not None:
                    raise problem
            self.catalog.upgrade()
            # Before the job row: a catalog that does not own index_dir gets nothing written.
            claim = claim_index(self.catalog, self.index_dir, rebuild=self.rebuild_catalog)
            job_id = self.catalog.start_job("index", root_paths)
            report = IndexReport(engine=self.engine.name)
            report.set_aside = str(claim.set_aside) if claim.set_aside else None
            try:
                cleanup_index_dir(self.catalog, self.index_dir, self.settings.retire_grace_seconds)
                self._run_locked(root_paths, report)
                report.photo_info_read = backfill_photo_info(
                    self.catalog,
                    root_paths,
                    max_pixels=self.settings.max_image_pixels,
                    progress_disabled=self.progress_disabled,
                )
                if self.settings.label_on_index:
                    self._label(report)
                # A nightly run is where a corrupt shard gets noticed (hashing only the files
                # no verified mark vouches for): the report names each one.
                report.corrupt_shards = corrupt_shards(self.catalog, self.index_dir)
            except BaseException as exc:
                report.seconds = time.monotonic() - started
                self.catalog.finish_job(
                    job_id, "failed", report.to_dict(), report.generation or None, str(exc)
                )
                raise
            report.seconds = time.monotonic() - started
            self.catalog.finish_job(job_id, "succeeded", report.to_dict(), report.generation)
            cleanup_index_dir(self.catalog, self.index_dir, self.settings.retire_grace_seconds)
        return report

    def _label(self, report: IndexReport) -> None:
        """Label what this run committed (and relabel edited sets), from stored vectors."""
        from indexer.labelling import LabelJob

        job = LabelJob(
            self.settings,
            self.catalog,
            lambda: self.encoder,
            progress=None if self.progress_disabled is None else not self.progress_disabled,
        )
        labels = job.run_locked()
        report.labelled = {entry.set: entry.images for entry in labels.sets}

    def _run_locked(self, roots: list[str], report: IndexReport) -> None:
        state = self.catalog.state()
        diff = self._scan_and_diff(roots, report)
        report.unchanged = diff.unchanged
        if not diff.has_changes:
            report.generation = state.generation
            return

        indexed_model = state.model
        needs_vectors = bool(diff.new or diff.changed or diff.retry or diff.copied)
        identity: ModelIdentity | None = None
        if needs_vectors or indexed_model is None:
            identity = self._check_model(indexed_model)
        model_dict = identity.to_dict() if identity else dict(indexed_model or {})

        items, errors_now = self._assign_ids(diff, report)
        report.new = len(diff.new)
        report.changed += len(diff.changed)
        report.copied = len(diff.copied)
        report.moved = len(diff.moved)
        report.touched = len(diff.touched)
        report.deleted = len(diff.deleted)

        # Metadata-only changes (moves, deletions, touched mtimes, unreadable files) form
        # their own commit: cheap, and independent of any shard.
        meta = GenerationCommit(model=model_dict)
        meta.tombstones = [r.id for r in diff.deleted]
        meta.moves = [(r.id, s.path, s.size, s.mtime_ns) for s, r in diff.moved]
        meta.touches = [(r.id, s.size, s.mtime_ns) for s, r in diff.touched]
        meta.upserts = errors_now
        for rec in errors_now:
            report.failed.append(Failure(rec.path, "unreadable", rec.error_detail or ""))
        meta.tombstones += [
            old.id for _, old in diff.unhashable if old is not None and old.status != ERROR
        ]
        reused = self._reused_vectors(items) if items else {}
        to_encode = [item for item in items if item.id not in reused]
        if to_encode:
            assert identity is not None
            # Before the first commit: an engine that refuses (an unreachable cluster, workers
            # that cannot see the files, another model on a node) leaves the catalog untouched.
            self.engine.start(self.encoder, [item.stat.path for item in to_encode], self.index_dir)
        try:
            if not meta.is_empty:
                report.generation = self.catalog.commit(meta)
            if items:
                assert identity is not None
                self._encode_and_commit(items, reused, to_encode, identity, report)
        finally:
            if to_encode:
                self.engine.close()
        if not report.generation:
            report.generation = self.catalog.generation()

    def _scan_and_diff(self, roots: list[str], report: IndexReport) -> ScanDiff:
        """Stat every file under the roots and diff them against the catalog (hashing suspects)."""
        bar = tqdm(desc="scan", unit=" files", disable=self.progress_disabled, leave=False)
        scanned = scan_roots(roots, on_file=lambda: bar.update(1))
        bar.close()
        known = self.catalog.records_under(roots)

        hash_bar = tqdm(desc="hash", unit=" files", disable=self.progress_disabled, leave=False)

        def hasher(paths: Sequence[str]) -> dict[str, str | None]:
            hash_bar.total = len(paths)
            return hash_files(paths, threads=4, on_done=lambda: hash_bar.update(1))

        diff = diff_scan(scanned.files, known, hasher, self.catalog.records_by_sha)
        hash_bar.close()
        for bad in scanned.unreadable:
            report.failed.append(Failure(bad.path, "unreadable", bad.detail))
        return diff

    def _assign_ids(
        self, diff: ScanDiff, report: IndexReport
    ) -> tuple[list[_Item], list[ImageRecord]]:
        """Ids for every file to write: items to encode (or reuse), and rows for unreadable files.

        Ids follow the sorted path order, so a re-run after a crash assigns exactly the ids a
        clean run would have.
        """
        work = [_Work(stat, digest) for stat, digest in diff.new]
        work += [_Work(stat, d, source, old) for stat, d, old, source in diff.changed]
        work += [_Work(stat, digest, source) for stat, digest, source in diff.copied]
        work += [_Work(stat, d, keep_id=failed.id) for stat, d, failed in diff.retry]
        for stat, old_rec in diff.unhashable:
            # An error row keeps its id (it owns no vector); a live row is tombstoned.
            keep = old_rec.id if old_rec is not None and old_rec.status == ERROR else 0
            work.append(_Work(stat, None, replaces=old_rec, keep_id=keep))
        work.sort(key=lambda w: w.stat.path)

        next_id = self.catalog.next_image_id()
        items: list[_Item] = []
        errors_now: list[ImageRecord] = []
        for entry in work:
            if entry.keep_id:
                image_id = entry.keep_id
            else:
                image_id, next_id = next_id, next_id + 1
            if entry.sha256 is None:
                errors_now.append(
                    _row(
                        image_id,
                        entry.stat,
                        None,
                        status=ERROR,
                        error_reason="unreadable",
                        error_detail="the file could not be read",
                    )
                )
                if entry.replaces is not None and entry.replaces.status != ERROR:
                    report.changed += 1
                continue
            items.append(_Item(image_id, entry.stat, entry.sha256, entry.source, entry.replaces))
        return items, errors_now

    def _reused_vectors(self, items: list[_Item]) -> dict[int, np.ndarray]:
        """Stored vectors for items that reuse one (copies, changed-to-known-bytes)."""
        by_shard: dict[str, list[_Item]] = {}
        for item in items:
            if item.source is not None and item.source.shard_id:
                by_shard.setdefault(item.source.shard_id, []).append(item)
        vectors: dict[int, np.ndarray] = {}
        rows = {row.id: row for row in self.catalog.shards()}
        for shard_id, group in by_shard.items():
            # Reused vectors go into a new shard with fresh checksums: like compaction, read
            # them only from a shard whose files verify now. Else the files are encoded anew.
            try:
                shard = open_checked(self.index_dir, ShardExpectation.of(rows[shard_id]))
            except (CorruptShard, KeyError) as exc:
                log.warning("not reusing vectors of shard %s (encoding instead): %s", shard_id, exc)
                continue
            wanted = np.array(sorted({i.source.id for i in group if i.source}), dtype=np.int64)
            found_ids, found = shard.vectors(wanted)
            lookup = {int(i): found[n] for n, i in enumerate(found_ids)}
            for item in group:
                assert item.source is not None
                if item.source.id in lookup:
                    vectors[item.id] = lookup[item.source.id]
        return vectors

    def _encode_and_commit(
        self,
        items: list[_Item],
        reused: dict[int, np.ndarray],
        to_encode: list[_Item],
        identity: ModelIdentity,
        report: IndexReport,
    ) -> None:
        """Encode `to_encode` on the started engine, and commit everything in shards."""
        shard_size = self.settings.shard_size
        # Items are committed in chunks of shard_size vectors: a job killed after hours of
        # encoding keeps every chunk it committed.
        pending = [_Outcome(item, reused[item.id]) for item in items if item.id in reused]
        engine = self.engine
        actors = f"{engine.encoders} actor" + ("s" if engine.encoders != 1 else "")
        described = "" if engine.name == "local" else f" ({engine.name}, {actors})"
        bar = tqdm(
            total=len(to_encode),
            desc="encode" + described,
            unit=" img",
            disable=self.progress_disabled,
            smoothing=0.1,
        )
        encode_started = time.monotonic()
        batches = 0
        pending_vectors = len(pending)
        failed = 0
        if to_encode:
            report.encoders = engine.encoders
            for batch in engine.batches():
                for n, index in enumerate(batch.indices):
                    pending.append(_Outcome(to_encode[index], batch.vectors[n], batch.metas[n]))
                for index, failure in batch.failures:
                    pending.append(_Outcome(to_encode[index], None, failure=failure))
                pending_vectors += len(batch.indices)
                failed += len(batch.failures)
                report.encoded += len(batch.indices)
                report.decoded += len(batch.indices) + len(batch.failures)
                bar.update(len(batch.indices) + len(batch.failures))
                if failed:
                    bar.set_postfix(failed=failed, refresh=False)
                batches += 1
                if batches == 1:
                    crash_point("during_encode")
                while pending_vectors >= shard_size:
                    head, pending = _split_after_vectors(pending, shard_size)
                    self._flush(head, identity, report)
                    pending_vectors -= shard_size
        report.encode_seconds = time.monotonic() - encode_started
        bar.close()
        if pending:
            self._flush(pending, identity, report)

    def _flush(self, pending: list[_Outcome], identity: ModelIdentity, report: IndexReport) -> None:
        """Write one shard (fsynced) and then commit its rows in one transaction."""
        pending = sorted(pending, key=lambda outcome: outcome.item.id)
        with_vectors = [outcome for outcome in pending if outcome.vector is not None]
        vectors = [outcome.vector for outcome in with_vectors if outcome.vector is not None]
        commit = GenerationCommit(model=identity.to_dict())
        shard_id: str | None = None
        if with_vectors:
            crash_point("before_shard_write")
            record = write_shard_record(
                self.index_dir,
                np.array([outcome.item.id for outcome in with_vectors], dtype=np.int64),
                np.stack(vectors).astype(np.float32),
                kind=self.settings.index_kind,
                model=identity.to_dict(),
                model_key=identity.key,
                use_gpu=self.use_faiss_gpu,
            )
            crash_point("after_shard_write")
            commit.new_shards.append(record)
            shard_id = record.id
            report.shards_written.append(shard_id)
        for outcome in pending:
            item = outcome.item
            if item.replaces is not None and item.replaces.status != ERROR:
                commit.tombstones.append(item.replaces.id)
            if outcome.vector is None:
                failure = outcome.failure
                assert failure is not None
                report.failed.append(Failure(item.stat.path, failure.reason, failure.detail))
                record_row = _row(
                    item.id,
                    item.stat,
                    item.sha256,
                    status=ERROR,
                    error_reason=failure.reason,
                    error_detail=failure.detail,
                )
            else:
                record_row = _row(
                    item.id,
                    item.stat,
                    item.sha256,
                    status=ACTIVE,
                    shard_id=shard_id,
                    **_image_size(outcome),
                    photo=_photo(outcome),
                )
            commit.upserts.append(record_row)
        crash_point("before_commit")
        report.generation = self.catalog.commit(commit)
        crash_point("after_commit")


def _image_size(outcome: _Outcome) -> dict[str, Any]:
    """Width, height and format: as decoded now, or those of the row whose vector is reused."""
    if outcome.decoded is not None:
        meta = outcome.decoded
        return {"width": meta.width, "height": meta.height, "format": meta.format}
    source = outcome.item.source
    if source is None:
        return {"width": None, "height": None, "format": None}
    return {"width": source.width, "height": source.height, "format": source.format}


def _photo(outcome: _Outcome) -> PhotoFields:
    """Capture time, camera and position: as decoded now, or those of the row whose vector
    (and so whose bytes, EXIF included) is reused; a file time comes from this file."""
    mtime_ns = outcome.item.stat.mtime_ns
    if outcome.decoded is not None:
        return photo_fields(outcome.decoded.photo, mtime_ns)
    source = outcome.item.source
    if source is None or source.photo.taken_at is None:
        return PhotoFields()  # a row indexed before migration 0007: this run's backfill reads it
    if source.photo.taken_at_source == "file":
        return replace(source.photo, taken_at=capture_time(PhotoInfo(), mtime_ns)[0])
    return source.photo
