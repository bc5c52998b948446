"""One shard: its files on disk, how they are written durably, and how they are opened.

A shard is one directory, ``index_dir/shards/<shard_id>/``:

- ``index.faiss``: a FAISS index over L2-normalised vectors, inner-product metric, whose ids are
  catalog image ids (int64);
- ``embeddings.npy``: the same vectors as float16, rows in ascending id order;
- ``ids.npy``: the int64 ids, ascending and unique;
- ``shard.json``: written last. It records the model, the index kind and parameters, the count, and
  the size and sha256 of every other file.

Vectors are canonicalised through float16: the FAISS index is built from
``embeddings_f16.astype(float32)``, not from the caller's float32. A rebuild or compaction from
``embeddings.npy`` therefore gives bit-identical scores.

Crash safety: the metadata DB row is the commit point, not these files. ``write_shard`` fsyncs
every file, then ``shard.json``, then the directories, so a shard that a committed row points to is
complete on disk. A directory that a killed writer left behind has no row; it is an orphan that the
next job removes with ``remove_shard_dir``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np
import numpy.typing as npt

from retrieval.errors import CorruptShard
from retrieval.index.durable import (
    child_dirs,
    fsync_dir,
    fsync_file,
    remove_dir_manifest_first,
    sha256_of,
)
from retrieval.index.kinds import (
    ALL_KINDS,
    LARGE_KIND,
    IndexParams,
    build_index,
    resolve_params,
)
from retrieval.index.trained import fill_template

IdArray = npt.NDArray[np.int64]
F32Array = npt.NDArray[np.float32]
F16Array = npt.NDArray[np.float16]

FORMAT_VERSION = 1
SHARDS_DIR = "shards"
INDEX_FILE = "index.faiss"
EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.npy"
MANIFEST_FILE = "shard.json"
DATA_FILES = (INDEX_FILE, EMBEDDINGS_FILE, IDS_FILE)

_SHARD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def new_shard_id() -> str:
    """A fresh shard id: creation time (UTC, sortable) plus 8 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def sorted_unique_ids(ids: np.ndarray | Iterable[int] | None) -> IdArray:
    """Ids as a sorted, duplicate-free int64 array (empty for None)."""
    if ids is None:
        return np.empty(0, dtype=np.int64)
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError("ids must be integers")
    return np.unique(arr.astype(np.int64).ravel())


