"""The nightly index job: scan, diff, decode+encode in overlapped workers, write shards, commit."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from indexer.jobs import IndexLock, cleanup_index_dir, crash_point
from indexer.scan import FileStat, diff_scan, hash_files, normalise_root, scan_roots
from retrieval.catalog import (
    ACTIVE,
    ERROR,
    Catalog,
    GenerationCommit,
    ImageRecord,
    ShardRecord,
)
from retrieval.config import Settings
from retrieval.encoder import Encoder, ModelIdentity
from retrieval.errors import ConfigError
from retrieval.faiss_gpu import resolve_faiss_gpu
from retrieval.images import decode_image
from retrieval.shards import Shard, choose_params, write_shard

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


def _row(image_id: int, stat: FileStat, sha256: str | None, **fields: Any) -> ImageRecord:
    return ImageRecord(
        id=image_id,
        path=stat.path,
        sha256=sha256,
        size=stat.size,
        mtime_ns=stat.mtime_ns,
        **fields,
    )


def new_shard_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


class _DecodeDataset:
    """Decodes and preprocesses in DataLoader workers, so decoding overlaps encoding."""

    def __init__(
        self,
        paths: Sequence[str],
        preprocess: Callable[[Any], Any],
        max_pixels: int,
        min_side: int | None,
    ):
        self.paths = list(paths)
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Any, Any]:
        from retrieval.errors import ImageError

        try:
            decoded = decode_image(
                self.paths[index], max_pixels=self.max_pixels, min_side=self.min_side
            )
            tensor = self.preprocess(decoded.image)
            return index, tensor, (decoded.width, decoded.height, decoded.format)
        except ImageError as exc:
            return index, None, (exc.reason, exc.detail)
        except Exception as exc:  # noqa: BLE001 - one bad file must never stop the job
            return index, None, ("decode_failed", f"{type(exc).__name__}: {exc}")


def _collate(batch: list[tuple[int, Any, Any]]) -> tuple[list[int], Any, list[Any], list[Any]]:
    import torch

    good = [(i, t, meta) for i, t, meta in batch if t is not None]
    bad = [(i, meta) for i, t, meta in batch if t is None]
    tensors = torch.stack([t for _, t, _ in good]) if good else None
    return [i for i, _, _ in good], tensors, [m for _, _, m in good], bad


def _worker_init(_: int) -> None:
    import torch

    # Each loader process decodes one image at a time; torch threads there only compete
    # with the encoder for the same cores.
    torch.set_num_threads(1)


def iterate_decoded(
    paths: Sequence[str],
    preprocess: Callable[[Any], Any],
    *,
    batch_size: int,
    workers: int,
    max_pixels: int,
    min_side: int | None = None,
) -> Any:
    """Yield (indices, tensor batch | None, metas, failures) in order."""
    from torch.utils.data import DataLoader

    dataset = _DecodeDataset(paths, preprocess, max_pixels, min_side)
    loader: Any = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    yield from loader


def _split_after_vectors(
    pending: list[tuple[_Item, np.ndarray | None, tuple[Any, ...]]], count: int
) -> tuple[list[Any], list[Any]]:
    """Cut the pending list just after its `count`-th item that has a vector."""
    seen = 0
    for position, (_, vector, _) in enumerate(pending):
        if vector is not None:
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
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.encoder_factory = encoder_factory
        self._encoder: Encoder | None = None
        self.index_dir = settings.resolved_index_dir
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
            self.catalog.upgrade()
            job_id = self.catalog.start_job("index", root_paths)
            report = IndexReport()
            try:
                cleanup_index_dir(self.catalog, self.index_dir, self.settings.retire_grace_seconds)
                self._run_locked(root_paths, report)
                if self.settings.label_on_index:
                    self._label(report)
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

        next_id = self.catalog.max_image_id() + 1
        items: list[_Item] = []
        errors_now: list[ImageRecord] = []
        # Ids follow the sorted path order, so a re-run after a crash assigns exactly the
        # ids a clean run would have.
        work: list[tuple[FileStat, str | None, ImageRecord | None, ImageRecord | None, int]] = []
        for stat, digest in diff.new:
            work.append((stat, digest, None, None, 0))
        for stat, digest, old, source in diff.changed:
            work.append((stat, digest, source, old, 0))
        for stat, digest, source in diff.copied:
            work.append((stat, digest, source, None, 0))
        for stat, maybe_digest, failed_row in diff.retry:
            work.append((stat, maybe_digest, None, None, failed_row.id))
        for stat, old_rec in diff.unhashable:
            # An error row keeps its id (it owns no vector); a live row is tombstoned.
            keep = old_rec.id if old_rec is not None and old_rec.status == ERROR else 0
            work.append((stat, None, None, old_rec, keep))
        work.sort(key=lambda w: w[0].path)
        for stat, item_digest, item_source, item_old, keep_id in work:
            if keep_id:
                image_id = keep_id
            else:
                image_id, next_id = next_id, next_id + 1
            if item_digest is None:
                errors_now.append(
                    _row(
                        image_id,
                        stat,
                        None,
                        status=ERROR,
                        error_reason="unreadable",
                        error_detail="the file could not be read",
                    )
                )
                if item_old is not None and item_old.status != ERROR:
                    report.changed += 1
                continue
            items.append(_Item(image_id, stat, item_digest, source=item_source, replaces=item_old))

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
        if not meta.is_empty:
            report.generation = self.catalog.commit(meta)

        if items:
            assert identity is not None
            self._encode_and_commit(items, identity, report)
        if not report.generation:
            report.generation = self.catalog.generation()

    def _reused_vectors(self, items: list[_Item]) -> dict[int, np.ndarray]:
        """Stored vectors for items that reuse one (copies, changed-to-known-bytes)."""
        by_shard: dict[str, list[_Item]] = {}
        for item in items:
            if item.source is not None and item.source.shard_id:
                by_shard.setdefault(item.source.shard_id, []).append(item)
        vectors: dict[int, np.ndarray] = {}
        for shard_id, group in by_shard.items():
            shard = Shard.open(self.index_dir, shard_id)
            wanted = np.array(sorted({i.source.id for i in group if i.source}), dtype=np.int64)
            found_ids, found = shard.vectors(wanted)
            lookup = {int(i): found[n] for n, i in enumerate(found_ids)}
            for item in group:
                assert item.source is not None
                if item.source.id in lookup:
                    vectors[item.id] = lookup[item.source.id]
        return vectors

    def _encode_and_commit(
        self, items: list[_Item], identity: ModelIdentity, report: IndexReport
    ) -> None:
        reused = self._reused_vectors(items)
        shard_size = self.settings.shard_size
        # Items are committed in chunks of shard_size vectors: a job killed after hours of
        # encoding keeps every chunk it committed.
        pending: list[tuple[_Item, np.ndarray | None, tuple[Any, ...]]] = []
        to_encode = [item for item in items if item.id not in reused]
        reused_items = [item for item in items if item.id in reused]
        bar = tqdm(
            total=len(to_encode),
            desc="encode",
            unit=" img",
            disable=self.progress_disabled,
            smoothing=0.1,
        )
        for item in reused_items:
            pending.append((item, reused[item.id], ("reused",)))
        encode_started = time.monotonic()
        batches = 0
        pending_vectors = len(pending)
        failed = 0
        if to_encode:
            for indices, tensors, metas, failures in iterate_decoded(
                [item.stat.path for item in to_encode],
                self.encoder.preprocess,
                batch_size=self.settings.batch_size,
                workers=self.settings.workers,
                max_pixels=self.settings.max_image_pixels,
                min_side=self.encoder.identity.image_size if self.settings.jpeg_draft else None,
            ):
                vectors = (
                    self.encoder.encode_image_tensors(tensors) if tensors is not None else None
                )
                for n, index in enumerate(indices):
                    assert vectors is not None
                    pending.append((to_encode[index], vectors[n], ("ok", *metas[n])))
                for index, (reason, detail) in failures:
                    pending.append((to_encode[index], None, ("error", reason, detail)))
                pending_vectors += len(indices)
                failed += len(failures)
                report.encoded += len(indices)
                report.decoded += len(indices) + len(failures)
                bar.update(len(indices) + len(failures))
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

    def _flush(
        self,
        pending: list[tuple[_Item, np.ndarray | None, tuple[Any, ...]]],
        identity: ModelIdentity,
        report: IndexReport,
    ) -> None:
        """Write one shard (fsynced) and then commit its rows in one transaction."""
        pending = sorted(pending, key=lambda p: p[0].id)
        with_vectors = [(item, vec, meta) for item, vec, meta in pending if vec is not None]
        commit = GenerationCommit(model=identity.to_dict())
        shard_id: str | None = None
        if with_vectors:
            ids = np.array([item.id for item, _, _ in with_vectors], dtype=np.int64)
            matrix = np.stack([vec for _, vec, _ in with_vectors]).astype(np.float32)
            params = choose_params(self.settings.index_kind, len(ids), matrix.shape[1])
            shard_id = new_shard_id()
            crash_point("before_shard_write")
            manifest = write_shard(
                self.index_dir,
                shard_id,
                ids=ids,
                embeddings=matrix,
                params=params,
                model=identity.to_dict(),
                use_gpu=self.use_faiss_gpu,
            )
            crash_point("after_shard_write")
            size = sum(int(f.get("bytes", 0)) for f in manifest.files.values())
            commit.new_shards.append(
                ShardRecord(
                    id=shard_id,
                    kind=manifest.kind,
                    count=manifest.count,
                    dim=manifest.dim,
                    params=manifest.params,
                    model_key=identity.key,
                    bytes=size,
                )
            )
            report.shards_written.append(shard_id)
        copied_meta = self._source_meta(
            [item for item, vec, meta in pending if meta[0] == "reused"]
        )
        for item, vec, meta in pending:
            if item.replaces is not None and item.replaces.status != ERROR:
                commit.tombstones.append(item.replaces.id)
            if vec is not None:
                if meta[0] == "ok":
                    width, height, fmt = meta[1], meta[2], meta[3]
                else:
                    width, height, fmt = copied_meta.get(item.id, (None, None, None))
                record = _row(
                    item.id,
                    item.stat,
                    item.sha256,
                    status=ACTIVE,
                    width=width,
                    height=height,
                    format=fmt,
                    shard_id=shard_id,
                )
            else:
                reason, detail = meta[1], meta[2]
                report.failed.append(Failure(item.stat.path, reason, detail))
                record = _row(
                    item.id,
                    item.stat,
                    item.sha256,
                    status=ERROR,
                    error_reason=reason,
                    error_detail=detail,
                )
            commit.upserts.append(record)
        crash_point("before_commit")
        report.generation = self.catalog.commit(commit)
        crash_point("after_commit")

    @staticmethod
    def _source_meta(items: list[_Item]) -> dict[int, tuple[Any, Any, Any]]:
        return {
            item.id: (item.source.width, item.source.height, item.source.format)
            for item in items
            if item.source is not None
        }
