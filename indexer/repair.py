"""`clipsearch repair`: replace each corrupt shard by a new one, from what can still be trusted.

For every image of a corrupt shard, its vector comes from the first of these that holds it:

1. embeddings.npy, when it matches its sha256 and every vector in it is of unit length, with
   ids from ids.npy when that verifies, else from the catalog (which lists the same ids);
2. index.faiss, when it matches its sha256 and keeps exact copies (flat, HNSW and IVF-Flat do:
   their float32 values are the float16 ones of embeddings.npy);
3. when shard.json is unreadable (so nothing has a checksum): embeddings.npy, if index.faiss
   holds bit for bit the same vectors for the catalog's ids (two files agreeing);
4. the image file, encoded again, when it still has the sha256 the catalog recorded.

Anything else is unrecoverable: the image's row becomes a failed one (reason `vector_lost`), so
that the next `clipsearch index` encodes the file again if it changes or reappears. Tombstoned
images need no vector and are dropped, as compaction drops them.

Each repaired shard is committed like a compaction: a new shard written and fsynced, then one
catalog transaction that points the images at it and retires the corrupt one (whose files stay
for the grace period). A repair killed at any moment leaves the previous generation servable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from indexer.binding import claim_problem
from indexer.crash import crash_point
from indexer.decode import iterate_decoded
from indexer.lock import IndexLock
from indexer.publish import cleanup_index_dir, write_shard_record
from indexer.scan import sha256_of
from indexer.verify import SERVING, verify_shard
from retrieval.catalog.database import Catalog
from retrieval.catalog.records import GenerationCommit, ImageRecord
from retrieval.catalog.schema import require_catalog
from retrieval.catalog.tables import ACTIVE, ERROR, ShardRow
from retrieval.config import Settings
from retrieval.errors import CorruptShard, NotFound
from retrieval.index.faiss_gpu import resolve_faiss_gpu
from retrieval.index.integrity import UNIT_NORM_TOLERANCE, check_shard
from retrieval.index.kinds import IndexParams, stored_vectors
from retrieval.index.marks import VerifiedMarks
from retrieval.index.shard import (
    EMBEDDINGS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    read_index_file,
    read_npy_header,
    shard_path,
)
from retrieval.labels.store import LabelStore
from retrieval.models.encoder import Encoder
from retrieval.models.identity import ModelIdentity

log = logging.getLogger(__name__)

LOST = "vector_lost"

# Where a recovered vector came from (the keys of ShardRepair.recovered).
FROM_EMBEDDINGS = "embeddings"
FROM_INDEX = "index"
FROM_AGREEMENT = "agreeing_files"
REENCODED = "reencoded"


@dataclass(frozen=True)
class LostImage:
    id: int
    path: str
    reason: str


@dataclass
class ShardRepair:
    """What a repair made of one corrupt shard."""

    shard_id: str
    problems: dict[str, str]
    new_shard: str | None = None  # None: no vector survived (or a dry run)
    recovered: dict[str, int] = field(default_factory=dict)  # source -> vectors
    dropped_deleted: int = 0  # tombstoned images, which need no vector
    lost: list[LostImage] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RepairReport:
    repaired: list[ShardRepair] = field(default_factory=list)
    healthy: int = 0
    generation: int = 0
    dry_run: bool = False
    seconds: float = 0.0

    @property
    def lost(self) -> int:
        return sum(len(shard.lost) for shard in self.repaired)

    def to_dict(self) -> dict[str, Any]:
        return {
            "repaired": [shard.to_dict() for shard in self.repaired],
            "healthy": self.healthy,
            "lost": self.lost,
            "generation": self.generation,
            "dry_run": self.dry_run,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class _Salvage:
    """The vectors recovered for one shard so far, by image id, and where each came from."""

    vectors: dict[int, np.ndarray] = field(default_factory=dict)  # float16 rows
    sources: dict[int, str] = field(default_factory=dict)

    def take(self, ids: np.ndarray, vectors: np.ndarray, wanted: set[int], source: str) -> None:
        for image_id, vector in zip(ids.tolist(), vectors, strict=True):
            if image_id in wanted and image_id not in self.vectors:
                self.vectors[image_id] = np.asarray(vector, dtype=np.float16)
                self.sources[image_id] = source


class RepairJob:
    """One run of `clipsearch repair`. The encoder is loaded only if a file must be encoded."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        encoder_factory: Callable[[], Encoder],
        *,
        progress: bool | None = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.encoder_factory = encoder_factory
        self._encoder: Encoder | None = None
        self.index_dir = settings.resolved_index_dir
        self.use_faiss_gpu = resolve_faiss_gpu(settings.faiss_gpu, settings.device)
        self.progress_disabled = None if progress is None else not progress

    def run(self, shard_ids: list[str] | None = None, *, dry_run: bool = False) -> RepairReport:
        """Repair every corrupt active shard (or only `shard_ids`); `dry_run` writes nothing."""
        started = time.monotonic()
        report = RepairReport(dry_run=dry_run)
        # Never created nor migrated here; checked before the lock, so that no catalog leaves
        # no index dir or lock file behind either.
        require_catalog(self.catalog, self.index_dir)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        with IndexLock(self.index_dir):
            job_id = None if dry_run else self.catalog.start_job("repair", [])
            try:
                if dry_run:  # cleanup_index_dir checks this itself (and claims a new catalog)
                    problem = claim_problem(self.catalog, self.index_dir, writing=False)
                    if problem is not None:
                        raise problem
                else:
                    cleanup_index_dir(
                        self.catalog, self.index_dir, self.settings.retire_grace_seconds
                    )
                self._run_locked(report, shard_ids, dry_run)
            except BaseException as exc:
                if job_id is not None:
                    self.catalog.finish_job(
                        job_id, "failed", report.to_dict(), report.generation or None, str(exc)
                    )
                raise
            report.generation = report.generation or self.catalog.generation()
            report.seconds = time.monotonic() - started
            if job_id is not None:
                self.catalog.finish_job(job_id, "succeeded", report.to_dict(), report.generation)
        return report

    def _run_locked(self, report: RepairReport, shard_ids: list[str] | None, dry_run: bool) -> None:
        rows = self.catalog.shards()
        if shard_ids:
            known = {row.id for row in rows}
            missing = [shard_id for shard_id in shard_ids if shard_id not in known]
            if missing:
                raise NotFound(f"No active shard {missing[0]!r} (see `clipsearch status`).")
            rows = [row for row in rows if row.id in set(shard_ids)]
        state = self.catalog.state()
        marks = VerifiedMarks(self.index_dir)
        bar = tqdm(
            total=sum(int(row.bytes or 0) for row in rows),
            desc="verify",
            unit="B",
            unit_scale=True,
            disable=self.progress_disabled,
        )
        corrupt: list[tuple[ShardRow, dict[str, str]]] = []
        with bar:
            for row in rows:
                problems = verify_shard(self.catalog, self.index_dir, row, marks, bar.update)
                if problems:
                    corrupt.append((row, problems))
                else:
                    report.healthy += 1
        marks.save()
        if not corrupt:
            return
        assert state.model is not None  # shards exist, so a model wrote them
        for row, problems in corrupt:
            repair = ShardRepair(row.id, problems)
            report.repaired.append(repair)
            commit = self._repair_shard(row, repair, state.model, dry_run)
            if commit is None:
                continue
            crash_point("repair_before_commit")
            report.generation = self.catalog.commit(commit)
            crash_point("repair_after_commit")
            if repair.new_shard is not None and REENCODED not in repair.recovered:
                # The same vectors, bit for bit: the old shard's labels hold for the new one.
                LabelStore(self.catalog).carry_labelled_shards([row.id], [repair.new_shard])
            log.warning(
                "repaired shard %s: %s, %d unrecoverable",
                row.id,
                repair.recovered,
                len(repair.lost),
            )
        if not dry_run and self.settings.label_on_index:
            # Shards written from new vectors, or from a shard that was never labelled under a
            # set's newest version (labelling skips corrupt shards), get their labels now.
            self._label()

    def _repair_shard(
        self, row: ShardRow, repair: ShardRepair, model: dict[str, Any], dry_run: bool
    ) -> GenerationCommit | None:
        members = self.catalog.shard_members(row.id)
        live = {record.id: record for record in members if record.status == ACTIVE}
        dead = [record.id for record in members if record.status != ACTIVE]
        repair.dropped_deleted = len(dead)
        salvage = self._salvage(row, members, set(live), SERVING in repair.problems)
        missing = [live[i] for i in sorted(set(live) - set(salvage.vectors))]
        to_encode, repair.lost = self._sources_to_encode(missing)
        if to_encode and not dry_run:
            repair.lost += self._encode(to_encode, model, salvage)
        elif to_encode:
            for record in to_encode:
                salvage.sources[record.id] = REENCODED
        for source in salvage.sources.values():
            repair.recovered[source] = repair.recovered.get(source, 0) + 1
        if dry_run:
            return None

        commit = GenerationCommit(model=model)
        ids = np.array(sorted(salvage.vectors), dtype=np.int64)
        if ids.size:
            identity = ModelIdentity.from_dict(model)
            shard = write_shard_record(
                self.index_dir,
                ids,
                np.stack([salvage.vectors[int(i)] for i in ids]).astype(np.float32),
                kind=row.kind,
                model=model,
                model_key=identity.key,
                use_gpu=self.use_faiss_gpu,
                params=IndexParams.from_dict(row.params),
            )
            repair.new_shard = shard.id
            commit.new_shards.append(shard)
            commit.reassign = [(int(i), shard.id) for i in ids]
        commit.retire_shards = [row.id]
        commit.purge_ids = dead
        lost_ids = {image.id for image in repair.lost}
        commit.upserts = [
            _lost_row(live[image.id], image.reason) for image in repair.lost if image.id in live
        ]
        if REENCODED in repair.recovered or lost_ids:
            # Labels are recomputed from the new vectors (the whole shard, so no image keeps two
            # sets of rows); lost images keep none.
            commit.drop_labels = sorted(set(ids.tolist()) | lost_ids)
        return commit

    def _salvage(
        self, row: ShardRow, members: list[ImageRecord], wanted: set[int], served_bad: bool
    ) -> _Salvage:
        """Vectors from the shard's own files, where a checksum (or two agreeing files) vouch."""
        salvage = _Salvage()
        if not wanted:
            return salvage
        check = check_shard(self.index_dir, row.id, None, content=True, keep_embeddings=True)
        manifest = check.manifest
        if manifest is not None and manifest.dim != row.dim:
            return salvage  # not this shard's files at all
        catalog_ids = np.array([record.id for record in members], dtype=np.int64)
        if check.embeddings is not None and manifest is not None:
            ids = check.ids
            if ids is None and catalog_ids.size == manifest.count:
                ids = catalog_ids  # the catalog lists the same ids, ascending, as ids.npy did
            if ids is not None:
                salvage.take(ids, check.embeddings, wanted, FROM_EMBEDDINGS)
        # An index that served impossible scores is not a source, checksum or not.
        if len(salvage.vectors) < len(wanted) and not served_bad and check.file_ok(INDEX_FILE):
            found = self._index_vectors(row.id)
            if found is not None:
                salvage.take(*found, wanted, FROM_INDEX)
        if len(salvage.vectors) < len(wanted) and MANIFEST_FILE in check.problems:
            agreed = self._agreeing_files(row, catalog_ids)
            if agreed is not None:
                salvage.take(catalog_ids, agreed, wanted, FROM_AGREEMENT)
        return salvage

    def _index_vectors(self, shard_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The exact vectors index.faiss keeps, if they look like stored vectors."""
        try:
            found = stored_vectors(
                read_index_file(shard_path(self.index_dir, shard_id) / INDEX_FILE)
            )
        except CorruptShard:
            return None
        if found is None:
            return None
        ids, vectors = found
        exact = vectors.astype(np.float16).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            norms = np.linalg.norm(vectors, axis=1)
        if not (
            np.array_equal(exact, vectors)
            and bool(np.all(np.abs(norms - 1.0) <= UNIT_NORM_TOLERANCE))
            and (ids.size < 2 or bool(np.all(ids[1:] > ids[:-1])))
        ):
            return None
        return ids, vectors

    def _agreeing_files(self, row: ShardRow, catalog_ids: np.ndarray) -> np.ndarray | None:
        """embeddings.npy, when index.faiss holds the very same vectors for the catalog's ids."""
        shard_dir = shard_path(self.index_dir, row.id)
        try:
            with open(shard_dir / EMBEDDINGS_FILE, "rb") as handle:
                shape, fortran, dtype = read_npy_header(handle, shard_dir / EMBEDDINGS_FILE)
                if shape != (catalog_ids.size, row.dim) or fortran or dtype != np.float16:
                    return None
                embeddings = np.fromfile(handle, dtype=np.float16, count=catalog_ids.size * row.dim)
        except (OSError, CorruptShard):
            return None
        if embeddings.size != catalog_ids.size * row.dim:
            return None
        embeddings = embeddings.reshape(catalog_ids.size, row.dim)
        found = self._index_vectors(row.id)
        if found is None or not np.array_equal(found[0], catalog_ids):
            return None
        if not np.array_equal(found[1], embeddings.astype(np.float32)):
            return None
        return embeddings

    def _sources_to_encode(
        self, missing: list[ImageRecord]
    ) -> tuple[list[ImageRecord], list[LostImage]]:
        """Images without a vector: those whose file still holds the indexed bytes, and the lost."""
        usable: list[ImageRecord] = []
        lost: list[LostImage] = []
        for record in missing:
            try:
                digest = sha256_of(record.path)
            except FileNotFoundError:
                lost.append(LostImage(record.id, record.path, "the image file is gone"))
                continue
            except OSError as exc:
                lost.append(
                    LostImage(record.id, record.path, f"the image file is unreadable: {exc}")
                )
                continue
            if digest != record.sha256:
                lost.append(
                    LostImage(record.id, record.path, "the image file changed since it was indexed")
                )
            else:
                usable.append(record)
        return usable, lost

    def _encode(
        self, records: list[ImageRecord], model: dict[str, Any], salvage: _Salvage
    ) -> list[LostImage]:
        """Encode the files again, exactly as `clipsearch index` does; the failures are lost."""
        if self._encoder is None:
            self._encoder = self.encoder_factory()
        encoder = self._encoder
        encoder.identity.require_same(ModelIdentity.from_dict(model))
        lost: list[LostImage] = []
        bar = tqdm(total=len(records), desc="encode", unit=" img", disable=self.progress_disabled)
        with bar:
            for batch in iterate_decoded(
                [record.path for record in records],
                encoder.preprocess,
                batch_size=self.settings.batch_size,
                workers=self.settings.workers,
                max_pixels=self.settings.max_image_pixels,
                min_side=encoder.identity.image_size if self.settings.jpeg_draft else None,
                max_bytes=self.settings.max_decode_bytes,
            ):
                if batch.tensors is not None:
                    vectors = encoder.encode_image_tensors(batch.tensors)
                    for n, position in enumerate(batch.indices):
                        record = records[position]
                        salvage.vectors[record.id] = vectors[n].astype(np.float16)
                        salvage.sources[record.id] = REENCODED
                for position, failure in batch.failures:
                    record = records[position]
                    lost.append(
                        LostImage(record.id, record.path, f"{failure.reason}: {failure.detail}")
                    )
                bar.update(len(batch.indices) + len(batch.failures))
        return lost

    def _label(self) -> None:
        from indexer.labelling import LabelJob

        LabelJob(
            self.settings,
            self.catalog,
            self.encoder_factory,
            progress=None if self.progress_disabled is None else not self.progress_disabled,
        ).run_locked()


def _lost_row(record: ImageRecord, reason: str) -> ImageRecord:
    """The row of an image whose vector is lost: a failed image, so `index` retries it."""
    return ImageRecord(
        id=record.id,
        path=record.path,
        sha256=record.sha256,
        size=record.size,
        mtime_ns=record.mtime_ns,
        status=ERROR,
        width=record.width,
        height=record.height,
        format=record.format,
        error_reason=LOST,
        error_detail=f"clipsearch repair could not recover its vector: {reason}",
        shard_id=None,
    )
