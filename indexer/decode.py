"""Decoding images for the encoder in DataLoader workers, so decoding overlaps encoding.

Each file comes back either as a preprocessed tensor with its decoded size and format, or as a
`DecodeFailure` with a reason: one bad file never stops a batch, let alone the job.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

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


def _collate(batch: list[tuple[int, Any, DecodedMeta | DecodeFailure]]) -> DecodedBatch:
    import torch

    good = [(i, t, meta) for i, t, meta in batch if isinstance(meta, DecodedMeta)]
    bad = [(i, meta) for i, _, meta in batch if isinstance(meta, DecodeFailure)]
    return DecodedBatch(
        indices=[i for i, _, _ in good],
        tensors=torch.stack([t for _, t, _ in good]) if good else None,
        metas=[meta for _, _, meta in good],
        failures=bad,
    )


def _worker_init(_: int, parent_pid: int) -> None:
    import torch

    # A worker of a killed indexer must not go on decoding (and holding memory) for seconds.
    die_with_parent(parent_pid)
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
    max_bytes: int | None = None,
) -> Iterator[DecodedBatch]:
    """Decoded batches of `paths`, in order; `workers=0` decodes in this process.

    `max_bytes` is the decode budget of one image (retrieval.images.DecodeCost); an image over
    it fails as too_large without being decoded."""
    from torch.utils.data import DataLoader

    dataset = _DecodeDataset(paths, preprocess, max_pixels, min_side, max_bytes)
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
