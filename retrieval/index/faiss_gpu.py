"""FAISS on the GPU: whether to use it, and the shard indexes copied to it for search.

FAISS GPU indexes ignore an IDSelector (facebookresearch/faiss#3924: the search runs, and the
selector is silently dropped), so a device copy is never given one. The shard set instead asks
a device index for k plus the shard's tombstone count, drops the tombstoned ids, and keeps the
best k; filtered searches (an allowed-id set) stay on the CPU, where the selector works. FAISS's
GPU k-selection also stops at 2048 results; a search that would need more goes to the CPU.

StandardGpuResources is not safe to use from several threads at once (its scratch memory and
stream are shared), so every search through one placement, and every copy to the GPU (a reload
runs beside searches), holds the placement's lock. A GPU search of one shard takes well under a
millisecond, so the lock costs little next to the shard fan-out.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import faiss

from retrieval.errors import ConfigError

log = logging.getLogger("clipsearch.faiss_gpu")

# faiss/gpu/utils/DeviceDefs.cuh: GPU_MAX_SELECTION_K (k and nprobe) on every CUDA build.
GPU_MAX_K = 2048
# Kinds that FAISS can copy to a GPU. HNSW has no GPU form in FAISS (only cuVS's CAGRA, a
# different graph), so HNSW shards are searched on the CPU whatever the setting.
GPU_KINDS = ("flat", "ivf", "ivfpq", "ivfpq-large")
SEARCH_TEMP_MEMORY_BYTES = 256 * 2**20


def gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_faiss_gpu(mode: str, device: str = "auto") -> bool:
    """Whether FAISS should build and search on the GPU, for CLIPSEARCH_FAISS_GPU and _DEVICE.

    `auto` uses a GPU when FAISS sees one, unless CLIPSEARCH_DEVICE is `cpu`; `on` insists, and
    fails with a ConfigError naming the setting when it cannot; `off` never uses one.
    """
    if mode == "off":
        return False
    if mode not in ("auto", "on"):
        raise ConfigError("CLIPSEARCH_FAISS_GPU", f"must be auto, on or off (got {mode!r})")
    if device == "cpu":
        if mode == "on":
            raise ConfigError(
                "CLIPSEARCH_FAISS_GPU", "is on, but CLIPSEARCH_DEVICE=cpu; set one of them"
            )
        return False
    if gpu_available():
        return True
    if mode == "on":
        raise ConfigError(
            "CLIPSEARCH_FAISS_GPU",
            "is on, but this FAISS build has no GPU support or sees no GPU. Install the GPU "
            "build (pip uninstall faiss-cpu && pip install 'clipsearch[gpu]') or use auto",
        )
    return False


def device_number(device: str) -> int:
    """The GPU number in `cuda:N` (0 for `auto` and `cuda`)."""
    return int(device[5:]) if device.startswith("cuda:") else 0


class DevicePlacement:
    """Where shard indexes are copied for search, and the lock every device search holds.

    `place` returns a device copy of an index, or None to keep the shard on the CPU. Copies are
    kept per shard id, so a reload that keeps a shard does not upload it again; `retain` drops
    the copies of shards that left the index (searches still holding one keep it alive).
    """

    max_k = GPU_MAX_K

    def __init__(self) -> None:
        self.lock = threading.Lock()  # the device's: searches, copies and the copy cache
        self._copies: dict[str, Any] = {}

    def place(self, shard_id: str, kind: str, index: faiss.Index) -> faiss.Index | None:
        if kind not in GPU_KINDS or index.ntotal == 0:
            return None
        with self.lock:
            cached = self._copies.get(shard_id)
            if cached is not None and cached.ntotal == index.ntotal:
                return cached
            try:
                copy = self.copy_index(index, kind)
            except RuntimeError as exc:
                # Unsupported layout (some IVF-PQ sub-quantiser sizes) or out of GPU memory:
                # this shard is searched on the CPU, the others still on the GPU.
                log.warning("shard %s stays on the CPU: %s", shard_id, str(exc).splitlines()[0])
                return None
            self._copies[shard_id] = copy
            return copy

    def retain(self, shard_ids: set[str]) -> None:
        with self.lock:
            for shard_id in list(self._copies):
                if shard_id not in shard_ids:
                    del self._copies[shard_id]

    @property
    def placed(self) -> list[str]:
        with self.lock:
            return sorted(self._copies)

    def copy_index(self, index: faiss.Index, kind: str) -> faiss.Index:
        raise NotImplementedError


class FaissGpu(DevicePlacement):
    """Shard indexes on one GPU through FAISS's own GPU indexes."""

    def __init__(self, device: int = 0) -> None:
        if not gpu_available():
            raise RuntimeError("this FAISS build has no GPU support or sees no GPU")
        super().__init__()
        self.device = device
        self.resources = faiss.StandardGpuResources()
        # Scratch memory for searches: FAISS would reserve up to 1.5 GiB, which the API's
        # torch model shares; a few queries at k <= 2048 need a small fraction of this.
        self.resources.setTempMemory(SEARCH_TEMP_MEMORY_BYTES)

    def copy_index(self, index: faiss.Index, kind: str) -> faiss.Index:
        options = faiss.GpuClonerOptions()
        # IVF-PQ: float16 lookup tables, needed for many sub-quantisers to fit in shared
        # memory. Flat and IVF-Flat keep float32 vectors, so their scores equal the CPU's.
        options.useFloat16 = kind in ("ivfpq", "ivfpq-large")
        return faiss.index_cpu_to_gpu(self.resources, self.device, index, options)


def placement_from_settings(mode: str, device: str) -> DevicePlacement | None:
    """The GPU placement for searches that the settings ask for, or None (CPU only)."""
    if not resolve_faiss_gpu(mode, device):
        return None
    return FaissGpu(device_number(device))
