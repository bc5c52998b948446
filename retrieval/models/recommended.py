"""The models clipsearch recommends, read from `recommended.json` (data, not code paths)."""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("recommended.json")


@dataclass(frozen=True)
class HubFiles:
    """Files of one Hugging Face hub repo; `files` in order of preference (empty: the folder)."""

    repo: str
    files: tuple[str, ...] = ()
    size: int | None = None  # bytes of the first file, where recorded
    sha256: str | None = None  # of the first file, where recorded

    @property
    def url(self) -> str:
        tail = f"/resolve/main/{self.files[0]}" if self.files else ""
        return f"https://huggingface.co/{self.repo}{tail}"


@dataclass(frozen=True)
class Speed:
    text_query_ms: float
    images_per_s: float


@dataclass(frozen=True)
class RecommendedModel:
    """One row of the table: how to name the model, what it is, where its weights come from."""

    name: str  # what `clipsearch models fetch` takes
    model: str  # CLIPSEARCH_MODEL
    pretrained: str  # CLIPSEARCH_PRETRAINED
    family: str
    languages: str
    dim: int
    params: int
    weights: HubFiles
    needs: tuple[HubFiles, ...]  # other repos it reads (a tokenizer, a text tower's config)
    speed: Speed | None
    note: str

    @property
    def fp32_bytes(self) -> int:
        """The weights' size in fp32 (4 bytes a parameter): about the download."""
        return self.params * 4

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "pretrained": self.pretrained,
            "family": self.family,
            "languages": self.languages,
            "dim": self.dim,
            "params": self.params,
            "fp32_bytes": self.fp32_bytes,
            "weights": {
                "repo": self.weights.repo,
                "files": list(self.weights.files),
                "url": self.weights.url,
                "size": self.weights.size,
                "sha256": self.weights.sha256,
            },
            "needs": [{"repo": need.repo} for need in self.needs],
            "speed": None
            if self.speed is None
            else {
                "text_query_ms": self.speed.text_query_ms,
                "images_per_s": self.speed.images_per_s,
            },
            "note": self.note,
        }


def _entry(data: dict[str, Any]) -> RecommendedModel:
    weights = data["weights"]
    speed = data.get("speed")
    return RecommendedModel(
        name=data["name"],
        model=data["model"],
        pretrained=data["pretrained"],
        family=data["family"],
        languages=data["languages"],
        dim=int(data["dim"]),
        params=int(data["params"]),
        weights=HubFiles(
            weights["repo"], tuple(weights["files"]), weights.get("size"), weights.get("sha256")
        ),
        needs=tuple(HubFiles(need["repo"]) for need in data.get("needs", [])),
        speed=Speed(speed["text_query_ms"], speed["images_per_s"]) if speed else None,
        note=data.get("note", ""),
    )


@functools.cache
def recommended_models() -> tuple[RecommendedModel, ...]:
    data = json.loads(TABLE.read_text(encoding="utf-8"))
    return tuple(_entry(row) for row in data["models"])


def table_note() -> str:
    """What the table's figures are and where they come from."""
    return str(json.loads(TABLE.read_text(encoding="utf-8"))["about"])


def _folded(text: str) -> str:
    return text.strip().lower().replace("_", "-")


def find_recommended(name: str, pretrained: str | None = None) -> RecommendedModel | None:
    """The table's row for a `models fetch` name, or a CLIPSEARCH_MODEL (and _PRETRAINED)."""
    wanted = _folded(name)
    for row in recommended_models():
        if wanted == _folded(row.name) or (
            wanted == _folded(row.model) and pretrained in (None, row.pretrained)
        ):
            return row
    return None


def for_weights(family: str, family_name: str, pretrained: str) -> RecommendedModel | None:
    """The row of a model as a loader sees it: its family, its name within the family
    (`ViT-B-16` for `cn-clip:ViT-B-16`) and its pretrained value."""
    for row in recommended_models():
        row_name = row.model.split(":", 1)[1] if ":" in row.model else row.model
        if row.family == family and row_name == family_name and row.pretrained == pretrained:
            return row
    return None


def nearest_names(name: str, names: list[str], n: int = 3) -> list[str]:
    """The known names closest to a mistyped one (difflib), best first."""
    folded = {_folded(known): known for known in names}
    return [folded[hit] for hit in difflib.get_close_matches(_folded(name), folded, n, 0.6)]
