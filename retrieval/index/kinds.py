"""Index kinds: the FAISS index behind a shard, its parameters, and how it is built.

All vectors are L2-normalised and searched by inner product. `choose_params` picks a kind from the
shard's size and a memory budget (as autofaiss does), `resolve_params` completes and degrades it
for the vectors at hand, and `build_index` trains and fills it (on a GPU where FAISS sees one).
A new kind starts here: a name in INDEX_KINDS, its parameters, and its branch in `build_index`;
the search side (`retrieval.index.shard_set`) only needs to know how to set its search depth.

`ivfpq-large` (LARGE_KIND) is the large-corpus kind: IVF-PQ shards of up to tens of millions of
vectors that all share one coarse quantizer and one set of PQ codebooks, trained once on a sample
and kept as a trained template (retrieval.index.trained). Its shards are made by `compact`
(retrieval.index.large), which adds new vectors to the existing lists without training again;
a shard of the index job asked for this kind is chosen as `auto` is, and folded in later.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from retrieval.index.faiss_gpu import gpu_available

IdArray = npt.NDArray[np.int64]
F32Array = npt.NDArray[np.float32]

INDEX_KINDS = ("flat", "hnsw", "ivf", "ivfpq")
LARGE_KIND = "ivfpq-large"
# Every kind a shard may have: the per-shard kinds, and the large kind built from a template.
ALL_KINDS = (*INDEX_KINDS, LARGE_KIND)
# The kinds whose candidates are PQ codes, re-scored exactly from the stored embeddings.
PQ_KINDS = ("ivfpq", LARGE_KIND)
# The kinds searched through inverted lists, whose search depth is nprobe.
IVF_KINDS = ("ivf", "ivfpq", LARGE_KIND)

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


# --------------------------------------------------------------------------------------------
# Index parameters


@dataclass(frozen=True)
class IndexParams:
    """What `build_index` builds. `choose_params` fills in the values left as None."""

    kind: str
    hnsw_m: int = 32
    # bench/ann_recall.py, 100k clustered vectors, d=512, efSearch 128, 2 CPU cores:
    # efConstruction 40 -> recall@10 0.996, build 30 s; 64 -> 1.000, 36 s; 80 -> 1.000, 61 s.
    # 64 is the cheapest value that measured no recall loss.
    hnsw_ef_construction: int = 64
    nlist: int | None = None
    pq_m: int | None = None
    pq_nbits: int = 8
    # ivfpq-large only: the trained template (retrieval.index.trained) whose quantizer and PQ
    # codebooks the shard's index holds.
    trained_id: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ALL_KINDS:
            raise ValueError(f"index kind must be one of {ALL_KINDS}, not {self.kind!r}")
        if self.hnsw_m < 2 or self.hnsw_ef_construction < 1:
            raise ValueError("hnsw_m must be >= 2 and hnsw_ef_construction >= 1")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError("nlist must be >= 1")
        if self.pq_m is not None and self.pq_m < 1:
            raise ValueError("pq_m must be >= 1")
        if not 1 <= self.pq_nbits <= 16:
            raise ValueError("pq_nbits must be between 1 and 16")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["trained_id"] is None:
            # The per-shard kinds have no template; their shard.json stays as it always was.
            del data["trained_id"]
        return data

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
    `ivfpq-large` is chosen as `auto` is: its shards come from `compact`, never from one batch.
    """
    if kind in ("auto", LARGE_KIND):
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
    if params.kind == LARGE_KIND:
        # Fixed by the trained template, whatever n is.
        if params.nlist is None or params.pq_m is None or params.trained_id is None:
            raise ValueError("ivfpq-large parameters name their trained template and its shape")
        return params
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
    if params.kind == LARGE_KIND:
        raise ValueError(
            "ivfpq-large indexes are filled from their trained template (retrieval.index.large)"
        )
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


def stored_vectors(index: faiss.Index) -> tuple[np.ndarray, np.ndarray] | None:
    """The ids (ascending) and exact float32 vectors an index holds, or None for a lossy kind.

    The inverse of `build_index` for the kinds that keep vectors whole: flat and HNSW (in an
    IndexIDMap) and IVF-Flat (in its inverted lists). IVF-PQ keeps only codes: None.
    """
    if isinstance(index, faiss.IndexIDMap):
        inner = faiss.downcast_index(index.index)
        if not isinstance(inner, faiss.IndexFlat | faiss.IndexHNSWFlat):
            return None
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        vectors = inner.reconstruct_n(0, index.ntotal) if index.ntotal else None
        if vectors is None:
            vectors = np.zeros((0, index.d), dtype=np.float32)
    elif isinstance(index, faiss.IndexIVFFlat):
        lists = index.invlists
        if lists is None:
            return None
        id_parts: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
        vector_parts: list[np.ndarray] = [np.zeros((0, index.d), dtype=np.float32)]
        for number in range(index.nlist):
            size = lists.list_size(number)
            if not size:
                continue
            id_parts.append(faiss.rev_swig_ptr(lists.get_ids(number), size).astype(np.int64))
            codes = faiss.rev_swig_ptr(lists.get_codes(number), size * lists.code_size)
            vector_parts.append(np.array(codes).view(np.float32).reshape(size, index.d))
        ids = np.concatenate(id_parts)
        vectors = np.concatenate(vector_parts)
    else:
        return None
    order = np.argsort(ids, kind="stable")
    return ids[order], np.ascontiguousarray(vectors[order], dtype=np.float32)
