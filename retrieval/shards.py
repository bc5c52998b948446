"""FAISS shard files on disk, and the set of shards that a search fans out to.

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
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from retrieval.errors import CorruptShard, EmptyIndex, ModelMismatch
from retrieval.faiss_gpu import DevicePlacement, gpu_available

IdArray = npt.NDArray[np.int64]
F32Array = npt.NDArray[np.float32]
F16Array = npt.NDArray[np.float16]

FORMAT_VERSION = 1
INDEX_KINDS = ("flat", "hnsw", "ivf", "ivfpq")
SHARDS_DIR = "shards"
INDEX_FILE = "index.faiss"
EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.npy"
MANIFEST_FILE = "shard.json"
DATA_FILES = (INDEX_FILE, EMBEDDINGS_FILE, IDS_FILE)

# "auto" keeps exact search below this many vectors: a flat scan of 50k CLIP vectors takes a few
# milliseconds, and an approximate index would only lose recall.
AUTO_FLAT_BELOW = 50_000
DEFAULT_MEMORY_BUDGET_BYTES = 4 * 2**30
# FAISS warns below 39 training points per k-means centroid; under that the centroids are noise.
MIN_POINTS_PER_CENTROID = 39
# Fewer lists than this is not worth an IVF: a flat scan is as fast and exact.
MIN_NLIST = 16
# FAISS itself caps k-means at 256 points per centroid; sampling more is wasted work.
MAX_POINTS_PER_CENTROID = 256
TRAIN_SEED = 1234

log = logging.getLogger("clipsearch.shards")

_SHARD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# --------------------------------------------------------------------------------------------
# Index parameters


@dataclass(frozen=True)
class IndexParams:
    """What `build_index` builds. `choose_params` fills in the values left as None."""

    kind: str
    hnsw_m: int = 32
    # bench/ann_recall.py, 100k clustered vectors, d=512, efSearch 128, 2 shared cores:
    # efConstruction 40 -> recall@10 0.996, build 30 s; 64 -> 1.000, 36 s; 80 -> 1.000, 61 s.
    # 64 is the cheapest value that measured no recall loss.
    hnsw_ef_construction: int = 64
    nlist: int | None = None
    pq_m: int | None = None
    pq_nbits: int = 8

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, not {self.kind!r}")
        if self.hnsw_m < 2 or self.hnsw_ef_construction < 1:
            raise ValueError("hnsw_m must be >= 2 and hnsw_ef_construction >= 1")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError("nlist must be >= 1")
        if self.pq_m is not None and self.pq_m < 1:
            raise ValueError("pq_m must be >= 1")
        if not 1 <= self.pq_nbits <= 16:
            raise ValueError("pq_nbits must be between 1 and 16")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IndexParams:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown index parameters: {sorted(unknown)}")
        return cls(**dict(data))


def hnsw_memory_bytes(n: int, dim: int, m: int = 32) -> int:
    """Approximate RAM of an HNSW-Flat index: float32 vectors plus the graph.

    Per vector: 4*dim bytes of vector, 2*m level-0 neighbours and on average about one upper-level
    neighbour (int32 each), its level (int32), its neighbour offset (int64) and its id (int64).
    """
    return n * (4 * dim + 4 * (2 * m + 1) + 4 + 8 + 8)


def default_nlist(n: int) -> int:
    """4*sqrt(n): the low end of the usual 4..16*sqrt(n), so the default nprobe covers more."""
    return max(1, round(4 * math.sqrt(n)))


def default_pq_m(dim: int) -> int:
    """About dim/8 sub-quantisers (8 bytes of code per 64 dimensions), a divisor of dim."""
    target = max(1, dim // 8)
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    return min(divisors, key=lambda m: (abs(m - target), m))


def choose_params(
    kind: str, n: int, dim: int, *, memory_budget_bytes: int | None = None
) -> IndexParams:
    """Index parameters for a shard of `n` vectors of dimension `dim`.

    `kind="auto"` picks, as autofaiss does:
    - `flat` below 50,000 vectors (exact, and fast enough);
    - else `hnsw` (HNSW32) when `hnsw_memory_bytes(n, dim)` fits the budget (default 4 GiB);
    - else `ivfpq`, whose codes take dim/8 bytes per vector.
    Any kind is then completed for `n` (see `resolve_params`); a shard too small for an IVF
    falls back to a smaller kind, and the returned `kind` is the one that will be built.
    """
    if kind == "auto":
        budget = DEFAULT_MEMORY_BUDGET_BYTES if memory_budget_bytes is None else memory_budget_bytes
        if n < AUTO_FLAT_BELOW:
            kind = "flat"
        elif hnsw_memory_bytes(n, dim) <= budget:
            kind = "hnsw"
        else:
            kind = "ivfpq"
    return resolve_params(IndexParams(kind=kind), n, dim)


def resolve_params(params: IndexParams, n: int, dim: int) -> IndexParams:
    """Fill in nlist/pq_m for `n` vectors, and degrade kinds that `n` cannot train.

    - IVF kinds need at least 39 training points per list and at least 16 lists; below 16*39 = 624
      vectors they become `flat`. An explicit nlist above n/39 is lowered to n/39.
    - `ivfpq` needs 39 points per PQ centroid (2**pq_nbits of them); below that, PQ's memory saving
      is irrelevant anyway and the shard becomes `ivf`.
    """
    if n < 0 or dim < 1:
        raise ValueError(f"bad shard shape: n={n}, dim={dim}")
    if params.kind == "flat":
        return IndexParams(kind="flat")
    if params.kind == "hnsw":
        return replace(params, nlist=None, pq_m=None)
    max_lists = n // MIN_POINTS_PER_CENTROID
    if max_lists < MIN_NLIST:
        return IndexParams(kind="flat")
    nlist = min(params.nlist if params.nlist is not None else default_nlist(n), max_lists)
    nlist = max(nlist, MIN_NLIST)
    if params.kind == "ivf" or n < MIN_POINTS_PER_CENTROID * 2**params.pq_nbits:
        return replace(params, kind="ivf", nlist=nlist, pq_m=None)
    pq_m = params.pq_m if params.pq_m is not None else default_pq_m(dim)
    if dim % pq_m:
        raise ValueError(f"pq_m={pq_m} must divide the dimension {dim}")
    return replace(params, nlist=nlist, pq_m=pq_m)


# --------------------------------------------------------------------------------------------
# Building


def build_index(
    vectors: np.ndarray, ids: np.ndarray, params: IndexParams, *, use_gpu: bool | None = None
) -> faiss.Index:
    """Build a trained, filled inner-product index whose labels are `ids`.

    `params` goes through `resolve_params` first, so a tiny `n` with an IVF kind gives a flat
    index; call `resolve_params` yourself to learn which kind that is. `n == 0` gives an empty
    flat index. `use_gpu=None` uses a GPU when one is available; HNSW is always built on the CPU.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    labels = np.ascontiguousarray(ids, dtype=np.int64)
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise ValueError(f"vectors must be (n, d) and ids (n,); got {x.shape} and {labels.shape}")
    n, dim = x.shape
    params = resolve_params(params, n, dim)
    if use_gpu and not gpu_available():
        raise RuntimeError("use_gpu=True, but this FAISS build has no GPU support or sees no GPU")
    gpu = gpu_available() if use_gpu is None else use_gpu

    if params.kind == "flat":
        # A flat index needs no training; copying it to a GPU and back would only add transfers.
        index: faiss.Index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
        index.add_with_ids(x, labels)
        return index
    if params.kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = params.hnsw_ef_construction
        # HNSW cannot store arbitrary ids itself; IndexIDMap maps its 0..n-1 positions to ids.
        index = faiss.IndexIDMap(hnsw)
        index.add_with_ids(x, labels)
        return index

    assert params.nlist is not None
    quantizer = faiss.IndexFlatIP(dim)
    ivf: faiss.IndexIVF
    if params.kind == "ivf":
        ivf = faiss.IndexIVFFlat(quantizer, dim, params.nlist, faiss.METRIC_INNER_PRODUCT)
        sample_cap = MAX_POINTS_PER_CENTROID * params.nlist
    else:
        assert params.pq_m is not None
        ivf = faiss.IndexIVFPQ(
            quantizer, dim, params.nlist, params.pq_m, params.pq_nbits, faiss.METRIC_INNER_PRODUCT
        )
        # The PQ codebooks want their own 256 points per centroid, whatever nlist is.
        sample_cap = MAX_POINTS_PER_CENTROID * max(params.nlist, 2**params.pq_nbits)
    # FAISS already defaults to these for an inner-product IVF; stated because they matter:
    # spherical k-means keeps centroids unit-norm, else inner-product assignment favours the
    # centroids of tight clusters (larger norm); a fixed seed makes the build reproducible.
    ivf.cp.spherical = True
    ivf.cp.seed = TRAIN_SEED
    sample = _training_sample(x, sample_cap)

    if gpu:
        built = _train_and_add_on_gpu(ivf, sample, x, labels, float16=params.kind == "ivfpq")
        if built is not None:
            return built
        if use_gpu:
            raise RuntimeError(f"FAISS cannot build this {params.kind} index on the GPU")
    ivf.train(sample)
    ivf.add_with_ids(x, labels)
    return ivf


