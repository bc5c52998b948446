"""Which model made a vector: what to load (`ModelSpec`) and what was loaded (`ModelIdentity`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from retrieval.errors import ModelMismatch


@dataclass(frozen=True)
class ModelSpec:
    """What to load: an open_clip architecture plus a pretrained tag or checkpoint path."""

    name: str
    pretrained: str
    device: str = "auto"
    precision: str = "auto"
    config_dir: Path | None = None
    cache_dir: Path | None = None


@dataclass(frozen=True)
class ModelIdentity:
    """Everything that decides which vector an image gets. Stored in shard.json and the DB."""

    name: str
    pretrained: str
    weights_sha256: str
    dim: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def key(self) -> str:
        # `pretrained` is left out on purpose: the same weights file moved to another
        # path, or fetched by tag, is the same model.
        material = json.dumps(
            [self.name, self.weights_sha256, self.dim, self.image_size, self.mean, self.std]
        )
        return hashlib.sha256(material.encode()).hexdigest()[:16]

    def describe(self) -> str:
        return (
            f"{self.name} / {self.pretrained} (weights {self.weights_sha256[:12]}, dim {self.dim})"
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        data["key"] = self.key
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelIdentity:
        return cls(
            name=data["name"],
            pretrained=data["pretrained"],
            weights_sha256=data["weights_sha256"],
            dim=int(data["dim"]),
            image_size=int(data["image_size"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
        )

    def require_same(self, indexed: ModelIdentity | None) -> None:
        """Raise ModelMismatch unless `indexed` is None (empty index) or the same model."""
        if indexed is not None and indexed.key != self.key:
            raise ModelMismatch(self.describe(), indexed.describe())
