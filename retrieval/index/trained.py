"""Trained templates of the large-corpus kind: one coarse quantizer and one set of PQ codebooks.

A template is an empty, trained IVF-PQ index (inner product) kept beside the shards:

    index_dir/trained/<trained_id>/trained.faiss   the empty trained index
                                   trained.json    its shape, the model it was trained for,
                                                   what it was trained on, and trained.faiss's
                                                   size and sha256 (written last)

Every `ivfpq-large` shard names its template in its parameters (`trained_id`), and its index
holds a byte-identical copy of the template's quantizer and codebooks, so a shard is served on
its own; the template is needed only to fill a new shard. `compact` trains a template once, on a
sample, and then only adds vectors to its lists: no nightly run trains again. Like shard files,
a template is written once and never modified; one that no active shard names is removed by the
next writer job (`cleanup_index_dir`).

The template records the model identity and the dimension it was trained for, and loading it
for another model or dimension is refused (TrainedTemplateError), as is a template whose file
differs from its sha256 (checked before FAISS parses a byte).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.errors import TrainedTemplateError
from retrieval.index.durable import (
    child_dirs,
    fsync_dir,
    fsync_file,
    remove_dir_manifest_first,
    sha256_of,
)
from retrieval.index.faiss_gpu import gpu_available
from retrieval.index.kinds import (
    LARGE_KIND,
    MIN_POINTS_PER_CENTROID,
    TRAIN_SEED,
    F32Array,
    IdArray,
    IndexParams,
)

TRAINED_DIR = "trained"
TEMPLATE_FILE = "trained.faiss"
TEMPLATE_MANIFEST = "trained.json"
FORMAT_VERSION = 1
# Points per centroid that `training_sample_size` asks for: FAISS warns below 39, and k-means
# quality stops improving well before its own cap of 256.
SAMPLE_POINTS_PER_CENTROID = 64
# A template trained on N vectors serves a corpus of up to RETRAIN_GROWTH * N before a retrain
# is advised: lists grow with the corpus (search cost per probed list with them), and the sample
# says less of a corpus that has drifted from it.
RETRAIN_GROWTH = 10.0


@dataclass(frozen=True)
class TemplateInfo:
    """The contents of trained.json."""

    trained_id: str
    nlist: int
    pq_m: int
    pq_nbits: int
    dim: int
    model: dict[str, Any]
    trained_on: int  # vectors in the training sample
    corpus_count: int  # live vectors in the index when it was trained
    created_at: str
    seconds: float  # training time
    on_gpu: bool
    sha256: str
    bytes: int
    format_version: int = FORMAT_VERSION

    def params(self) -> IndexParams:
        """The parameters of every shard filled from this template."""
        return IndexParams(
            kind=LARGE_KIND,
            nlist=self.nlist,
            pq_m=self.pq_m,
            pq_nbits=self.pq_nbits,
            trained_id=self.trained_id,
        )

    @property
    def model_key(self) -> str | None:
        key = self.model.get("key")
        return str(key) if key else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TemplateInfo:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            raise ValueError("not a version-1 trained.json")
        if set(data) != {f.name for f in fields(cls)}:
            raise ValueError(f"trained.json has keys {sorted(data)}")
        return cls(**data)


def template_dir(index_dir: Path, trained_id: str) -> Path:
    if not trained_id or "/" in trained_id or trained_id.startswith("."):
        raise ValueError(f"invalid trained template id {trained_id!r}")
    return Path(index_dir) / TRAINED_DIR / trained_id


def list_templates(index_dir: Path) -> list[str]:
    """Names of all template directories, complete or not, sorted."""
    return child_dirs(Path(index_dir) / TRAINED_DIR)


def remove_template(index_dir: Path, trained_id: str) -> bool:
    """Delete a template directory (trained.json first); False if it was already gone."""
    return remove_dir_manifest_first(template_dir(index_dir, trained_id), TEMPLATE_MANIFEST)


def default_large_nlist(n: int) -> int:
    """Lists for a corpus of `n` vectors: 4*sqrt(n), a power of two between 256 and 65536.

    A power of two keeps the GPU's k-means and list layout simple; 4*sqrt(n) is the low end of
    the usual 4..16*sqrt(n), so nprobe covers more of the corpus per list probed.
    """
    target = 4 * np.sqrt(max(n, 1))
    return int(min(65536, max(256, 2 ** round(np.log2(target)))))


def training_sample_size(n: int, nlist: int, pq_nbits: int = 8) -> int:
    """How many of `n` vectors to train on: 64 per list, and enough for the PQ codebooks."""
    want = max(SAMPLE_POINTS_PER_CENTROID * nlist, 256 * 2**pq_nbits)
    return min(n, want)


def check_trainable(n: int, nlist: int, pq_nbits: int = 8) -> None:
    """ValueError when `n` training vectors cannot train `nlist` lists and the PQ codebooks."""
    need = MIN_POINTS_PER_CENTROID * max(nlist, 2**pq_nbits)
    if n < need:
        raise ValueError(
            f"{n} vectors cannot train an ivfpq-large template of {nlist} lists "
            f"({need} needed); use a per-shard kind until the corpus is larger"
        )


def train_template(
    index_dir: Path,
    sample: np.ndarray,
    *,
    nlist: int,
    pq_m: int,
    model: dict[str, Any],
    corpus_count: int,
    pq_nbits: int = 8,
    use_gpu: bool | None = None,
) -> TemplateInfo:
    """Train a template on `sample` (L2-normalised float32) and write it durably.

    Training runs on GPU 0 where FAISS sees one (unless `use_gpu` is False). The template is not
    in use until a catalog commit makes a shard that names it; until then it is an orphan that the
    next writer job removes.
    """
    x = np.ascontiguousarray(sample, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"the training sample must be (n, d); got {x.shape}")
    n, dim = x.shape
    if dim % pq_m:
        raise ValueError(f"pq_m={pq_m} must divide the dimension {dim}")
    check_trainable(n, nlist, pq_nbits)
    if use_gpu and not gpu_available():
        raise RuntimeError("use_gpu=True, but this FAISS build has no GPU support or sees no GPU")
    gpu = gpu_available() if use_gpu is None else use_gpu
    started = time.monotonic()
    index = faiss.IndexIVFPQ(
        faiss.IndexFlatIP(dim), dim, nlist, pq_m, pq_nbits, faiss.METRIC_INNER_PRODUCT
    )
    index.cp.spherical = True  # unit-norm centroids: see retrieval.index.kinds.build_index
    index.cp.seed = TRAIN_SEED
    on_gpu = False
    if gpu:
        trained = _train_on_gpu(index, x)
        if trained is not None:
            index, on_gpu = trained, True
        elif use_gpu:
            raise RuntimeError("FAISS cannot train this ivfpq-large template on the GPU")
    if not on_gpu:
        index.train(x)
    seconds = time.monotonic() - started

    trained_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    path = template_dir(index_dir, trained_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir()
    faiss.write_index(index, str(path / TEMPLATE_FILE))
    fsync_file(path / TEMPLATE_FILE)
    info = TemplateInfo(
        trained_id=trained_id,
        nlist=nlist,
        pq_m=pq_m,
        pq_nbits=pq_nbits,
        dim=dim,
        model=json.loads(json.dumps(model)),
        trained_on=n,
        corpus_count=int(corpus_count),
        created_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        seconds=round(seconds, 3),
        on_gpu=on_gpu,
        sha256=sha256_of(path / TEMPLATE_FILE),
        bytes=(path / TEMPLATE_FILE).stat().st_size,
    )
    with open(path / TEMPLATE_MANIFEST, "x", encoding="utf-8") as f:
        f.write(info.to_json())
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path)
    fsync_dir(path.parent)
    return info


def _train_on_gpu(cpu_index: faiss.IndexIVFPQ, x: F32Array) -> Any:
    resources = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = True  # lookup tables only (see kinds._train_and_add_on_gpu)
    try:
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, cpu_index, options)
    except RuntimeError:
        return None  # a (pq_m, dim/pq_m) layout the GPU kernels lack
    gpu_index.train(x)
    return faiss.index_gpu_to_cpu(gpu_index)


def read_template_info(index_dir: Path, trained_id: str) -> TemplateInfo:
    """trained.json of one template; TrainedTemplateError when missing or invalid."""
    path = template_dir(index_dir, trained_id) / TEMPLATE_MANIFEST
    try:
        return TemplateInfo.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainedTemplateError(trained_id, f"{path} is missing") from None
    except (OSError, ValueError, TypeError) as exc:
        raise TrainedTemplateError(trained_id, f"{path} is unreadable or invalid: {exc}") from exc


def load_template(
    index_dir: Path, trained_id: str, *, model_key: str | None, dim: int
) -> tuple[Any, TemplateInfo]:
    """The trained, empty index of a template, after checking it is the one to fill.

    TrainedTemplateError when it was trained for another model or dimension, when trained.faiss
    differs from its sha256 (checked before FAISS reads it), or when it is not an empty trained
    IVF-PQ index of the recorded shape.
    """
    info = read_template_info(index_dir, trained_id)
    if model_key is not None and info.model_key != model_key:
        raise TrainedTemplateError(
            trained_id,
            f"it was trained for model {info.model_key}, this index holds {model_key}; "
            "vectors of two models never share a quantizer",
        )
    if info.dim != dim:
        raise TrainedTemplateError(
            trained_id, f"it was trained on {info.dim}-d vectors, these are {dim}-d"
        )
    path = template_dir(index_dir, trained_id) / TEMPLATE_FILE
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise TrainedTemplateError(trained_id, f"{path} is missing") from None
    if size != info.bytes or sha256_of(path) != info.sha256:
        raise TrainedTemplateError(trained_id, f"{path} differs from its sha256 in trained.json")
    try:
        index = faiss.read_index(str(path))
    except Exception as exc:
        raise TrainedTemplateError(trained_id, f"FAISS cannot read {path}: {exc}") from exc
    if not (
        isinstance(index, faiss.IndexIVFPQ)
        and index.is_trained
        and index.ntotal == 0
        and index.d == dim
        and index.nlist == info.nlist
        and index.pq.M == info.pq_m
        and index.metric_type == faiss.METRIC_INNER_PRODUCT
    ):
        raise TrainedTemplateError(trained_id, f"{path} is not the empty trained index it records")
    return index, info


def trained_state_bytes(index: faiss.Index) -> bytes:
    """The trained state of an IVF-PQ index (its centroids and PQ codebooks) as raw bytes: equal
    for a template and for every shard filled from it."""
    quantizer: Any = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    centroids = faiss.rev_swig_ptr(quantizer.get_xb(), quantizer.ntotal * quantizer.d)
    pq = faiss.downcast_index(index).pq  # type: ignore[attr-defined]  # IndexIVFPQ
    codebooks = faiss.vector_to_array(pq.centroids)
    return np.asarray(centroids).tobytes() + codebooks.tobytes()


# Rows converted to float32 and encoded at a time: 64k rows of 512-d are 128 MiB.
ADD_BLOCK_ROWS = 65_536


def fill_template(
    index_dir: Path,
    params: IndexParams,
    x: F32Array,
    ids: IdArray,
    *,
    model_key: str | None,
    use_gpu: bool | None = None,
) -> faiss.IndexIVFPQ:
    """The template named by `params` filled with `x` (float32, canonical float16 values)."""
    if params.trained_id is None:
        raise ValueError("ivfpq-large parameters name no trained template")
    template, info = load_template(
        index_dir, params.trained_id, model_key=model_key, dim=x.shape[1]
    )
    check_template_params(params, info)
    return encode_with_template(
        template,
        ids,
        lambda a, b: x[a:b],
        use_gpu=use_gpu,
    )


def check_template_params(params: IndexParams, info: TemplateInfo) -> None:
    if (params.nlist, params.pq_m, params.pq_nbits) != (info.nlist, info.pq_m, info.pq_nbits):
        raise TrainedTemplateError(
            info.trained_id,
            f"the shard says nlist={params.nlist}, pq_m={params.pq_m}, pq_nbits="
            f"{params.pq_nbits}; the template has {info.nlist}, {info.pq_m}, {info.pq_nbits}",
        )


def encode_with_template(
    template: faiss.IndexIVFPQ,
    ids: IdArray,
    rows: Callable[[int, int], np.ndarray],
    *,
    use_gpu: bool | None = None,
) -> Any:
    """A copy of the empty trained `template` holding the vectors `rows` gives for `ids`.

    Vectors are added in blocks (float32, at most ADD_BLOCK_ROWS at a time), on GPU 0 where
    FAISS sees one; the template is not modified and nothing is trained.
    """
    gpu = gpu_available() if use_gpu is None else use_gpu
    filled = faiss.clone_index(template)
    device_index = None
    resources = None
    if gpu and ids.size:
        resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        options.useFloat16 = True  # lookup tables only: codes and codebooks are unchanged
        try:
            device_index = faiss.index_cpu_to_gpu(resources, 0, filled, options)
        except RuntimeError:
            if use_gpu:
                raise
            device_index = None
    target = device_index if device_index is not None else filled
    for start in range(0, int(ids.size), ADD_BLOCK_ROWS):
        stop = min(start + ADD_BLOCK_ROWS, int(ids.size))
        x = np.ascontiguousarray(rows(start, stop), dtype=np.float32)
        target.add_with_ids(x, np.ascontiguousarray(ids[start:stop]))
    if device_index is not None:
        filled = faiss.index_gpu_to_cpu(device_index)
    return filled