def _training_sample(x: F32Array, cap: int) -> F32Array:
    if x.shape[0] <= cap:
        return x
    rng = np.random.default_rng(TRAIN_SEED)
    # Sorted rows: the same sample, read in memory order.
    rows = np.sort(rng.choice(x.shape[0], size=cap, replace=False))
    return np.ascontiguousarray(x[rows])


def _train_and_add_on_gpu(
    cpu_index: faiss.IndexIVF, sample: F32Array, x: F32Array, labels: IdArray, *, float16: bool
) -> faiss.Index | None:
    """Train and fill an IVF index on GPU 0 and return its CPU copy, or None if cloning fails."""
    resources = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    # For IVF-PQ this means float16 lookup tables, needed for many sub-quantisers to fit in
    # shared memory; it affects GPU search only, not the trained codebooks or the codes.
    options.useFloat16 = float16
    try:
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, cpu_index, options)
    except RuntimeError:
        # The GPU IVF-PQ kernels support only some (pq_m, dim/pq_m) layouts.
        return None
    gpu_index.train(sample)
    gpu_index.add_with_ids(x, labels)
    return faiss.index_gpu_to_cpu(gpu_index)


# --------------------------------------------------------------------------------------------
# Files on disk


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
            manifest.kind in INDEX_KINDS,
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
    root = Path(index_dir) / SHARDS_DIR
    if not root.is_dir():
        return []
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir())


