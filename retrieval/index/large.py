"""Large-corpus shards (`ivfpq-large`): filled from a trained template, grown without training.

A large shard is an ordinary shard directory (index.faiss, embeddings.npy, ids.npy, shard.json),
so serving, verification, marks and repair treat it as any other. What differs is how it is made:

- `fill_template` copies the template's empty trained index and adds vectors to its lists;
- `write_merged_shard` writes a NEW shard holding an existing large shard's vectors (less the
  tombstoned ones) plus new ones: the old index is read, its tombstoned ids removed, and the new
  vectors, encoded by a copy of the template, are merged into its inverted lists. Nothing is
  trained, and the quantizer and codebooks stay byte-identical. embeddings.npy is streamed from
  the old shard's file and the new rows in id order, so memory stays at the index's codes plus
  one block of vectors, whatever the shard's size. The old shard is never modified: `compact`
  retires it in the commit that makes the new one live.

Cost of one merge: read the old shard (index.faiss twice: hashed, then parsed; embeddings.npy
and ids.npy once, hashed as they are read) and write the new one, about (code bytes + 2*dim + 16)
bytes per vector each way; adding the new vectors costs one coarse assignment and one PQ encoding
each.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.errors import CorruptShard, TrainedTemplateError
from retrieval.index.integrity import unit_norm_misses
from retrieval.index.kinds import LARGE_KIND, IdArray
from retrieval.index.shard import (
    INDEX_FILE,
    F16Array,
    ShardManifest,
    iter_embedding_blocks,
    read_manifest,
    shard_path,
    write_shard_files,
)
from retrieval.index.trained import (
    ADD_BLOCK_ROWS,
    TemplateInfo,
    encode_with_template,
)

# The new vectors of a merge: ascending ids, and a reader of their float16 rows [start, stop).
RowReader = Callable[[int, int], F16Array]


def read_index_verified(index_dir: Path, shard_id: str, manifest: ShardManifest) -> faiss.Index:
    """A shard's index.faiss read into memory (to be added to), after checking its sha256."""
    path = shard_path(index_dir, shard_id) / INDEX_FILE
    entry = manifest.files[INDEX_FILE]
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as exc:
        raise CorruptShard(f"{path}: unreadable: {exc}", shard_id=shard_id) from exc
    if size != entry["bytes"] or digest != entry["sha256"]:
        raise CorruptShard(
            f"{path}: differs from shard.json",
            shard_id=shard_id,
            problem=f"{INDEX_FILE}: sha256 differs from shard.json",
        )
    try:
        return faiss.read_index(str(path))
    except Exception as exc:
        raise CorruptShard(f"{path}: unreadable ({exc})", shard_id=shard_id) from exc


