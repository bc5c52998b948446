"""Decoding images for the encoder in DataLoader workers, so decoding overlaps encoding.

Each file comes back either as a preprocessed tensor with its decoded size and format, or as a
`DecodeFailure` with a reason: one bad file never stops a batch, let alone the job.
"""

from __future__ import annotations

import collections
import functools
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from indexer.workers import die_with_parent
from retrieval.errors import ImageError
from retrieval.images import decode_image
from retrieval.photo_info import PhotoInfo


@dataclass(frozen=True)
class DecodedMeta:
    """What decoding learnt of a file: the catalog's width, height, format and EXIF facts."""

    width: int
    height: int
    format: str | None
    photo: PhotoInfo = PhotoInfo()


@dataclass(frozen=True)
class DecodeFailure:
    """Why a file could not be decoded: a stable reason (`ImageError.reason`) and a detail."""

    reason: str
    detail: str


@dataclass
class DecodedBatch:
    """One batch, in input order: the positions that decoded with their tensors, the rest failed."""

    indices: list[int]  # positions in the path list
    tensors: Any  # torch.Tensor (len(indices), 3, H, W), or None when nothing decoded
    metas: list[DecodedMeta]
    failures: list[tuple[int, DecodeFailure]]


class _DecodeDataset:
    def __init__(
        self,
        paths: Sequence[str],
        preprocess: Callable[[Any], Any],
        max_pixels: int,
        min_side: int | None,
        max_bytes: int | None = None,
    ):
        self.paths = list(paths)
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Any, DecodedMeta | DecodeFailure]:
        tensor, meta = decode_for_model(
            self.paths[index],
            self.preprocess,
            max_pixels=self.max_pixels,
            min_side=self.min_side,
            max_bytes=self.max_bytes,
        )
        return index, tensor, meta


def decode_for_model(
    path: str,
    preprocess: Callable[[Any], Any],
    *,
    max_pixels: int,
    min_side: int | None,
    max_bytes: int | None,
) -> tuple[Any, DecodedMeta | DecodeFailure]:
    """One file as the model's input tensor and what decoding learnt, or (None, its failure).

    Every engine decodes through this, so a bad file fails with the same reason everywhere."""
    try:
        decoded = decode_image(path, max_pixels=max_pixels, min_side=min_side, max_bytes=max_bytes)
        tensor = preprocess(decoded.image)
        return tensor, DecodedMeta(decoded.width, decoded.height, decoded.format, decoded.photo)
    except ImageError as exc:
        return None, DecodeFailure(exc.reason, exc.detail)
    except Exception as exc:  # noqa: BLE001 - one bad file must never stop the job
        return None, DecodeFailure("decode_failed", f"{type(exc).__name__}: {exc}")


def _stack(tensors: list[Any]) -> Any:
    """One batch of preprocessed images: numpy arrays (an export's preprocessing) or tensors."""
    if isinstance(tensors[0], np.ndarray):
        return np.stack(tensors)
    import torch

    return torch.stack(tensors)


def _collate(batch: list[tuple[int, Any, DecodedMeta | DecodeFailure]]) -> DecodedBatch:
    good = [(i, t, meta) for i, t, meta in batch if isinstance(meta, DecodedMeta)]
    bad = [(i, meta) for i, _, meta in batch if isinstance(meta, DecodeFailure)]
    return DecodedBatch(
        indices=[i for i, _, _ in good],
        tensors=_stack([t for _, t, _ in good]) if good else None,
        metas=[meta for _, _, meta in good],
        failures=bad,
    )


PREFETCH_BATCHES = 4  # as the DataLoader's prefetch_factor


def _worker_init(_: int, parent_pid: int) -> None:
    import torch

    # A worker of a killed indexer must not go on decoding (and holding memory) for seconds.
    die_with_parent(parent_pid)
    # Each loader process decodes one image at a time; torch threads there only compete
    # with the encoder for the same cores.
    torch.set_num_threads(1)


_POOL_DATASET: _DecodeDataset | None = None  # a decoding pool process's dataset (set once)


def _pool_init(dataset: _DecodeDataset, parent_pid: int) -> None:
    global _POOL_DATASET
    die_with_parent(parent_pid)
    _POOL_DATASET = dataset


def _pool_item(index: int) -> tuple[int, Any, DecodedMeta | DecodeFailure]:
    assert _POOL_DATASET is not None
    return _POOL_DATASET[index]


def _pool_batches(dataset: _DecodeDataset, batch_size: int, workers: int) -> Iterator[DecodedBatch]:
    """The DataLoader's batches without torch: a pool of `workers` processes (forked, so the
    dataset is not pickled per image), a few batches ahead of the encoder, in order."""
    starts = iter(range(0, len(dataset), batch_size))
    if workers == 0:
        for start in starts:
            end = min(start + batch_size, len(dataset))
            yield _collate([dataset[i] for i in range(start, end)])
        return
    context = multiprocessing.get_context("fork")
    with context.Pool(workers, _pool_init, (dataset, os.getpid())) as pool:
        pending: collections.deque[Any] = collections.deque()

        def submit() -> None:
            start = next(starts, None)
            if start is not None:
                end = min(start + batch_size, len(dataset))
                pending.append(pool.map_async(_pool_item, range(start, end), chunksize=1))

        for _ in range(PREFETCH_BATCHES):
            submit()
        while pending:
            batch = pending.popleft().get()
            submit()
            yield _collate(batch)


def iterate_decoded(
    paths: Sequence[str],
    preprocess: Callable[[Any], Any],
    *,
    batch_size: int,
    workers: int,
    max_pixels: int,
    min_side: int | None = None,
    max_bytes: int | None = None,
) -> Iterator[DecodedBatch]:
    """Decoded batches of `paths`, in order; `workers=0` decodes in this process.

    `max_bytes` is the decode budget of one image (retrieval.images.DecodeCost); an image over
    it fails as too_large without being decoded. torch's DataLoader decodes where the model runs
    in torch; a process that runs an export (no torch imported) uses `_pool_batches`."""
    dataset = _DecodeDataset(paths, preprocess, max_pixels, min_side, max_bytes)
    if sys.modules.get("torch") is None:
        yield from _pool_batches(dataset, batch_size, workers)
        return
    from torch.utils.data import DataLoader

    loader: Any = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=functools.partial(_worker_init, parent_pid=os.getpid()) if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    yield from loader