def remove_shard_dir(index_dir: Path, shard_id: str) -> bool:
    """Delete a shard directory (an orphan or a retired shard). False if it was already gone."""
    path = shard_path(index_dir, shard_id)
    if not path.exists():
        return False
    # shard.json goes first and durably: a removal cut short then leaves a directory that reads
    # as incomplete (an orphan, deleted again next time), never as a shard with missing files.
    try:
        (path / MANIFEST_FILE).unlink()
    except FileNotFoundError:
        pass
    else:
        _fsync_dir(path)
    shutil.rmtree(path)
    _fsync_dir(path.parent)
    return True


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
    shard_dir = shard_path(index_dir, shard_id)
    ids_sorted, emb16 = _canonical_rows(ids, embeddings)
    n, dim = emb16.shape
    model_json = json.loads(json.dumps(model))  # fails now, before any file exists
    if not isinstance(model_json, dict):
        raise ValueError("model must be a JSON object")

    resolved = resolve_params(params, n, dim)
    # The index is built from the float16 values that embeddings.npy keeps, so that a rebuild
    # from embeddings.npy scores bit-identically. Building before creating the directory means
    # a failed build leaves nothing on disk.
    index = build_index(emb16.astype(np.float32), ids_sorted, resolved, use_gpu=use_gpu)

    shards_root = shard_dir.parent
    created_root = not shards_root.exists()
    shards_root.mkdir(parents=True, exist_ok=True)
    shard_dir.mkdir()  # FileExistsError: never overwrite another shard, orphan or not

    faiss.write_index(index, str(shard_dir / INDEX_FILE))
    _fsync_file(shard_dir / INDEX_FILE)
    _save_npy(shard_dir / EMBEDDINGS_FILE, emb16)
    _save_npy(shard_dir / IDS_FILE, ids_sorted)
    files = {name: _file_entry(shard_dir / name) for name in DATA_FILES}

    manifest = ShardManifest(
        shard_id=shard_id,
        kind=resolved.kind,
        params=resolved.to_dict(),
        count=n,
        dim=dim,
        model=model_json,
        created_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        files=files,
    )
    with open(shard_dir / MANIFEST_FILE, "x", encoding="utf-8") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    # The new files' names live in the shard directory, the shard's name in shards/.
    _fsync_dir(shard_dir)
    _fsync_dir(shards_root)
    if created_root:
        _fsync_dir(shards_root.parent)
    return manifest


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


