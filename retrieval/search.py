"""Query the index: text, image and "more like this", with catalog metadata on each hit."""

from __future__ import annotations

import datetime as dt
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.exc import SQLAlchemyError

from retrieval.catalog.database import Catalog
from retrieval.catalog.identity import pairing_problem, read_index_file, shards_missing
from retrieval.catalog.records import IndexState, PhotoFields
from retrieval.catalog.schema import require_catalog, stamped_current, unreadable
from retrieval.catalog.tables import ACTIVE
from retrieval.config import Settings
from retrieval.errors import BadQuery, ClipsearchError, CorruptShard, NotFound
from retrieval.filters import SearchFilters, ids_passing
from retrieval.images import decode_image
from retrieval.index.faiss_gpu import DevicePlacement, placement_from_settings
from retrieval.index.integrity import ShardExpectation, quarantine
from retrieval.index.marks import VerifiedMarks
from retrieval.index.shard_set import ShardSet
from retrieval.labels.store import ImageLabel, LabelStore
from retrieval.models.encoder import Encoder
from retrieval.models.identity import ModelIdentity


@dataclass(frozen=True)
class Hit:
    id: int
    path: str
    score: float
    width: int | None
    height: int | None
    format: str | None
    indexed_at: dt.datetime | None
    labels: tuple[ImageLabel, ...] = ()  # zero-shot labels of every set, best first
    photo: PhotoFields = PhotoFields()  # capture time, camera, position

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "score": round(self.score, 6),
            "width": self.width,
            "height": self.height,
            "format": self.format,
            "indexed_at": self.indexed_at.isoformat() if self.indexed_at else None,
            **self.photo.to_row(),
            "taken_at": self.photo.taken_at.isoformat() if self.photo.taken_at else None,
            "labels": [label.to_dict() for label in self.labels],
        }


@dataclass
class SearchResult:
    hits: list[Hit]
    generation: int
    model: str
    took_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "results": [hit.to_dict() for hit in self.hits],
            "generation": self.generation,
            "model": self.model,
            "took_ms": {key: round(value, 3) for key, value in self.took_ms.items()},
        }


@dataclass(frozen=True)
class IndexSnapshot:
    """One servable generation: its shards and tombstones, fixed at load time."""

    generation: int
    shards: ShardSet
    model: dict[str, Any] | None
    index_id: str | None = None  # generations of two indexes may share a number

    @property
    def model_name(self) -> str:
        return str(self.model["name"]) if self.model else "none"


@dataclass(frozen=True)
class SearchOptions:
    """Per-search limits and index parameters, the same for every query of one Searcher."""

    max_k: int = 1000
    max_query_chars: int = 1000
    ef_search: int = 128
    nprobe: int = 32
    # Same JPEG decoding as the indexer, so an indexed file uploaded as a query gets
    # exactly its stored vector.
    jpeg_draft: bool = True
    max_pixels: int = 100_000_000  # decompression-bomb cap of query images
    max_decode_bytes: int | None = None  # decode budget of query images (DecodeCost)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, max_decode_bytes: int | None = None
    ) -> SearchOptions:
        """`max_decode_bytes` defaults to the indexer's budget (the API passes its own)."""
        return cls(
            max_k=settings.max_k,
            max_query_chars=settings.max_query_chars,
            ef_search=settings.hnsw_ef_search,
            nprobe=settings.ivf_nprobe,
            jpeg_draft=settings.jpeg_draft,
            max_pixels=settings.max_image_pixels,
            max_decode_bytes=max_decode_bytes or settings.max_decode_bytes,
        )