@dataclass(frozen=True)
class ShardManifest:
    """The contents of shard.json: what made the shard, and what its files must look like."""

    shard_id: str
    kind: str
    params: dict[str, Any]
    count: int
    dim: int
    model: dict[str, Any]
    created_at: str
    files: dict[str, dict[str, Any]]
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ShardManifest:
        """Parse shard.json; ValueError when it is not a valid version-1 manifest."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("shard.json is not a JSON object")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported format_version {data.get('format_version')!r}")
        expected = {f.name for f in fields(cls)}
        if set(data) != expected:
            raise ValueError(f"shard.json keys {sorted(data)} differ from {sorted(expected)}")
        manifest = cls(**data)
        checks = [
            isinstance(manifest.shard_id, str),
            manifest.kind in ALL_KINDS,
            isinstance(manifest.params, dict),
            _is_count(manifest.count),
            _is_count(manifest.dim) and manifest.dim > 0,
            isinstance(manifest.model, dict),
            isinstance(manifest.created_at, str),
            isinstance(manifest.files, dict),
        ]
        if not all(checks):
            raise ValueError("shard.json has a field of the wrong type")
        for name in DATA_FILES:
            entry = manifest.files.get(name)
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("sha256"), str)
                and _is_count(entry.get("bytes"))
            ):
                raise ValueError(f"shard.json lists no valid entry for {name}")
        if manifest.index_params().kind != manifest.kind:
            raise ValueError("shard.json kind differs from params.kind")
        return manifest

    def index_params(self) -> IndexParams:
        return IndexParams.from_dict(self.params)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def shard_path(index_dir: Path, shard_id: str) -> Path:
    """The directory of one shard; rejects ids that are not a plain file name."""
    if not _SHARD_ID.match(shard_id):
        raise ValueError(f"invalid shard id {shard_id!r}: use letters, digits, '.', '_', '-'")
    return Path(index_dir) / SHARDS_DIR / shard_id


def list_shard_dirs(index_dir: Path) -> list[str]:
    """Names of all shard directories, complete or not (orphans included), sorted."""
    return child_dirs(Path(index_dir) / SHARDS_DIR)


def remove_shard_dir(index_dir: Path, shard_id: str) -> bool:
    """Delete a shard directory (an orphan or a retired shard), shard.json first. False if it
    was already gone."""
    return remove_dir_manifest_first(shard_path(index_dir, shard_id), MANIFEST_FILE)


def write_shard(
    index_dir: Path,
    shard_id: str,
    *,
    ids: np.ndarray,
    embeddings: np.ndarray,
    params: IndexParams,
    model: dict[str, Any],
    use_gpu: bool | None = None,
) -> ShardManifest:
    """Build and durably write one shard; shard.json is written last.

    `embeddings` are L2-normalised float32 (n, d); `ids` need not be sorted, but must be unique.
    The shard directory must not exist yet. On return, every file and both directory entries are
    fsynced: the caller may now commit the DB row that makes the shard live.
    """
    shard_path(index_dir, shard_id)  # a bad id is refused before any work
    ids_sorted, emb16 = _canonical_rows(ids, embeddings)
    n, dim = emb16.shape
    model_json = json.loads(json.dumps(model))  # fails now, before any file exists
    if not isinstance(model_json, dict):
        raise ValueError("model must be a JSON object")

    resolved = resolve_params(params, n, dim)
    # The index is built from the float16 values that embeddings.npy keeps, so that a rebuild
    # from embeddings.npy scores bit-identically. Building before creating the directory means
    # a failed build leaves nothing on disk.
    x = emb16.astype(np.float32)
    index: faiss.Index
    if resolved.kind == LARGE_KIND:
        index = fill_template(
            index_dir, resolved, x, ids_sorted, model_key=model_json.get("key"), use_gpu=use_gpu
        )
    else:
        index = build_index(x, ids_sorted, resolved, use_gpu=use_gpu)
    del x
    return write_shard_files(
        index_dir,
        shard_id,
        index=index,
        ids=ids_sorted,
        blocks=[emb16],
        params=resolved,
        model=model_json,
    )


def write_shard_files(
    index_dir: Path,
    shard_id: str,
    *,
    index: faiss.Index,
    ids: IdArray,
    blocks: Iterable[np.ndarray],
    params: IndexParams,
    model: dict[str, Any],
) -> ShardManifest:
    """Durably write a shard whose index is built: its index, ids, and the float16 embeddings
    given as row blocks in id order (streamed to disk, so a shard larger than RAM can be
    written); shard.json is written last, after every other file and its hash.

    `ids` must be ascending and unique, and hold as many ids as the blocks hold rows and `index`
    holds vectors. The shard directory must not exist yet.
    """
    shard_dir = shard_path(index_dir, shard_id)
    n = int(ids.shape[0])
    dim = int(index.d)
    if index.ntotal != n:
        raise ValueError(f"the index holds {index.ntotal} vectors, the shard {n} ids")
    shards_root = shard_dir.parent
    created_root = not shards_root.exists()
    shards_root.mkdir(parents=True, exist_ok=True)
    shard_dir.mkdir()  # FileExistsError: never overwrite another shard, orphan or not

    faiss.write_index(index, str(shard_dir / INDEX_FILE))
    fsync_file(shard_dir / INDEX_FILE)
    written = _save_npy_blocks(shard_dir / EMBEDDINGS_FILE, blocks, (n, dim), np.float16)
    if written != n:
        raise ValueError(f"the embedding blocks hold {written} rows, the shard {n} ids")
    _save_npy(shard_dir / IDS_FILE, ids)
    files = {name: _file_entry(shard_dir / name) for name in DATA_FILES}

    manifest = ShardManifest(
        shard_id=shard_id,
        kind=params.kind,
        params=params.to_dict(),
        count=n,
        dim=dim,
        model=model,
        created_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        files=files,
    )
    with open(shard_dir / MANIFEST_FILE, "x", encoding="utf-8") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    # The new files' names live in the shard directory, the shard's name in shards/.
    fsync_dir(shard_dir)
    fsync_dir(shards_root)
    if created_root:
        fsync_dir(shards_root.parent)
    return manifest


def _save_npy_blocks(
    path: Path, blocks: Iterable[np.ndarray], shape: tuple[int, int], dtype: type
) -> int:
    """Write a .npy file of `shape` from row blocks (fsynced); returns the rows written."""
    rows = 0
    with open(path, "xb") as f:
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
            "shape": shape,
        }
        np.lib.format.write_array_header_1_0(f, header)
        for block in blocks:
            part: np.ndarray = np.ascontiguousarray(block, dtype=dtype)
            if part.ndim != 2 or part.shape[1] != shape[1] or rows + part.shape[0] > shape[0]:
                raise ValueError(f"an embedding block of shape {part.shape} does not fit {shape}")
            if part.size:
                f.write(part.data.cast("B"))
            rows += part.shape[0]
        f.flush()
        os.fsync(f.fileno())
    return rows


def _canonical_rows(ids: np.ndarray, embeddings: np.ndarray) -> tuple[IdArray, F16Array]:
    """Ids ascending and unique, with their rows as float16."""
    id_arr = np.asarray(ids)
    if id_arr.ndim != 1 or not np.issubdtype(id_arr.dtype, np.integer):
        raise ValueError("ids must be a 1-D integer array")
    id_arr = id_arr.astype(np.int64, copy=False)
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != id_arr.shape[0] or emb.shape[1] < 1:
        raise ValueError(f"embeddings must be (n, d) with n = len(ids); got {emb.shape}")
    if id_arr.size > 1 and not bool(np.all(id_arr[1:] > id_arr[:-1])):
        order = np.argsort(id_arr, kind="stable")
        id_arr, emb = id_arr[order], emb[order]
        if bool(np.any(id_arr[1:] == id_arr[:-1])):
            raise ValueError("ids must be unique")
    with np.errstate(over="ignore"):  # overflow becomes inf, refused just below
        emb16 = np.ascontiguousarray(emb.astype(np.float16))
    if not bool(np.isfinite(emb16).all()):
        raise ValueError("embeddings must be finite and within float16 range (L2-normalised)")
    return np.ascontiguousarray(id_arr), emb16


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "xb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _file_entry(path: Path) -> dict[str, Any]:
    # Hashing what is on disk (after fsync), not what we meant to write.
    return {"sha256": sha256_of(path), "bytes": path.stat().st_size}


def read_manifest(shard_dir: Path) -> ShardManifest:
    """Read shard.json; CorruptShard when it is missing (an unfinished write) or invalid."""
    path = Path(shard_dir) / MANIFEST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorruptShard(
            f"{shard_dir}: no {MANIFEST_FILE}; the shard was never completely written"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptShard(f"{path}: unreadable: {exc}") from exc
    try:
        return ShardManifest.from_json(text)
    except (ValueError, TypeError) as exc:
        raise CorruptShard(f"{path}: invalid: {exc}") from exc


def _checked_manifest(
    index_dir: Path, shard_id: str, *, verify: bool = False
) -> tuple[Path, ShardManifest]:
    """The shard's directory and manifest, after checking every data file's size (and sha256
    with `verify`); CorruptShard on any disagreement."""
    shard_dir = shard_path(index_dir, shard_id)
    manifest = read_manifest(shard_dir)
    if manifest.shard_id != shard_id:
        raise CorruptShard(f"{shard_dir}: shard.json names shard {manifest.shard_id!r}")
    for name in DATA_FILES:
        path = shard_dir / name
        entry = manifest.files[name]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CorruptShard(f"{path}: missing") from None
        if size != entry["bytes"]:
            raise CorruptShard(f"{path}: {size} bytes, shard.json says {entry['bytes']}")
        if verify and sha256_of(path) != entry["sha256"]:
            raise CorruptShard(f"{path}: sha256 differs from shard.json")
    return shard_dir, manifest


def read_npy_header(handle: BinaryIO, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The shape, Fortran flag and dtype of an open .npy file, leaving it at the first data byte.

    CorruptShard for any header that does not parse: numpy reads the header dict with Python's
    tokenizer and literal_eval, so a flipped byte can raise almost anything (ValueError,
    SyntaxError, tokenize.TokenError, ...).
    """
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except Exception as exc:
        raise CorruptShard(
            f"{path}: unreadable array header ({type(exc).__name__}: {exc})"
        ) from exc
    return tuple(int(n) for n in shape), bool(fortran), np.dtype(dtype)


