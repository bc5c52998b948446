"""What every engine is: it turns the index job's files into blocks of vectors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from indexer.decode import DecodedMeta, DecodeFailure

if TYPE_CHECKING:
    from retrieval.models.encoder import Encoder


@dataclass
class EncodedBatch:
    """One block of results, in input order: positions in the path list with their vectors and
    decode metas, and the positions that failed to decode with their reasons."""

    indices: list[int]
    vectors: np.ndarray  # float32 (len(indices), dim), L2-normalised
    metas: list[DecodedMeta]
    failures: list[tuple[int, DecodeFailure]]


class Engine(ABC):
    """Decodes and encodes a list of files; `start` refuses a job before anything is committed."""

    name: str = ""
    # Models encoding at once (the local engine has one; Ray's actor pool may hold many).
    encoders: int = 1

    @abstractmethod
    def start(self, encoder: Encoder, paths: Sequence[str], index_dir: Path) -> None:
        """Get ready to encode `paths` with `encoder`'s model, and check everything that can
        refuse the job (the driver has committed nothing yet)."""

    @abstractmethod
    def batches(self) -> Iterator[EncodedBatch]:
        """The started job's results, in input order."""

    @abstractmethod
    def close(self) -> None:
        """Release what `start` took (processes, a cluster connection); safe to call twice."""
