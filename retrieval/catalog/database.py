"""The metadata catalog (SQLite or Postgres). Its transaction is the single commit point."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from sqlalchemy import (
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from retrieval.catalog.catalog_file import CatalogFileWatch, sqlite_file
from retrieval.catalog.records import GenerationCommit, ImageRecord, IndexState, PhotoFields
from retrieval.catalog.tables import (
    ACTIVE,
    DELETED,
    ERROR,
    ImageLabelRow,
    ImageRow,
    IndexJobRow,
    IndexStateRow,
    LabelledShardRow,
    LabelSetVersionRow,
    ShardRow,
    utcnow,
)
from retrieval.errors import CatalogMismatch, NoCatalog, NotFound

# SQLite caps bound parameters per statement; chunk large id lists below it.
_CHUNK = 5000


def chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def escape_like(text: str) -> str:
    """Escape LIKE wildcards (use with escape="\\")."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _like_prefix(root: str) -> str:
    return escape_like(root).rstrip("/") + "/%"


def _as_utc(moment: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands timestamps back without their zone; the catalog writes them in UTC."""
    return moment.replace(tzinfo=dt.UTC) if moment and moment.tzinfo is None else moment


def _record(row: ImageRow) -> ImageRecord:
    return ImageRecord(
        id=row.id,
        path=row.path,
        sha256=row.sha256,
        size=row.size,
        mtime_ns=row.mtime_ns,
        status=row.status,
        width=row.width,
        height=row.height,
        format=row.format,
        error_reason=row.error_reason,
        error_detail=row.error_detail,
        shard_id=row.shard_id,
        indexed_at=row.indexed_at,
        photo=PhotoFields(
            taken_at=_as_utc(row.taken_at),
            taken_at_source=row.taken_at_source,
            camera_make=row.camera_make,
            camera_model=row.camera_model,
            latitude=row.latitude,
            longitude=row.longitude,
        ),
    )


def _upsert_images(session: Session, records: Sequence[ImageRecord]) -> None:
    """Insert new image rows and overwrite existing ones (a retried error row keeps its id)."""
    existing: set[int] = set()
    for chunk in chunks([record.id for record in records]):
        existing.update(
            session.execute(select(ImageRow.id).where(ImageRow.id.in_(chunk))).scalars()
        )
    fresh = [r.to_row() for r in records if r.id not in existing]
    again = [r.to_row() for r in records if r.id in existing]
    if again:
        session.execute(update(ImageRow), again)
    if fresh:
        session.execute(insert(ImageRow), fresh)


def _drop_labels(session: Session, ids: Sequence[int]) -> None:
    """Delete the zero-shot labels of these images, in every label set version."""
    # Deleting per label version lets the (version_id, image_id, rank) key find the rows.
    versions = list(session.scalars(select(LabelSetVersionRow.id)))
    for chunk in chunks(ids):
        for version_id in versions:
            session.execute(
                delete(ImageLabelRow).where(
                    ImageLabelRow.version_id == version_id,
                    ImageLabelRow.image_id.in_(chunk),
                )
            )


def _purge_images(session: Session, ids: Sequence[int]) -> None:
    """Delete image rows for good, with their labels."""
    _drop_labels(session, ids)
    for chunk in chunks(ids):
        session.execute(delete(ImageRow).where(ImageRow.id.in_(chunk)))


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # No folder is made here: only a writer's `Catalog.upgrade` creates a catalog file.
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            # WAL lets the API read while the indexer writes; the busy timeout makes a
            # writer wait for a lock instead of failing at once.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


class Catalog:
    """Typed access to the catalog tables. One instance per process, built in a factory."""

    def __init__(self, url: str, engine: Engine | None = None) -> None:
        self.url = url
        self.engine = engine or make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        path = sqlite_file(url)
        self.file_watch = CatalogFileWatch(path, self.shown_url) if path is not None else None
        if self.file_watch is not None:
            watch = self.file_watch
            event.listen(self.engine, "do_connect", lambda *_: watch.before_connect())
            event.listen(self.engine, "connect", lambda _conn, _record: watch.connected())

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    def upgrade(self) -> None:
        """Create the schema, or bring it to the newest migration (idempotent). Only writers
        that may start a catalog call this (`index`, `db upgrade`); readers `require_catalog`.

        Refuses (ConfigError) a database that holds another application's tables, and
        (CatalogSchemaMismatch) a catalog a newer clipsearch wrote.
        """
        from retrieval.catalog.migrate import upgrade_database
        from retrieval.catalog.schema import check_writable, read_schema

        check_writable(read_schema(self))
        if self.file_watch is not None:
            self.file_watch.path.parent.mkdir(parents=True, exist_ok=True)
            self.file_watch.may_create = True
        upgrade_database(self.engine)

    @property
    def shown_url(self) -> str:
        """The URL with any password masked, for messages."""
        return self.engine.url.render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()
        if self.file_watch is not None:
            self.file_watch.release()

    def reopen_if_replaced(self) -> bool:
        """For a SQLite file: True (after closing every connection) if the path now holds another
        file. Raises CatalogMismatch if the file was removed. False for Postgres."""
        if self.file_watch is None or not self.file_watch.check():
            return False
        self.dispose()
        return True

    def _missing_tables(self, error: Exception) -> CatalogMismatch | None:
        """A CatalogMismatch if `error` came from a catalog whose tables are gone (reset)."""
        try:
            with self.engine.connect() as conn:
                present = conn.dialect.has_table(conn, IndexStateRow.__tablename__)
        except (OperationalError, ProgrammingError):
            return None
        if present:
            return None
        return CatalogMismatch(
            "catalog_lost",
            f"The catalog {self.shown_url} has no clipsearch tables (was the database reset "
            f"or dropped?): {type(error).__name__}.",
            self.shown_url,
        )

    # --- state -------------------------------------------------------------------
    def state(self) -> IndexState:
        try:
            with self.session() as session:
                row = session.get(IndexStateRow, 1)
                if row is None:
                    return IndexState(generation=0, model=None)
                return IndexState(row.generation, row.model, row.index_id)
        except (OperationalError, ProgrammingError) as exc:
            lost = self._missing_tables(exc)
            if lost is not None:
                raise lost from exc
            raise

    def recorded_model(self) -> dict[str, Any] | None:
        """The model identity the index was built with (None: nothing indexed yet), read alone,
        so that a catalog with an older schema or none at all answers None; creates nothing."""
        try:
            with self.engine.connect() as conn:
                query = select(IndexStateRow.model).where(IndexStateRow.id == 1)
                model = conn.execute(query).scalar()
        except (OperationalError, ProgrammingError, NoCatalog):
            return None
        return model if isinstance(model, dict) else None

    def set_index_id(self, index_id: str) -> None:
        """Record the index this catalog belongs to (index_dir/index.json holds the same id)."""
        with self.session() as session:
            state = session.get(IndexStateRow, 1, with_for_update=True)
            if state is None:
                session.add(
                    IndexStateRow(id=1, generation=0, updated_at=utcnow(), index_id=index_id)
                )
            else:
                state.index_id = index_id

    def holds_anything(self) -> bool:
        """True once any shard or image row was committed (a new or emptied catalog has none)."""
        with self.engine.connect() as conn:
            shard = conn.execute(select(ShardRow.id).limit(1)).first()
            image = conn.execute(select(ImageRow.id).limit(1)).first()
            return shard is not None or image is not None

    def generation(self) -> int:
        with self.engine.connect() as conn:
            value = conn.execute(select(IndexStateRow.generation).where(IndexStateRow.id == 1))
            return int(value.scalar() or 0)

    def max_image_id(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.max(ImageRow.id))).scalar() or 0)

    def next_image_id(self) -> int:
        """The first id a new image may take: past every id this catalog ever handed out."""
        with self.engine.connect() as conn:
            recorded = conn.execute(
                select(IndexStateRow.next_image_id).where(IndexStateRow.id == 1)
            ).scalar()
            highest = conn.execute(select(func.max(ImageRow.id))).scalar()
            return max(int(recorded or 1), int(highest or 0) + 1)

    # --- shards ------------------------------------------------------------------
    def shards(self, status: str | None = ACTIVE) -> list[ShardRow]:
        with self.session() as session:
            query = select(ShardRow).order_by(ShardRow.created_at, ShardRow.id)
            if status is not None:
                query = query.where(ShardRow.status == status)
            return list(session.scalars(query))

    def shard_members(self, shard_id: str) -> list[ImageRecord]:
        """The image rows whose vectors a shard holds (live and tombstoned), by id."""
        with self.session() as session:
            query = select(ImageRow).where(ImageRow.shard_id == shard_id).order_by(ImageRow.id)
            return [_record(row) for row in session.scalars(query)]

    def active_images_by_shard(self) -> dict[str | None, int]:
        """How many active images each shard holds (None: active images with no shard)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(ImageRow.shard_id, func.count())
                .where(ImageRow.status == ACTIVE)
                .group_by(ImageRow.shard_id)
            )
            return {shard_id: int(count) for shard_id, count in rows}

    def known_shard_ids(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(select(ShardRow.id)).scalars())

    def retired_before(self, cutoff: dt.datetime) -> list[str]:
        with self.session() as session:
            rows = session.scalars(
                select(ShardRow.id).where(
                    ShardRow.status == "retired", ShardRow.retired_at <= cutoff
                )
            )
            return list(rows)

    def forget_shards(self, shard_ids: Iterable[str]) -> None:
        """Drop rows of retired shards whose files are gone."""
        ids = list(shard_ids)
        with self.session() as session:
            for chunk in chunks(ids):
                retired = list(
                    session.scalars(
                        select(ShardRow.id).where(
                            ShardRow.id.in_(chunk), ShardRow.status == "retired"
                        )
                    )
                )
                session.execute(
                    delete(LabelledShardRow).where(LabelledShardRow.shard_id.in_(retired))
                )
                session.execute(delete(ShardRow).where(ShardRow.id.in_(retired)))

    def tombstoned_ids(self) -> np.ndarray:
        """Ids whose vectors still sit in an active shard but must never be returned."""
        with self.engine.connect() as conn:
            ids = conn.execute(
                select(ImageRow.id).where(
                    ImageRow.status == DELETED, ImageRow.shard_id.is_not(None)
                )
            ).scalars()
            return np.fromiter(ids, dtype=np.int64)

    def tombstones_by_shard(self) -> dict[str, np.ndarray]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(ImageRow.shard_id, ImageRow.id).where(
                    ImageRow.status == DELETED, ImageRow.shard_id.is_not(None)
                )
            )
            grouped: dict[str, list[int]] = {}
            for shard_id, image_id in rows:
                grouped.setdefault(str(shard_id), []).append(image_id)
        return {key: np.array(sorted(v), dtype=np.int64) for key, v in grouped.items()}

    # --- images ------------------------------------------------------------------
    def records_under(self, roots: Sequence[str]) -> dict[str, ImageRecord]:
        """Live (active or error) rows whose path lies under one of the roots, by path."""
        found: dict[str, ImageRecord] = {}
        with self.session() as session:
            for root in roots:
                query = select(ImageRow).where(
                    ImageRow.status != DELETED,
                    ImageRow.path.like(_like_prefix(root), escape="\\"),
                )
                for row in session.scalars(query):
                    found[row.path] = _record(row)
        return found

    def records_by_sha(self, shas: Iterable[str]) -> dict[str, list[ImageRecord]]:
        """Rows that still own a stored vector (active, or tombstoned in an active shard)."""
        wanted = sorted(set(shas))
        result: dict[str, list[ImageRecord]] = {}
        with self.session() as session:
            for chunk in chunks(wanted):
                query = (
                    select(ImageRow)
                    .where(ImageRow.sha256.in_(chunk), ImageRow.shard_id.is_not(None))
                    .order_by(ImageRow.id)
                )
                for row in session.scalars(query):
                    result.setdefault(row.sha256 or "", []).append(_record(row))
        return result

    def records(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        wanted = sorted({int(i) for i in ids})
        result: dict[int, ImageRecord] = {}
        with self.session() as session:
            for chunk in chunks(wanted):
                for row in session.scalars(select(ImageRow).where(ImageRow.id.in_(chunk))):
                    result[row.id] = _record(row)
        return result

    def record(self, image_id: int) -> ImageRecord:
        found = self.records([image_id])
        if image_id not in found:
            raise NotFound(f"No image with id {image_id}.")
        return found[image_id]

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(ImageRow.status, func.count()).group_by(ImageRow.status))
            return {status: int(count) for status, count in rows}

    def errors(self, limit: int = 1000) -> list[ImageRecord]:
        with self.session() as session:
            query = (
                select(ImageRow)
                .where(ImageRow.status == ERROR)
                .order_by(ImageRow.path)
                .limit(limit)
            )
            return [_record(row) for row in session.scalars(query)]

    def missing_photo_info(self, roots: Sequence[str]) -> list[ImageRecord]:
        """Active rows under the roots whose photo columns were never read (indexed before
        migration 0007), by path."""
        found: list[ImageRecord] = []
        with self.session() as session:
            for root in roots:
                query = select(ImageRow).where(
                    ImageRow.status == ACTIVE,
                    ImageRow.taken_at.is_(None),
                    ImageRow.path.like(_like_prefix(root), escape="\\"),
                )
                found.extend(_record(row) for row in session.scalars(query))
        return sorted({record.id: record for record in found}.values(), key=lambda r: r.path)

    def set_photo_info(self, photos: dict[int, PhotoFields]) -> None:
        """Write the photo columns of these rows, in one transaction. Vectors, shards and the
        generation stay as they are: search reads these columns from the catalog per query."""
        if not photos:
            return
        with self.session() as session:
            session.execute(
                update(ImageRow),
                [{"id": image_id, **photo.to_row()} for image_id, photo in photos.items()],
            )

    # --- the commit point ----------------------------------------------------------
    def commit(self, change: GenerationCommit) -> int:
        """Apply one generation in ONE transaction and return the new generation number.

        The shard files named in `change.new_shards` must already be written and fsynced:
        from the moment this transaction commits, readers may open them.
        """
        now = utcnow()
        with self.session() as session:
            state = session.get(IndexStateRow, 1, with_for_update=True)
            if state is None:
                state = IndexStateRow(id=1, generation=0, updated_at=now)
                session.add(state)
                session.flush()
            generation = state.generation + 1
            for shard in change.new_shards:
                session.add(
                    ShardRow(
                        id=shard.id,
                        kind=shard.kind,
                        count=shard.count,
                        dim=shard.dim,
                        params=shard.params,
                        model_key=shard.model_key,
                        bytes=shard.bytes,
                        manifest_sha256=shard.manifest_sha256,
                        generation=generation,
                        status=ACTIVE,
                        created_at=now,
                    )
                )
            session.flush()
            for chunk in chunks(change.tombstones):
                session.execute(
                    update(ImageRow)
                    .where(ImageRow.id.in_(chunk))
                    .values(status=DELETED, deleted_at=now)
                )
            if change.moves:
                session.execute(
                    update(ImageRow),
                    [
                        {"id": i, "path": p, "size": s, "mtime_ns": m, "indexed_at": now}
                        for i, p, s, m in change.moves
                    ],
                )
            if change.touches:
                session.execute(
                    update(ImageRow),
                    [{"id": i, "size": s, "mtime_ns": m} for i, s, m in change.touches],
                )
            if change.upserts:
                _upsert_images(session, change.upserts)
            if change.reassign:
                session.execute(
                    update(ImageRow), [{"id": i, "shard_id": s} for i, s in change.reassign]
                )
            for old, new in change.move_shard_images:
                session.execute(
                    update(ImageRow).where(ImageRow.shard_id == old).values(shard_id=new)
                )
            if change.drop_labels:
                _drop_labels(session, change.drop_labels)
            # Ids are never reused: the counter moves past every id this generation wrote,
            # before compaction's purge of deleted rows could lower max(id).
            highest = session.execute(select(func.max(ImageRow.id))).scalar()
            state.next_image_id = max(state.next_image_id or 1, int(highest or 0) + 1)
            if change.purge_ids:
                _purge_images(session, change.purge_ids)
            for chunk in chunks(change.retire_shards):
                session.execute(
                    update(ShardRow)
                    .where(ShardRow.id.in_(chunk))
                    .values(status="retired", retired_at=now)
                )
            state.generation = generation
            state.model = change.model
            state.model_key = change.model.get("key")
            state.updated_at = now
        return generation

    # --- jobs --------------------------------------------------------------------
    def start_job(self, kind: str, roots: Sequence[str]) -> int:
        now = utcnow()
        with self.session() as session:
            # We hold the single-writer lock, so any job still "running" died.
            session.execute(
                update(IndexJobRow)
                .where(IndexJobRow.status == "running")
                .values(status="killed", finished_at=now)
            )
            job = IndexJobRow(
                kind=kind,
                status="running",
                pid=os.getpid(),
                host=os.uname().nodename,
                roots=list(roots),
                stats={},
                started_at=now,
            )
            session.add(job)
            session.flush()
            return int(job.id)

    def finish_job(
        self,
        job_id: int,
        status: str,
        stats: dict[str, Any],
        generation: int | None,
        error: str | None = None,
    ) -> None:
        with self.session() as session:
            session.execute(
                update(IndexJobRow)
                .where(IndexJobRow.id == job_id)
                .values(
                    status=status,
                    stats=stats,
                    generation=generation,
                    error=error,
                    finished_at=utcnow(),
                )
            )

    def jobs(self, limit: int = 20) -> list[IndexJobRow]:
        with self.session() as session:
            return list(
                session.scalars(select(IndexJobRow).order_by(IndexJobRow.id.desc()).limit(limit))
            )

    def last_finished_job(self, kind: str) -> IndexJobRow | None:
        """The newest job of this kind that is no longer running (succeeded, failed, killed)."""
        with self.session() as session:
            return session.scalars(
                select(IndexJobRow)
                .where(IndexJobRow.kind == kind, IndexJobRow.status != "running")
                .order_by(IndexJobRow.id.desc())
                .limit(1)
            ).first()
