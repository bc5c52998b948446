"""The local engine: DataLoader decoder processes feed one model in this process."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from indexer.decode import iterate_decoded
from indexer.engines.base import EncodedBatch, Engine

if TYPE_CHECKING:
    from retrieval.config import Settings
    from retrieval.models.encoder import Encoder


class LocalEngine(Engine):
    name = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._encoder: Encoder | None = None
        self._paths: list[str] = []

    def start(self, encoder: Encoder, paths: Sequence[str], index_dir: Path) -> None:
        self._encoder = encoder
        self._paths = list(paths)

    def batches(self) -> Iterator[EncodedBatch]:
        encoder = self._encoder
        assert encoder is not None, "start() first"
        settings = self.settings
        for batch in iterate_decoded(
            self._paths,
            encoder.preprocess,
            batch_size=settings.batch_size,
            workers=settings.workers,
            max_pixels=settings.max_image_pixels,
            min_side=encoder.identity.image_size if settings.jpeg_draft else None,
            max_bytes=settings.max_decode_bytes,
        ):
            if batch.tensors is not None:
                vectors = encoder.encode_image_tensors(batch.tensors)
            else:
                vectors = np.zeros((0, encoder.dim), dtype=np.float32)
            yield EncodedBatch(batch.indices, vectors, batch.metas, batch.failures)

    def close(self) -> None:
        self._encoder = None  # the job's encoder: the job keeps it for labelling
        self._paths = []