def write_merged_shard(
    index_dir: Path,
    shard_id: str,
    *,
    template: faiss.IndexIVFPQ,
    info: TemplateInfo,
    model: dict[str, Any],
    base_id: str | None,
    drop_ids: IdArray,
    new_ids: IdArray,
    new_rows: RowReader,
    use_gpu: bool | None = None,
    rows_per_block: int = ADD_BLOCK_ROWS,
) -> ShardManifest:
    """Write shard `shard_id`: the large shard `base_id` (None: none) less `drop_ids`, plus the
    new vectors (`new_ids` ascending, their float16 rows read through `new_rows`).

    The base must have been filled from `template` (its trained_id); nothing is trained. The base
    is checked as it is read (index.faiss and ids.npy hashed before they are parsed,
    embeddings.npy hashed on the way and every row's norm checked): CorruptShard before
    shard.json is written, so a corrupt base never becomes a committed shard.
    """
    params = info.params()
    dim = info.dim
    new_ids = np.ascontiguousarray(new_ids, dtype=np.int64)
    if new_ids.size > 1 and not bool(np.all(new_ids[1:] > new_ids[:-1])):
        raise ValueError("new ids must be ascending and unique")
    drop = np.unique(np.asarray(drop_ids, dtype=np.int64))

    if base_id is not None:
        manifest = read_manifest(shard_path(index_dir, base_id))
        if manifest.shard_id != base_id:
            raise CorruptShard(f"shard.json of {base_id} names {manifest.shard_id}")
        if manifest.kind != LARGE_KIND or manifest.params.get("trained_id") != info.trained_id:
            raise TrainedTemplateError(
                info.trained_id,
                f"shard {base_id} ({manifest.kind}, template "
                f"{manifest.params.get('trained_id')}) was not filled from it",
            )
        if manifest.dim != dim:
            raise TrainedTemplateError(
                info.trained_id, f"shard {base_id} holds {manifest.dim}-d vectors, not {dim}-d"
            )
        index = read_index_verified(index_dir, base_id, manifest)
        if index.ntotal != manifest.count:
            raise CorruptShard(f"index.faiss of {base_id} holds {index.ntotal} vectors")
        base_blocks: Iterator[tuple[IdArray, F16Array]] = iter_embedding_blocks(
            index_dir, base_id, rows_per_block
        )
        # iter_embedding_blocks checked ids.npy against its sha256 before the first block.
        first = next(base_blocks, None)
        base_ids = _base_ids(index_dir, base_id, manifest.count)
        if drop.size:
            index.remove_ids(faiss.IDSelectorBatch(drop))
        kept_ids = base_ids[~_members(base_ids, drop)]
    else:
        index = faiss.clone_index(template)
        first = None
        base_blocks = iter(())
        kept_ids = np.zeros(0, dtype=np.int64)

    if new_ids.size:
        added = encode_with_template(template, new_ids, new_rows, use_gpu=use_gpu)
        index.merge_from(added, 0)
        del added
    ids = np.concatenate([kept_ids, new_ids])
    ids.sort(kind="stable")
    if ids.size > 1 and bool(np.any(ids[1:] == ids[:-1])):
        raise ValueError("a new id is already in the base shard")
    if index.ntotal != ids.size:
        raise CorruptShard(f"index.faiss of {base_id} holds ids its ids.npy lacks")

    def base_stream() -> Iterator[tuple[IdArray, F16Array]]:
        if first is not None:
            yield first
        yield from base_blocks

    blocks = _merged_blocks(base_stream(), drop, new_ids, new_rows, dim, rows_per_block)
    return write_shard_files(
        index_dir, shard_id, index=index, ids=ids, blocks=blocks, params=params, model=model
    )


def _base_ids(index_dir: Path, shard_id: str, n: int) -> IdArray:
    path = shard_path(index_dir, shard_id) / "ids.npy"
    ids = np.load(path, allow_pickle=False)
    if ids.shape != (n,) or ids.dtype != np.int64:
        raise CorruptShard(f"{path}: holds {ids.dtype}{ids.shape}, expected int64({n},)")
    return ids


def _members(ids: IdArray, sorted_set: IdArray) -> np.ndarray:
    if not sorted_set.size:
        return np.zeros(ids.size, dtype=bool)
    at = np.searchsorted(sorted_set, ids).clip(max=sorted_set.size - 1)
    return sorted_set[at] == ids


def _merged_blocks(
    base: Iterator[tuple[IdArray, F16Array]],
    drop: IdArray,
    new_ids: IdArray,
    new_rows: RowReader,
    dim: int,
    rows_per_block: int,
) -> Iterator[F16Array]:
    """The kept base rows and the new rows, merged in id order, one block at a time."""
    taken = 0
    for ids, vectors in base:
        keep = ~_members(ids, drop)
        ids, vectors = ids[keep], vectors[keep]
        _check_unit(vectors)
        if not ids.size:
            continue
        stop = int(np.searchsorted(new_ids, ids[-1], side="right"))
        if stop > taken:
            ids = np.concatenate([ids, new_ids[taken:stop]])
            vectors = np.concatenate([vectors, new_rows(taken, stop)])
            vectors = vectors[np.argsort(ids, kind="stable")]
            taken = stop
        yield vectors
    for start in range(taken, int(new_ids.size), rows_per_block):
        block = np.asarray(new_rows(start, min(start + rows_per_block, int(new_ids.size))))
        if block.shape[1:] != (dim,):
            raise ValueError(f"new rows of shape {block.shape}, expected (n, {dim})")
        yield block


def _check_unit(vectors: F16Array) -> None:
    _, bad = unit_norm_misses(vectors)
    if bad.any():
        raise CorruptShard(f"embeddings.npy holds {int(bad.sum())} vectors not of unit length")