def _fsync_file(path: Path) -> None:
    # FAISS writes through its own FILE*; fsync on a second descriptor flushes the same inode.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_entry(path: Path) -> dict[str, Any]:
    # Hashing what is on disk (after fsync), not what we meant to write.
    return {"sha256": _sha256(path), "bytes": path.stat().st_size}


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
        if verify and _sha256(path) != entry["sha256"]:
            raise CorruptShard(f"{path}: sha256 differs from shard.json")
    return shard_dir, manifest


def _load_ids(shard_dir: Path, n: int) -> IdArray:
    try:
        ids = np.load(shard_dir / IDS_FILE, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CorruptShard(f"{shard_dir}: unreadable array: {exc}") from exc
    if ids.dtype != np.int64 or ids.shape != (n,):
        raise CorruptShard(f"{shard_dir}: ids.npy is {ids.dtype}{ids.shape}, expected ({n},)")
    if n > 1 and not bool(np.all(ids[1:] > ids[:-1])):
        raise CorruptShard(f"{shard_dir}: ids.npy is not strictly ascending")
    return ids


def iter_embedding_blocks(
    index_dir: Path, shard_id: str, rows_per_block: int
) -> Iterator[tuple[IdArray, F16Array]]:
    """A shard's ids and float16 vectors, `rows_per_block` rows at a time, in id order.

    The vectors are read from embeddings.npy with plain reads, not a memory map: mapped pages
    that were touched count as the process's resident memory until unmapped, so a pass over a
    million vectors would hold them all. Read this way, memory stays at one block.
    """
    if rows_per_block < 1:
        raise ValueError("rows_per_block must be >= 1")
    shard_dir, manifest = _checked_manifest(index_dir, shard_id)
    n, dim = manifest.count, manifest.dim
    ids = _load_ids(shard_dir, n)
    path = shard_dir / EMBEDDINGS_FILE
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        except ValueError as exc:
            raise CorruptShard(f"{path}: unreadable array: {exc}") from exc
        if dtype != np.float16 or tuple(shape) != (n, dim) or fortran:
            raise CorruptShard(f"{path}: is {dtype}{tuple(shape)}, expected float16({n}, {dim})")
        for start in range(0, n, rows_per_block):
            stop = min(start + rows_per_block, n)
            block = np.empty((stop - start, dim), dtype=np.float16)
            if handle.readinto(block.data.cast("B")) != block.nbytes:
                raise CorruptShard(f"{path}: ends before row {stop}")
            yield ids[start:stop], block


def read_index_file(path: Path) -> faiss.Index:
    """Read index.faiss memory-mapped where this FAISS can, else into memory.

    FAISS >= 1.11's IO_FLAG_MMAP_IFC maps flat codes, HNSW storage and neighbour lists, and IVF
    array inverted lists (measured on 1.15.1: a 100 MB flat or IVF index costs < 4 MB of RSS; an
    HNSW one keeps its per-node levels and offsets in RAM). The legacy IO_FLAG_MMAP maps IVF lists
    only, and combined with IO_FLAG_MMAP_IFC it fails, so it is not used.
    """
    flag = getattr(faiss, "IO_FLAG_MMAP_IFC", None)
    if flag is not None:
        try:
            return faiss.read_index(str(path), flag | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            pass  # an index type this FAISS cannot map: fall through to a plain read
    return faiss.read_index(str(path))


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
        try:
            embeddings = np.load(shard_dir / EMBEDDINGS_FILE, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise CorruptShard(f"{shard_dir}: unreadable array: {exc}") from exc
        if embeddings.dtype != np.float16 or embeddings.shape != (n, dim):
            raise CorruptShard(
                f"{shard_dir}: embeddings.npy is {embeddings.dtype}{embeddings.shape}, "
                f"expected float16({n}, {dim})"
            )
        try:
            index = read_index_file(shard_dir / INDEX_FILE)
        except RuntimeError as exc:
            raise CorruptShard(f"{shard_dir / INDEX_FILE}: unreadable: {exc}") from exc
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
    deleted = _sorted_unique_ids(deleted_ids)
    for shard in shards:
        dead, _ = shard.positions(deleted)
        if not dead.any():
            yield shard.ids, shard.embeddings
            continue
        live = np.ones(shard.count, dtype=bool)
        _, rows = shard.positions(deleted[dead])
        live[rows] = False
        yield shard.ids[live], np.asarray(shard.embeddings[live])


# --------------------------------------------------------------------------------------------
# Searching


def _sorted_unique_ids(ids: np.ndarray | Iterable[int] | None) -> IdArray:
    if ids is None:
        return np.empty(0, dtype=np.int64)
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError("ids must be integers")
    return np.unique(arr.astype(np.int64).ravel())


# Bitmap selectors are 30x faster to build than IDSelectorBatch's hash set (1M ids: 6 ms vs
# 206 ms) and as fast to query; use one whenever it is no larger than the id array itself.
_BITMAP_MIN_BYTES = 1 << 20


def _id_selector(ids: IdArray) -> faiss.IDSelector:
    """A selector accepting exactly `ids` (sorted, unique, non-empty)."""
    top = int(ids[-1])
    nbytes = (top >> 3) + 1
    if int(ids[0]) >= 0 and nbytes <= max(_BITMAP_MIN_BYTES, 8 * ids.size):
        mask = np.zeros(top + 1, dtype=bool)
        mask[ids] = True
        bitmap = np.packbits(mask, bitorder="little")
        # The one-argument form makes the Python object keep `bitmap` alive; FAISS holds only a
        # pointer to it.
        return faiss.IDSelectorBitmap(bitmap)  # type: ignore[call-arg, arg-type]  # stub lacks it
    return faiss.IDSelectorBatch(ids)  # copies the ids into a hash set


@dataclass
class _ShardState:
    """A shard plus what the set's tombstones mean for it, computed once per set."""

    shard: Shard
    deleted_rows: npt.NDArray[np.intp]
    deleted_ids: IdArray  # the ids of deleted_rows, ascending
    # Accepts every id but the deleted ones; None when nothing is deleted. Shared by concurrent
    # searches, which is safe: is_member is const.
    live_selector: faiss.IDSelector | None
    # Python references that the FAISS selector above only points to.
    keepalive: tuple[Any, ...]
    # The shard's index copied to a GPU (searched without selectors), or None.
    device_index: faiss.Index | None = None

    @property
    def live_count(self) -> int:
        return self.shard.count - int(self.deleted_rows.size)

    def live_rows(self) -> npt.NDArray[np.intp]:
        live = np.ones(self.shard.count, dtype=bool)
        live[self.deleted_rows] = False
        return np.flatnonzero(live)

    def allowed_rows(self, allowed: IdArray) -> npt.NDArray[np.intp]:
        """Sorted rows of the allowed (sorted, unique) ids that this shard holds and are live."""
        found, rows = self.shard.positions(allowed)
        rows = rows[found]
        if self.deleted_rows.size:
            at = np.searchsorted(self.deleted_rows, rows)
            hit = at < self.deleted_rows.size
            hit[hit] = self.deleted_rows[at[hit]] == rows[hit]
            rows = rows[~hit]
        return rows


@dataclass(frozen=True)
class _Query:
    vectors: F32Array
    k: int
    allowed: IdArray | None
    ef_search: int
    nprobe: int
    refine_factor: int


class ShardSet:
    """The shards of one index generation, searched together.

    Tombstoned ids are never returned. With `allowed_ids`, only those ids are returned, and each
    shard's contribution is the exact top-k among them when its allowed live set is small (under
    `exact_fraction` of the shard, or under `exact_below` vectors): then the scores come from a
    brute-force product with the stored embeddings, because HNSW or IVF with a very selective
    IDSelector can miss neighbours or return fewer than k. Larger allowed sets go through FAISS
    with an IDSelector; flat shards are exact either way. In every case a shard that returns
    fewer results than it has allowed live vectors is completed by brute force, so a search never
    returns fewer than min(k, allowed live ids) results.

    With a `gpu` placement, flat and IVF shards are copied to the GPU once, and unfiltered
    searches run there: a GPU index ignores selectors, so it is asked for k plus the shard's
    tombstone count and the tombstoned ids are dropped afterwards (see retrieval/faiss_gpu.py).
    Filtered searches, and searches that would need more than the GPU's 2048 results, use the CPU.
    """

    def __init__(
        self,
        shards: list[Shard],
        *,
        deleted_ids: np.ndarray | None = None,
        threads: int | None = None,
        exact_below: int = 20_000,
        exact_fraction: float = 0.05,
        gpu: DevicePlacement | None = None,
    ) -> None:
        self._shards = list(shards)
        dims = {s.dim for s in self._shards}
        if len(dims) > 1:
            raise ValueError(f"shards of different dimensions in one set: {sorted(dims)}")
        # The model key identifies the weights; the same model loaded from another path
        # (a moved checkpoint) writes a different "pretrained" but the same key.
        models = {
            str(s.manifest.model.get("key"))
            if s.manifest.model.get("key")
            else json.dumps(s.manifest.model, sort_keys=True)
            for s in self._shards
        }
        if len(models) > 1:
            first, *others = sorted(models)
            raise ModelMismatch(first, others[0])
        all_ids = np.concatenate([s.ids for s in self._shards]) if self._shards else np.empty(0)
        if all_ids.size and np.unique(all_ids).size != all_ids.size:
            # Merging would return an image twice; the catalog keeps each id in one live shard.
            raise ValueError("an id appears in more than one shard of the set")

        self._deleted = _sorted_unique_ids(deleted_ids)
        self._gpu = gpu
        self._states = [self._state_for(shard) for shard in self._shards]
        self.exact_below = exact_below
        self.exact_fraction = exact_fraction
        workers = threads if threads is not None else min(len(self._shards), os.cpu_count() or 1)
        # FAISS releases the GIL while it searches, and so does numpy's matmul: threads give real
        # parallelism across shards. One shard, or one thread, searches inline.
        self._pool = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard-search")
            if workers > 1 and len(self._shards) > 1
            else None
        )
        self._closed = False

    def _state_for(self, shard: Shard) -> _ShardState:
        held, rows = shard.positions(self._deleted)
        deleted_rows = np.sort(rows[held])
        deleted_ids = shard.ids[deleted_rows]
        device_index = None
        if self._gpu is not None and shard.count > deleted_rows.size:
            device_index = self._gpu.place(shard.shard_id, shard.kind, shard.index)
        if not deleted_rows.size:
            return _ShardState(shard, deleted_rows, deleted_ids, None, (), device_index)
        inner = _id_selector(deleted_ids)
        return _ShardState(
            shard, deleted_rows, deleted_ids, faiss.IDSelectorNot(inner), (inner,), device_index
        )

    @property
    def device_shards(self) -> list[str]:
        """Ids of the shards whose unfiltered searches run on the GPU."""
        return [s.shard.shard_id for s in self._states if s.device_index is not None]

    @classmethod
    def open(
        cls,
        index_dir: Path,
        shard_ids: list[str],
        *,
        deleted_ids: np.ndarray | None = None,
        verify: bool = False,
        threads: int | None = None,
        gpu: DevicePlacement | None = None,
    ) -> ShardSet:
        shards = [Shard.open(index_dir, shard_id, verify=verify) for shard_id in shard_ids]
        return cls(shards, deleted_ids=deleted_ids, threads=threads, gpu=gpu)

    @property
    def shards(self) -> list[Shard]:
        return list(self._shards)

    @property
    def count(self) -> int:
        """Vectors in all shards, tombstoned ones included."""
        return sum(s.count for s in self._shards)

    @property
    def live_count(self) -> int:
        return sum(state.live_count for state in self._states)

    @property
    def dim(self) -> int:
        """The vector dimension; EmptyIndex for a set with no shards (it has none)."""
        if not self._shards:
            raise EmptyIndex("the index has no shards yet")
        return self._shards[0].dim

    def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> ShardSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        allowed_ids: np.ndarray | None = None,
        ef_search: int = 128,
        nprobe: int = 32,
        refine_factor: int = 4,
    ) -> tuple[F32Array, IdArray]:
        """Top-k scores (float32) and ids (int64), shape (q, k), best first.

        Rows with fewer than k results are padded with -inf and -1; an empty set, or a filter
        that matches nothing, gives all padding rather than EmptyIndex, so a caller shows "no
        results" without a special case. IVF-PQ candidates (refine_factor * k per shard) are
        re-scored exactly from the stored embeddings, so every kind returns exact scores.
        """
        if self._closed:
            raise RuntimeError("search on a closed ShardSet")
        if k < 1:
            raise ValueError("k must be >= 1")
        if ef_search < 1 or nprobe < 1 or refine_factor < 1:
            raise ValueError("ef_search, nprobe and refine_factor must be >= 1")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2:
            raise ValueError(f"queries must be (q, d); got shape {q.shape}")
        if self._shards and q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index {self.dim}")
        allowed = None if allowed_ids is None else _sorted_unique_ids(allowed_ids)
        query = _Query(q, k, allowed, ef_search, nprobe, refine_factor)

        states = [s for s in self._states if s.live_count > 0]
        if self._pool is None or len(states) <= 1:
            parts = [self._search_shard(state, query) for state in states]
        else:
            parts = list(self._pool.map(lambda state: self._search_shard(state, query), states))
        if not parts:
            return _padding(q.shape[0], k)
        scores = np.concatenate([p[0] for p in parts], axis=1)
        labels = np.concatenate([p[1] for p in parts], axis=1)
        return _top_k(scores, labels, k)

    def _search_shard(self, state: _ShardState, query: _Query) -> tuple[F32Array, IdArray]:
        shard = state.shard
        nq, k = query.vectors.shape[0], query.k
        rows: npt.NDArray[np.intp] | None = None  # the candidate rows, None meaning all live
        if query.allowed is None:
            candidates = state.live_count
        else:
            rows = state.allowed_rows(query.allowed)
            candidates = int(rows.size)
        if candidates == 0:
            return _padding(nq, k)

        small = candidates < self.exact_fraction * shard.count or (
            query.allowed is not None and candidates < self.exact_below
        )
        if small:
            return _exact_top_k(shard, query.vectors, self._rows_or_live(state, rows), k)

        on_device = None
        if query.allowed is None and state.device_index is not None and self._gpu is not None:
            on_device = _device_search(state, query, self._gpu)
        if on_device is not None:
            scores, labels = on_device
        else:
            if query.allowed is not None:
                assert rows is not None
                selector: faiss.IDSelector | None = _id_selector(shard.ids[rows])
            else:
                selector = state.live_selector
            scores, labels = _faiss_search(shard, query, selector)

        # Never fewer results than exist: HNSW with a filter, or IVF whose probed lists hold
        # fewer than k allowed vectors, can come back short. Those rows are redone exactly.
        short = np.count_nonzero(labels >= 0, axis=1) < min(k, candidates)
        if short.any():
            exact_scores, exact_labels = _exact_top_k(
                shard, query.vectors[short], self._rows_or_live(state, rows), k
            )
            scores[short], labels[short] = exact_scores, exact_labels
        return scores, labels

    @staticmethod
    def _rows_or_live(state: _ShardState, rows: npt.NDArray[np.intp] | None) -> np.ndarray | None:
        if rows is not None:
            return rows
        return state.live_rows() if state.deleted_rows.size else None

    def vectors(self, ids: np.ndarray) -> tuple[IdArray, F32Array]:
        """Stored vectors (float32) of the requested live ids, in request order; others omitted."""
        wanted = np.asarray(ids, dtype=np.int64).ravel()
        dim = self._shards[0].dim if self._shards else 0
        out = np.zeros((wanted.size, dim), dtype=np.float32)
        done = np.zeros(wanted.size, dtype=bool)
        if self._deleted.size:
            at = np.searchsorted(self._deleted, wanted).clip(max=self._deleted.size - 1)
            done = self._deleted[at] == wanted  # tombstoned: treated as absent
        tombstoned = done.copy()
        for shard in self._shards:
            found, rows = shard.positions(wanted)
            found &= ~done
            if found.any():
                out[found] = shard.rows_f32(rows[found])
                done |= found
        hit = done & ~tombstoned
        return wanted[hit], out[hit]


def _padding(nq: int, k: int) -> tuple[F32Array, IdArray]:
    return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)


