"""`compact --kind ivfpq-large`: fold shards into a few large IVF-PQ shards without retraining.

The first run trains a template (retrieval.index.trained) on a sample of every live vector and
fills large shards of up to `large_shard_size` vectors from it. Every later run adds the vectors
of the shards written since (the index job's nightly shards) to the lists of the newest large
shard that is not full, by writing a NEW shard that holds the old one's vectors and the new ones
(retrieval.index.large) and retiring the old one in the same commit; when it fills up, new large
shards are started from the same template. Nothing is trained again until `--retrain` asks for
it, which the report advises once the large shards hold RETRAIN_GROWTH times the vectors the
template was trained for.

Vectors to add are staged, verified, in a scratch file in the index directory (float16, removed
at the end, and by the next writer job if this one is killed), so memory stays bounded by the
large shard's codes and one block of vectors, however many vectors are folded in.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from indexer.publish import STAGING_PREFIX, shard_record
from retrieval.catalog.records import GenerationCommit
from retrieval.catalog.tables import ShardRow
from retrieval.errors import ConfigError, CorruptShard, TrainedTemplateError
from retrieval.index.integrity import ShardExpectation, manifest_digest
from retrieval.index.kinds import LARGE_KIND, TRAIN_SEED, default_pq_m
from retrieval.index.large import write_merged_shard
from retrieval.index.shard import iter_embedding_blocks, new_shard_id, read_manifest, shard_path
from retrieval.index.trained import (
    RETRAIN_GROWTH,
    TemplateInfo,
    check_trainable,
    default_large_nlist,
    load_template,
    read_template_info,
    train_template,
    training_sample_size,
)
from retrieval.models.identity import ModelIdentity

log = logging.getLogger(__name__)

# A full large shard is rewritten to drop its tombstones only when they are this share of it:
# until then they cost a selector check per candidate, and rewriting would cost the whole shard.
PURGE_FRACTION = 0.10
_READ_ROWS = 65_536


@dataclass(frozen=True)
class LargeOptions:
    shard_size: int = 20_000_000
    nlist: int = 0  # 0: default_large_nlist(corpus)
    pq_m: int = 0  # 0: default_pq_m(dim)
    pq_nbits: int = 8
    retrain: bool = False


@dataclass
class LargeReport:
    """What a fold into the large kind did and cost, and whether a retrain is advised."""

    trained_id: str = ""
    trained_now: bool = False
    trained_on: int = 0
    corpus_at_training: int = 0
    nlist: int = 0
    pq_m: int = 0
    train_seconds: float = 0.0
    added_vectors: int = 0  # vectors of other shards added to large shards' lists
    carried_vectors: int = 0  # vectors copied from the large shards that were rewritten
    bytes_read: int = 0
    bytes_written: int = 0
    large_vectors: int = 0  # vectors in large shards after this run (tombstoned ones included)
    growth: float = 0.0  # large_vectors / corpus_at_training
    retrain_advised: bool = False
    advice: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LargePlan:
    """The commit of one fold, and what it rewrote."""

    commit: GenerationCommit
    merged: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    dropped: int = 0
    live: int = 0


def fold_into_large(
    index_dir: Path,
    model: dict[str, Any],
    shards: list[ShardRow],
    tombstones: dict[str, np.ndarray],
    report: LargeReport,
    corrupt: dict[str, str],
    *,
    options: LargeOptions,
    use_gpu: bool | None = None,
    progress: bool | None = None,
) -> LargePlan | None:
    """Write the shards of one fold and return the commit that makes them live (None: nothing
    to do). Shards that fail verification are left alone and named in `corrupt`."""
    identity = ModelIdentity.from_dict(model)
    dim, key = identity.dim, identity.key
    large = [row for row in shards if row.kind == LARGE_KIND]
    template_id = None if options.retrain or not large else _newest(large).params["trained_id"]
    template, info = (None, None)
    if template_id is not None:
        template, info = load_template(index_dir, template_id, model_key=key, dim=dim)
        current = [row for row in large if row.params.get("trained_id") == template_id]
        stage = [row for row in shards if row not in current]
    else:
        current, stage = [], list(shards)
    dead = {row.id: int(tombstones.get(row.id, np.zeros(0)).size) for row in shards}
    open_row = _open_shard(current, dead, options.shard_size)
    purge = [
        row
        for row in current
        if row is not open_row and dead[row.id] >= PURGE_FRACTION * max(row.count, 1)
    ]
    # The open shard is rewritten anyway when new vectors arrive (its tombstones go for free);
    # for deletions alone, only past PURGE_FRACTION, as any other large shard.
    open_purge = open_row is not None and dead[open_row.id] >= PURGE_FRACTION * max(
        open_row.count, 1
    )
    if not stage and not purge and not open_purge:
        if info is not None:
            _advise(report, info, sum(row.count for row in current))
        return None

    staging_path = Path(index_dir) / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}.npy"
    try:
        staged = _stage(index_dir, stage, tombstones, dim, staging_path, corrupt, progress)
        staged_rows, new_ids, order, staging, dropped = staged
        report.bytes_read += sum(int(row.bytes or 0) for row, _ in staged_rows)
        if template is None or info is None:
            if not new_ids.size:
                return None
            template, info = _train(index_dir, model, new_ids.size, staging, options, use_gpu)
            report.trained_now = True

        def rows(start: int, stop: int) -> np.ndarray:
            # The staged rows of new ids [start, stop): gathered from the memory-mapped file.
            return np.asarray(staging[order[start:stop]])

        plan = LargePlan(GenerationCommit(model=model), dropped=dropped)
        targets = _targets(open_row, open_purge, purge, dead, int(new_ids.size), options.shard_size)
        placed: list[tuple[int, int, str]] = []  # (first id, last id, shard) of new vectors
        for base, start, stop in targets:
            shard_id = new_shard_id()
            drop = tombstones.get(base.id, np.zeros(0, dtype=np.int64)) if base else None
            try:
                manifest = write_merged_shard(
                    index_dir,
                    shard_id,
                    template=template,
                    info=info,
                    model=model,
                    base_id=base.id if base is not None else None,
                    drop_ids=drop if drop is not None else np.zeros(0, dtype=np.int64),
                    new_ids=new_ids[start:stop],
                    new_rows=_offset(rows, start),
                    use_gpu=use_gpu,
                )
            except CorruptShard as exc:
                if base is None:
                    raise
                corrupt[base.id] = exc.problem or str(exc)
                log.error("compaction leaves corrupt shard %s alone: %s", base.id, exc)
                if stop > start:  # its share of new vectors goes into a shard of its own
                    targets.append((None, start, stop))
                continue
            record = shard_record(index_dir, manifest, key)
            plan.commit.new_shards.append(record)
            plan.written.append(shard_id)
            report.bytes_written += record.bytes
            if base is not None:
                plan.commit.move_shard_images.append((base.id, shard_id))
                plan.merged.append(base.id)
                plan.dropped += dead[base.id]
                report.bytes_read += int(base.bytes or 0)
                report.carried_vectors += base.count - dead[base.id]
            if stop > start:
                placed.append((int(new_ids[start]), int(new_ids[stop - 1]), shard_id))
            report.added_vectors += stop - start
            plan.live += manifest.count
        _point_images(plan.commit, staged_rows, placed)
        plan.merged += [row.id for row, _ in staged_rows]
        plan.commit.retire_shards = sorted(plan.merged)
        plan.commit.purge_ids = [
            int(i) for shard_id in plan.merged for i in tombstones.get(shard_id, [])
        ]
        after = [row.count for row in current if row.id not in plan.merged]
        _advise(report, info, sum(after) + sum(r.count for r in plan.commit.new_shards))
        return plan if plan.written or plan.merged else None
    finally:
        staging_path.unlink(missing_ok=True)


def _offset(rows: Callable[[int, int], np.ndarray], by: int) -> Callable[[int, int], np.ndarray]:
    return lambda start, stop: rows(by + start, by + stop)


def _newest(rows: list[ShardRow]) -> ShardRow:
    return max(rows, key=lambda row: (row.generation, row.created_at, row.id))


def _open_shard(current: list[ShardRow], dead: dict[str, int], cap: int) -> ShardRow | None:
    """The newest large shard with room (counting its tombstoned vectors as gone)."""
    with_room = [row for row in current if row.count - dead[row.id] < cap]
    return _newest(with_room) if with_room else None


def _targets(
    open_row: ShardRow | None,
    open_purge: bool,
    purge: list[ShardRow],
    dead: dict[str, int],
    n_new: int,
    cap: int,
) -> list[tuple[ShardRow | None, int, int]]:
    """(base shard or None, first, stop) of each shard to write: the new vectors [first, stop)
    in id order fill the open shard first, then new shards of `cap`."""
    targets: list[tuple[ShardRow | None, int, int]] = []
    start = 0
    if open_row is not None and (n_new or open_purge):
        take = min(cap - (open_row.count - dead[open_row.id]), n_new)
        targets.append((open_row, 0, take))
        start = take
    targets += [(row, start, start) for row in purge]
    while start < n_new:
        stop = min(start + cap, n_new)
        targets.append((None, start, stop))
        start = stop
    return targets


def _stage(
    index_dir: Path,
    rows: list[ShardRow],
    tombstones: dict[str, np.ndarray],
    dim: int,
    path: Path,
    corrupt: dict[str, str],
    progress: bool | None,
) -> tuple[list[tuple[ShardRow, np.ndarray]], np.ndarray, np.ndarray, np.ndarray, int]:
    """Copy the live vectors of `rows` into a scratch .npy, verifying each shard as it is read.

    Returns the shards that verified with their live ids, all staged ids (ascending), the
    staging row of each of them, the staging array (memory-mapped) and how many tombstoned
    vectors were left out.
    """
    total = max(1, sum(row.count for row in rows))
    staging = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(total, dim))
    id_parts: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    filled = dropped = 0
    verified: list[tuple[ShardRow, np.ndarray]] = []
    bar = tqdm(
        total=sum(row.count for row in rows),
        desc="verify and stage shards",
        unit="vec",
        unit_scale=True,
        disable=progress is False,
    )
    with bar:
        for row in rows:
            begin = filled
            dead = np.unique(tombstones.get(row.id, np.zeros(0, dtype=np.int64)))
            kept: list[np.ndarray] = []
            try:
                _check_row(index_dir, row)
                for ids, vectors in iter_embedding_blocks(index_dir, row.id, _READ_ROWS):
                    _check_norms(vectors, row.id)
                    keep = ~np.isin(ids, dead)
                    count = int(keep.sum())
                    staging[filled : filled + count] = vectors[keep]
                    kept.append(ids[keep])
                    filled += count
                    bar.update(len(ids))
            except CorruptShard as exc:
                filled = begin
                corrupt[row.id] = exc.problem or str(exc)
                log.error("compaction leaves corrupt shard %s alone: %s", row.id, exc)
                continue
            live = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
            verified.append((row, live))
            id_parts.append(live)
            dropped += row.count - int(live.size)
    staging.flush()
    ids = np.concatenate(id_parts)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    if sorted_ids.size > 1 and bool(np.any(sorted_ids[1:] == sorted_ids[:-1])):
        raise ValueError("an image id is in two active shards; run `clipsearch verify`")
    return verified, sorted_ids, order, staging, dropped


def _check_row(index_dir: Path, row: ShardRow) -> None:
    """CorruptShard when shard.json disagrees with the catalog's row (the data files are hashed
    as they are read)."""
    shard_dir = shard_path(index_dir, row.id)
    manifest = read_manifest(shard_dir)
    expected = ShardExpectation.of(row)
    differs = expected.disagreements(manifest)
    if expected.manifest_sha256 is not None and manifest_digest(shard_dir) != (
        expected.manifest_sha256
    ):
        differs.append("shard.json differs from the sha256 the catalog recorded at commit")
    if differs:
        problem = "; ".join(differs)
        raise CorruptShard(f"shard {row.id}: {problem}", shard_id=row.id, problem=problem)


def _check_norms(vectors: np.ndarray, shard_id: str) -> None:
    x = vectors.astype(np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    if not bool(np.all(np.abs(norms - 1.0) <= 1e-2)):  # NaN fails too
        problem = "embeddings.npy holds vectors that are not of unit length"
        raise CorruptShard(f"shard {shard_id}: {problem}", shard_id=shard_id, problem=problem)


def _train(
    index_dir: Path,
    model: dict[str, Any],
    n: int,
    staging: np.ndarray,
    options: LargeOptions,
    use_gpu: bool | None,
) -> tuple[Any, TemplateInfo]:
    dim = staging.shape[1]
    nlist = options.nlist or default_large_nlist(n)
    pq_m = options.pq_m or default_pq_m(dim)
    if dim % pq_m:
        raise ConfigError("CLIPSEARCH_LARGE_PQ_M", f"{pq_m} does not divide the dimension {dim}")
    try:
        check_trainable(n, nlist, options.pq_nbits)
    except ValueError as exc:
        raise ConfigError("CLIPSEARCH_INDEX_KIND", f"ivfpq-large: {exc}") from None
    size = training_sample_size(n, nlist, options.pq_nbits)
    picked = np.sort(np.random.default_rng(TRAIN_SEED).choice(n, size=size, replace=False))
    sample = np.asarray(staging[picked], dtype=np.float32)
    trained = train_template(
        index_dir,
        sample,
        nlist=nlist,
        pq_m=pq_m,
        pq_nbits=options.pq_nbits,
        model=model,
        corpus_count=n,
        use_gpu=use_gpu,
    )
    del sample
    key = ModelIdentity.from_dict(model).key
    return load_template(index_dir, trained.trained_id, model_key=key, dim=dim)


def _point_images(
    commit: GenerationCommit,
    staged_rows: list[tuple[ShardRow, np.ndarray]],
    placed: list[tuple[int, int, str]],
) -> None:
    """Point the staged shards' images at their new shards: one UPDATE per staged shard whose
    vectors all went to one new shard, else one per image."""
    if not placed:
        return
    firsts = np.array([first for first, _, _ in placed], dtype=np.int64)
    where = [shard for _, _, shard in placed]
    for row, ids in staged_rows:
        if not ids.size:
            continue
        target = np.searchsorted(firsts, ids, side="right") - 1
        if bool(np.all(target == target[0])):
            commit.move_shard_images.append((row.id, where[int(target[0])]))
        else:
            commit.reassign.extend(
                (int(i), where[int(t)]) for i, t in zip(ids, target, strict=True)
            )


def large_status(index_dir: Path, shards: list[ShardRow]) -> dict[str, Any] | None:
    """For `clipsearch status`: the template of the active large shards, how far the corpus has
    grown past what it was trained for, and whether a retrain is advised (None: no large shard)."""
    large = [row for row in shards if row.kind == LARGE_KIND]
    if not large:
        return None
    trained_id = str(_newest(large).params.get("trained_id"))
    report = LargeReport()
    try:
        info = read_template_info(index_dir, trained_id)
    except TrainedTemplateError as exc:
        return {"trained_id": trained_id, "problem": exc.problem}
    _advise(report, info, sum(row.count for row in large))
    keys = ("trained_id", "trained_on", "corpus_at_training", "nlist", "pq_m")
    status = {key: getattr(report, key) for key in keys}
    status.update(
        large_shards=len(large),
        large_vectors=report.large_vectors,
        growth=report.growth,
        retrain_advised=report.retrain_advised,
        advice=report.advice or None,
    )
    return status


def _advise(report: LargeReport, info: TemplateInfo, large_vectors: int) -> None:
    report.trained_id = info.trained_id
    report.trained_on = info.trained_on
    report.corpus_at_training = info.corpus_count
    report.nlist, report.pq_m = info.nlist, info.pq_m
    report.train_seconds = info.seconds if report.trained_now else 0.0
    report.large_vectors = large_vectors
    report.growth = round(large_vectors / max(info.corpus_count, 1), 3)
    report.retrain_advised = report.growth > RETRAIN_GROWTH
    if report.retrain_advised:
        report.advice = (
            f"the large shards hold {report.growth:.1f}x the {info.corpus_count} vectors their "
            f"template was trained for: retrain (`clipsearch compact --kind ivfpq-large "
            "--retrain`, a full rebuild) for shorter lists and a quantizer fitted to the corpus"
        )