def _open_array(
    path: Path, dtype: np.dtype | type, shape: tuple[int, ...]
) -> tuple[io.BufferedReader, int]:
    """Open a shard's .npy file, check its header against `dtype` and `shape`, and return the
    handle (at the first data byte) and the data offset; CorruptShard on any disagreement."""
    try:
        handle = open(path, "rb")  # noqa: SIM115  # returned to the caller
    except OSError as exc:
        raise CorruptShard(f"{path}: unreadable: {exc}") from exc
    try:
        found_shape, fortran, found_dtype = read_npy_header(handle, path)
        want = np.dtype(dtype)
        if found_dtype != want or found_shape != shape or fortran:
            raise CorruptShard(
                f"{path}: header says {found_dtype}{found_shape}"
                f"{' (Fortran order)' if fortran else ''}, expected {want}{shape}"
            )
        offset = handle.tell()
        data_bytes = os.fstat(handle.fileno()).st_size - offset
        expected_bytes = want.itemsize * int(np.prod(shape, dtype=np.int64))
        if data_bytes != expected_bytes:
            raise CorruptShard(
                f"{path}: holds {data_bytes} data bytes, its header needs {expected_bytes}"
            )
    except BaseException:
        handle.close()
        raise
    return handle, offset


def _load_ids(shard_dir: Path, n: int) -> IdArray:
    path = shard_dir / IDS_FILE
    handle, _ = _open_array(path, np.int64, (n,))
    with handle:
        ids = np.empty(n, dtype=np.int64)
        if n and handle.readinto(ids.data.cast("B")) != ids.nbytes:
            raise CorruptShard(f"{path}: ends early")
    if n > 1 and not bool(np.all(ids[1:] > ids[:-1])):
        raise CorruptShard(f"{path}: ids are not strictly ascending")
    return ids