def _top_k(scores: np.ndarray, labels: np.ndarray, k: int) -> tuple[F32Array, IdArray]:
    """Best k per row (descending score), padded with -inf / -1 to exactly k columns."""
    nq, width = scores.shape
    if width > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, part, axis=1)
        labels = np.take_along_axis(labels, part, axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")
    scores = np.take_along_axis(scores, order, axis=1).astype(np.float32, copy=False)
    labels = np.take_along_axis(labels, order, axis=1).astype(np.int64, copy=False)
    if scores.shape[1] < k:
        pad_s, pad_l = _padding(nq, k - scores.shape[1])
        scores = np.concatenate([scores, pad_s], axis=1)
        labels = np.concatenate([labels, pad_l], axis=1)
    return scores, labels


# Rows per brute-force block: bounds the float32 copy of the embeddings at about 32 MiB.
_EXACT_BLOCK_BYTES = 32 * 2**20


def _exact_top_k(
    shard: Shard, q: F32Array, rows: np.ndarray | None, k: int
) -> tuple[F32Array, IdArray]:
    """Exact top-k of `q` against the stored embeddings of `rows` (None: all rows)."""
    total = shard.count if rows is None else int(rows.size)
    block = max(1024, _EXACT_BLOCK_BYTES // (4 * shard.dim))
    best_s, best_l = _padding(q.shape[0], 0)
    for start in range(0, total, block):
        if rows is None:
            chunk_rows: np.ndarray = np.arange(start, min(start + block, total))
        else:
            chunk_rows = rows[start : start + block]
        x = shard.rows_f32(chunk_rows)
        scores = q @ x.T
        labels = np.broadcast_to(shard.ids[chunk_rows], scores.shape)
        best_s, best_l = _top_k(
            np.concatenate([best_s, scores], axis=1), np.concatenate([best_l, labels], axis=1), k
        )
    return _top_k(best_s, best_l, k)


def _candidates_k(shard: Shard, query: _Query) -> int:
    """How many results to ask FAISS for: k, or refine_factor * k IVF-PQ candidates."""
    if shard.kind == "ivfpq":
        return min(shard.count, query.k * query.refine_factor)
    return query.k


def _search_params(shard: Shard, query: _Query, k: int, *, max_nprobe: int | None = None) -> Any:
    """A fresh faiss.SearchParameters for one search (the stub lacks SearchParametersHNSW)."""
    params: Any
    if shard.kind == "hnsw":
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        # HNSW cannot return more than efSearch results.
        params.efSearch = max(query.ef_search, k)
    elif shard.kind in ("ivf", "ivfpq"):
        params = faiss.SearchParametersIVF()
        nlist = int(shard.manifest.params.get("nlist") or 1)
        params.nprobe = min(query.nprobe, nlist, max_nprobe or nlist)
    else:
        params = faiss.SearchParameters()
    return params


def _device_search(
    state: _ShardState, query: _Query, gpu: DevicePlacement
) -> tuple[F32Array, IdArray] | None:
    """An unfiltered search of the shard's GPU copy, tombstones removed; None: use the CPU."""
    shard = state.shard
    deleted = state.deleted_ids
    k = _candidates_k(shard, query)
    # The device ignores selectors: over-fetch by the tombstone count, so that after dropping
    # them at least k live results remain wherever the CPU search would have found k.
    wanted = min(shard.count, k + int(deleted.size))
    if wanted > gpu.max_k:
        return None
    params = _search_params(shard, query, wanted, max_nprobe=gpu.max_k)
    assert state.device_index is not None
    try:
        with gpu.lock:
            scores, labels = state.device_index.search(query.vectors, wanted, params=params)
    except RuntimeError as exc:
        log.warning("GPU search of shard %s failed, using the CPU: %s", shard.shard_id, exc)
        return None
    dropped = labels < 0
    if deleted.size:
        dropped |= np.isin(labels, deleted)
    scores = np.where(dropped, -np.inf, scores).astype(np.float32)
    labels = np.where(dropped, -1, labels).astype(np.int64)
    if shard.kind == "ivfpq":
        return _refine(shard, query.vectors, labels, query.k)
    return _top_k(scores, labels, query.k)


def _faiss_search(
    shard: Shard, query: _Query, selector: faiss.IDSelector | None
) -> tuple[F32Array, IdArray]:
    kind = shard.kind
    k = _candidates_k(shard, query)
    params = _search_params(shard, query, k)
    # A fresh SearchParameters per call: IndexIDMap (flat, hnsw) temporarily swaps params.sel for
    # an IDSelectorTranslated (via const_cast), so one params object must never be shared by
    # concurrent searches. Through that translation the selector sees catalog ids, as it does in
    # IVF lists, which store the ids themselves.
    if selector is not None:
        params.sel = selector
    scores, labels = shard.index.search(query.vectors, k, params=params)
    # FAISS pads missing results with -FLT_MAX for inner product; we pad with -inf.
    scores[labels < 0] = -np.inf
    if kind == "ivfpq":
        return _refine(shard, query.vectors, labels, query.k)
    return scores, labels


def _refine(shard: Shard, q: F32Array, labels: IdArray, k: int) -> tuple[F32Array, IdArray]:
    """Re-score PQ candidates exactly from embeddings.npy and keep the best k."""
    valid = labels >= 0
    _, rows = shard.positions(np.where(valid, labels, shard.ids[0]))
    x = shard.rows_f32(rows.ravel()).reshape(*labels.shape, shard.dim)
    scores = np.einsum("qd,qcd->qc", q, x).astype(np.float32)
    scores[~valid] = -np.inf
    return _top_k(scores, np.where(valid, labels, -1), k)