class Searcher:
    """Holds the current snapshot; `refresh` swaps in a new generation atomically."""

    def __init__(
        self,
        catalog: Catalog,
        index_dir: Path,
        encoder: Encoder | None,
        options: SearchOptions | None = None,
        label_store: LabelStore | None = None,
        gpu: DevicePlacement | None = None,
    ) -> None:
        self.catalog = catalog
        self.index_dir = Path(index_dir)
        self.encoder = encoder
        self.options = options or SearchOptions()
        self.label_store = label_store or LabelStore(catalog)
        self.gpu = gpu  # flat/IVF shards searched on this GPU (CLIPSEARCH_FAISS_GPU)
        self._lock = threading.Lock()
        self._snapshot: IndexSnapshot | None = None
        self._previous: IndexSnapshot | None = None
        self.marks = VerifiedMarks(self.index_dir)

    @classmethod
    def from_settings(
        cls,
        catalog: Catalog,
        settings: Settings,
        encoder: Encoder | None,
        *,
        label_store: LabelStore | None = None,
        max_decode_bytes: int | None = None,
    ) -> Searcher:
        """The searcher the settings describe: index dir, limits, index parameters, FAISS GPU."""
        return cls(
            catalog,
            settings.resolved_index_dir,
            encoder,
            SearchOptions.from_settings(settings, max_decode_bytes=max_decode_bytes),
            label_store=label_store,
            gpu=placement_from_settings(settings.faiss_gpu, settings.device),
        )

    def snapshot(self) -> IndexSnapshot:
        current = self._snapshot
        if current is None:
            self.refresh()
            current = self._snapshot
        assert current is not None
        return current

    def refresh(self, force: bool = False) -> bool:
        """Load the catalog's current generation if it is newer. Returns True if swapped.

        Raises CatalogMismatch, and swaps nothing, when the catalog no longer belongs to the
        index dir (a SQLite file removed, or replaced by another index's; a database reset);
        NoCatalog or CatalogSchemaMismatch when there is no catalog, or one this clipsearch does
        not read without `clipsearch db upgrade`; CatalogUnreadable for any other database error.
        """
        with self._lock:
            try:
                return self._refresh_locked(force)
            except SQLAlchemyError as exc:
                raise self._catalog_problem(exc) from None

    def _catalog_problem(self, error: SQLAlchemyError) -> ClipsearchError:
        """Why reading the catalog failed, in words: no catalog, another schema revision, or
        else the database's own error, on one line."""
        try:
            self._removed_file()  # a removed SQLite file says so first
            require_catalog(self.catalog, self.index_dir)
        except ClipsearchError as problem:
            return problem
        except SQLAlchemyError:
            pass
        return unreadable(self.catalog.shown_url, error)

    def _removed_file(self) -> None:
        """CatalogMismatch `catalog_removed` if the SQLite file was removed: a file removed
        between two checks of a poll gets the same words whichever check met it first (the
        file watch's, which name what happened)."""
        if self.catalog.file_watch is not None:
            self.catalog.file_watch.check()

    def _refresh_locked(self, force: bool) -> bool:
        if self.catalog.reopen_if_replaced():
            force = True  # the new file may even repeat the generation number
        # Never migrated here: a reader of an older schema is told to run `clipsearch db upgrade`.
        # Once a catalog was served, a poll asks only for its revision stamp (one query, not a
        # table listing): a dropped table or schema fails on the state read below, and
        # _catalog_problem then names the problem in full.
        if self._snapshot is not None:
            self._removed_file()
        if self._snapshot is None or not stamped_current(self.catalog):
            try:
                require_catalog(self.catalog, self.index_dir)
            except ClipsearchError:
                self._removed_file()
                raise
        state = self.catalog.state()
        self._require_paired(state)
        current = self._snapshot
        if (
            not force
            and current is not None
            and current.generation == state.generation
            and current.index_id == state.index_id
        ):
            return False
        if self.encoder is not None and state.model:
            self.encoder.identity.require_same(ModelIdentity.from_dict(state.model))
        rows = self.catalog.shards()
        shard_ids = [row.id for row in rows]
        # Each shard's files are hashed before it is first served (a verified mark spares
        # the hashing of files unchanged since); corrupt shards are left out, not fatal.
        self.marks.reload()
        shards = ShardSet.open_checked(
            self.index_dir,
            [ShardExpectation.of(row) for row in rows],
            marks=self.marks,
            deleted_ids=self.catalog.tombstoned_ids(),
            gpu=self.gpu,
            on_corrupt=self._stopped_serving,
        )
        self.marks.save()
        if self.gpu is not None:
            # Shards that left the index free their GPU copies; the set still serving
            # in-flight queries holds its own references until it is closed.
            self.gpu.retain(set(shard_ids))
        # Queries in flight keep using the old set; it is closed one swap later.
        if self._previous is not None:
            self._previous.shards.close()
        self._previous = self._snapshot
        self._snapshot = IndexSnapshot(state.generation, shards, state.model, state.index_id)
        return True

    def _require_paired(self, state: IndexState) -> None:
        """Raise CatalogMismatch unless the catalog may read the index dir (the same index)."""
        found = read_index_file(self.index_dir)
        if found is not None and state.index_id == found.index_id:
            return
        problem = pairing_problem(
            state.index_id,
            found,
            shards_missing((row.id for row in self.catalog.shards()), self.index_dir),
            writing=False,
            catalog=self.catalog.shown_url,
            index_dir=self.index_dir,
        )
        if problem is not None:
            raise problem

    def _stopped_serving(self, shard_id: str, reason: str) -> None:
        """A shard gave an impossible result: keep it out after a restart too, until repaired."""
        quarantine(self.marks, self.index_dir, shard_id, reason)
        self.marks.save()

    def close(self) -> None:
        for snap in (self._snapshot, self._previous):
            if snap is not None:
                snap.shards.close()

    def check_k(self, k: int) -> None:
        """Raise BadQuery unless 1 <= k <= max_k."""
        if not 1 <= k <= self.options.max_k:
            raise BadQuery(f"k must be between 1 and {self.options.max_k} (got {k}).")

    def allowed_ids(self, filters: SearchFilters | None) -> np.ndarray | None:
        """The ids (sorted) that pass `filters`, for `allowed_ids=`; None: nothing to filter."""
        return ids_passing(self.catalog, filters, self.label_store)

    def _require_encoder(self) -> Encoder:
        if self.encoder is None:
            raise BadQuery("This searcher was built without an encoder.")
        return self.encoder

    def search_vector(
        self,
        vector: np.ndarray,
        k: int,
        *,
        allowed_ids: np.ndarray | None = None,
        exclude_id: int | None = None,
        took: dict[str, float] | None = None,
    ) -> SearchResult:
        self.check_k(k)
        took = dict(took or {})
        snap = self.snapshot()
        started = time.perf_counter()
        want = k + (1 if exclude_id is not None else 0)
        scores, ids = snap.shards.search(
            vector.reshape(1, -1).astype(np.float32),
            want,
            allowed_ids=allowed_ids,
            ef_search=self.options.ef_search,
            nprobe=self.options.nprobe,
        )
        took["search"] = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        pairs = [
            (int(i), float(s))
            for i, s in zip(ids[0], scores[0], strict=True)
            if i >= 0 and int(i) != exclude_id
        ][:k]
        records = self.catalog.records(i for i, _ in pairs)
        labels = self.label_store.labels_for([i for i, _ in pairs])
        hits = [
            Hit(
                id=i,
                path=records[i].path,
                score=s,
                width=records[i].width,
                height=records[i].height,
                format=records[i].format,
                indexed_at=records[i].indexed_at,
                labels=tuple(labels.get(i, ())),
                photo=records[i].photo,
            )
            for i, s in pairs
            if i in records
        ]
        took["metadata"] = (time.perf_counter() - started) * 1000
        took["total"] = sum(v for key, v in took.items() if key != "total")
        return SearchResult(hits, snap.generation, snap.model_name, took)

    def clean_query(self, query: str) -> str:
        """The query text as it is encoded; BadQuery when empty or over the length limit."""
        # The limit counts the query as sent, spaces included: what the API schema's maxLength says.
        limit = self.options.max_query_chars
        if len(query) > limit:
            raise BadQuery(f"The query is {len(query)} characters; the limit is {limit}.")
        text = query.strip()
        if not text:
            raise BadQuery("The query is empty.")
        return text

    def search_text(
        self, query: str, k: int = 10, *, allowed_ids: np.ndarray | None = None
    ) -> SearchResult:
        text = self.clean_query(query)
        self.check_k(k)
        started = time.perf_counter()
        vector = self._require_encoder().encode_texts([text])[0]
        took = {"encode": (time.perf_counter() - started) * 1000}
        return self.search_vector(vector, k, allowed_ids=allowed_ids, took=took)

    def search_image(
        self,
        source: bytes | str | Path,
        k: int = 10,
        *,
        allowed_ids: np.ndarray | None = None,
    ) -> SearchResult:
        self.check_k(k)
        started = time.perf_counter()
        vector = self.embed_image(source)
        took = {"encode": (time.perf_counter() - started) * 1000}
        return self.search_vector(vector, k, allowed_ids=allowed_ids, took=took)

    def embed_image(self, source: bytes | str | Path) -> np.ndarray:
        """Decode (safely) and encode one query image, exactly as the indexer would."""
        encoder = self._require_encoder()
        decoded = decode_image(
            source if isinstance(source, bytes) else str(source),
            max_pixels=self.options.max_pixels,
            min_side=encoder.identity.image_size if self.options.jpeg_draft else None,
            max_bytes=self.options.max_decode_bytes,
        )
        return encoder.encode_images([decoded.image])[0]

    def similar(
        self, image_id: int, k: int = 10, *, allowed_ids: np.ndarray | None = None
    ) -> SearchResult:
        """More like this: the stored vector of an indexed image, no re-encoding."""
        snap = self.snapshot()
        found_ids, vectors = snap.shards.vectors(np.array([image_id], dtype=np.int64))
        if len(found_ids) == 0:  # unknown, tombstoned, or in a shard that is not served
            self._require_served(snap, image_id)
            raise NotFound(f"No indexed image with id {image_id}.")
        return self.search_vector(vectors[0], k, allowed_ids=allowed_ids, exclude_id=image_id)

    def _require_served(self, snap: IndexSnapshot, image_id: int) -> None:
        """Raise CorruptShard if the image's vector sits in a shard that is not being served."""
        corrupt = snap.shards.corrupt_shards
        if not corrupt:
            return
        record = self.catalog.records([image_id]).get(image_id)
        if record is not None and record.status == ACTIVE and record.shard_id in corrupt:
            raise CorruptShard(
                f"The stored vector of image {image_id} is in shard {record.shard_id}, which is "
                f"corrupt and not served: {corrupt[record.shard_id]}"
            )