def _map_embeddings(shard_dir: Path, n: int, dim: int) -> F16Array:
    """embeddings.npy memory-mapped, read-only, after checking its header."""
    path = shard_dir / EMBEDDINGS_FILE
    handle, offset = _open_array(path, np.float16, (n, dim))
    handle.close()
    if n == 0:
        return np.empty((0, dim), dtype=np.float16)  # an empty file region cannot be mapped
    try:
        return np.memmap(path, dtype=np.float16, mode="r", offset=offset, shape=(n, dim))
    except (OSError, ValueError) as exc:
        raise CorruptShard(f"{path}: cannot be mapped: {exc}") from exc


def iter_embedding_blocks(
    index_dir: Path, shard_id: str, rows_per_block: int
) -> Iterator[tuple[IdArray, F16Array]]:
    """A shard's ids and float16 vectors, `rows_per_block` rows at a time, in id order.

    The vectors are read from embeddings.npy with plain reads, not a memory map: mapped pages
    that were touched count as the process's resident memory until unmapped, so a pass over a
    million vectors would hold them all. Read this way, memory stays at one block.

    ids.npy is checked against its sha256 before the first block, and embeddings.npy is hashed as
    it is read: when it differs from its sha256, CorruptShard is raised in place of the last
    block, so a consumer that commits after the loop never commits what corrupt vectors made.
    """
    if rows_per_block < 1:
        raise ValueError("rows_per_block must be >= 1")
    shard_dir, manifest = _checked_manifest(index_dir, shard_id)
    n, dim = manifest.count, manifest.dim
    if sha256_of(shard_dir / IDS_FILE) != manifest.files[IDS_FILE]["sha256"]:
        raise CorruptShard(f"{shard_dir / IDS_FILE}: sha256 differs from shard.json")
    ids = _load_ids(shard_dir, n)
    path = shard_dir / EMBEDDINGS_FILE
    digest = hashlib.sha256()
    handle, offset = _open_array(path, np.float16, (n, dim))
    with handle:
        handle.seek(0)
        digest.update(handle.read(offset))
        for start in range(0, n, rows_per_block):
            stop = min(start + rows_per_block, n)
            block = np.empty((stop - start, dim), dtype=np.float16)
            if handle.readinto(block.data.cast("B")) != block.nbytes:
                raise CorruptShard(f"{path}: ends before row {stop}")
            digest.update(block.data.cast("B"))
            if stop == n:
                digest.update(handle.read())
                if digest.hexdigest() != manifest.files[EMBEDDINGS_FILE]["sha256"]:
                    raise CorruptShard(f"{path}: sha256 differs from shard.json")
            yield ids[start:stop], block
        if n == 0:
            digest.update(handle.read())
            if digest.hexdigest() != manifest.files[EMBEDDINGS_FILE]["sha256"]:
                raise CorruptShard(f"{path}: sha256 differs from shard.json")


def read_index_file(path: Path) -> faiss.Index:
    """Read index.faiss memory-mapped where this FAISS can, else into memory.

    FAISS >= 1.11's IO_FLAG_MMAP_IFC maps flat codes, HNSW storage and neighbour lists, and IVF
    array inverted lists (measured on 1.15.1: a 100 MB flat or IVF index costs < 4 MB of RSS; an
    HNSW one keeps its per-node levels and offsets in RAM). The legacy IO_FLAG_MMAP maps IVF lists
    only, and combined with IO_FLAG_MMAP_IFC it fails, so it is not used.

    CorruptShard when FAISS cannot read the file (it raises RuntimeError for a bad header, and
    MemoryError or others for sizes a flipped byte made absurd).
    """
    flag = getattr(faiss, "IO_FLAG_MMAP_IFC", None)
    if flag is not None:
        try:
            return faiss.read_index(str(path), flag | faiss.IO_FLAG_READ_ONLY)
        except Exception:
            pass  # an index type this FAISS cannot map, or a bad file: a plain read tells which
    try:
        return faiss.read_index(str(path))
    except Exception as exc:
        raise CorruptShard(f"{path}: unreadable ({type(exc).__name__}: {exc})") from exc


class Shard:
    """One opened shard: its manifest, ids, float16 embeddings (memory-mapped) and FAISS index."""

    def __init__(
        self,
        manifest: ShardManifest,
        ids: IdArray,
        embeddings: F16Array,
        index: faiss.Index,
    ) -> None:
        self.manifest = manifest
        self.ids = ids
        self.embeddings = embeddings
        self.index = index

    @property
    def shard_id(self) -> str:
        return self.manifest.shard_id

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def count(self) -> int:
        return self.manifest.count

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def __repr__(self) -> str:
        return f"Shard({self.shard_id!r}, kind={self.kind}, count={self.count}, dim={self.dim})"

    @classmethod
    def open(cls, index_dir: Path, shard_id: str, *, verify: bool = False) -> Shard:
        """Open a complete shard; CorruptShard if any file disagrees with shard.json.

        Sizes and counts are always checked; `verify=True` also checks every sha256, which reads
        every byte.
        """
        shard_dir, manifest = _checked_manifest(index_dir, shard_id, verify=verify)
        n, dim = manifest.count, manifest.dim
        ids = _load_ids(shard_dir, n)
        embeddings = _map_embeddings(shard_dir, n, dim)
        index = read_index_file(shard_dir / INDEX_FILE)
        if index.ntotal != n or index.d != dim or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise CorruptShard(
                f"{shard_dir / INDEX_FILE}: holds {index.ntotal} vectors of dimension {index.d}, "
                f"shard.json says {n} of dimension {dim} (inner product)"
            )
        return cls(manifest, ids, embeddings, index)

    def positions(self, ids: np.ndarray) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.intp]]:
        """For each requested id: whether this shard holds it, and its row (valid where held)."""
        wanted = np.asarray(ids, dtype=np.int64)
        rows = np.searchsorted(self.ids, wanted)
        found = rows < self.count
        found[found] = self.ids[rows[found]] == wanted[found]
        return found, rows

    def vectors(self, ids: np.ndarray) -> tuple[IdArray, F32Array]:
        """The stored vectors of the requested ids that this shard holds, in request order."""
        wanted = np.asarray(ids, dtype=np.int64).ravel()
        found, rows = self.positions(wanted)
        return wanted[found], self.rows_f32(rows[found])

    def rows_f32(self, rows: np.ndarray) -> F32Array:
        """Rows of embeddings.npy as float32 (reads them from the memory map)."""
        return np.asarray(self.embeddings[rows], dtype=np.float32).reshape(-1, self.dim)


def iter_live_vectors(
    shards: Iterable[Shard], deleted_ids: np.ndarray | None = None
) -> Iterator[tuple[IdArray, F16Array]]:
    """Per shard, the ids and float16 vectors that are not tombstoned (for compaction).

    A shard with no tombstones yields its arrays as they are (the embeddings memory-mapped, read
    lazily); otherwise the live rows are copied.
    """
    deleted = sorted_unique_ids(deleted_ids)
    for shard in shards:
        dead, _ = shard.positions(deleted)
        if not dead.any():
            yield shard.ids, shard.embeddings
            continue
        live = np.ones(shard.count, dtype=bool)
        _, rows = shard.positions(deleted[dead])
        live[rows] = False
        yield shard.ids[live], np.asarray(shard.embeddings[live])
