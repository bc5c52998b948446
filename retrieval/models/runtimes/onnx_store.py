"""ONNX exports on disk: one folder per model identity and exporter versions, with a manifest.

    <exports dir>/<identity key>/<versions key>/
        export.json        the model identity, the versions that made it, each tower's inputs
                           and verified difference from torch, and every file's sha256 and size
        image.onnx (+ .data), text.onnx (+ .data), and image.int8.onnx ... once quantized

The manifest is written last (and atomically), so a folder without one is an export that never
finished. An export whose manifest names another model (ModelMismatch) or other versions is
stale: it is rebuilt, never used. A file that is missing, or whose size or sha256 differs from
the manifest's, makes the export corrupt (ExportUnusable): it is never loaded as it is.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from retrieval.errors import ExportUnusable
from retrieval.models.cache import exports_dir
from retrieval.models.identity import ModelIdentity
from retrieval.models.weights import sha256_file

MANIFEST = "export.json"
# Bump when what an export holds changes: every cached export is then rebuilt. 2: the `portable`
# section (preprocessing, tokenizer files, trimming, score rule), to run without torch.
FORMAT = 2
TOWERS = ("image", "text")
# What decides how a graph is written and checked; another version of any makes a new export.
VERSIONED_PACKAGES = ("torch", "onnx", "onnxscript", "onnxruntime")
REBUILD_ADVICE = (
    "Run `clipsearch export --force` to build it again, or set CLIPSEARCH_RUNTIME=torch."
)


@dataclass(frozen=True)
class TowerGraph:
    """One tower's graph: its file and how far its unit embeddings are from torch fp32's."""

    file: str
    max_abs_diff: float  # on the sample inputs it was verified with
    cosine_min: float


@dataclass(frozen=True)
class TowerExport:
    inputs: tuple[str, ...]  # pixels; ids, or ids and mask
    graphs: dict[str, TowerGraph]  # by weights: fp32, int8


@dataclass(frozen=True)
class ExportManifest:
    identity: ModelIdentity
    versions: dict[str, str]
    towers: dict[str, TowerExport]
    files: dict[str, dict[str, Any]]  # file name -> {"sha256", "bytes"}
    context_length: int  # the text tower's full context
    seconds: float = 0.0  # how long the export and its verification took
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "identity": self.identity.to_dict(),
            "versions": self.versions,
            "context_length": self.context_length,
            "seconds": round(self.seconds, 2),
            "towers": {
                name: {
                    "inputs": list(tower.inputs),
                    "graphs": {
                        weights: {
                            "file": graph.file,
                            "max_abs_diff": graph.max_abs_diff,
                            "cosine_min": graph.cosine_min,
                        }
                        for weights, graph in tower.graphs.items()
                    },
                }
                for name, tower in self.towers.items()
            },
            "files": self.files,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportManifest:
        known = {"format", "identity", "versions", "context_length", "seconds", "towers", "files"}
        return cls(
            identity=ModelIdentity.from_dict(data["identity"]),
            versions={str(k): str(v) for k, v in data["versions"].items()},
            towers={
                name: TowerExport(
                    tuple(str(i) for i in tower["inputs"]),
                    {
                        weights: TowerGraph(
                            str(graph["file"]),
                            float(graph["max_abs_diff"]),
                            float(graph["cosine_min"]),
                        )
                        for weights, graph in tower["graphs"].items()
                    },
                )
                for name, tower in data["towers"].items()
            },
            files={str(k): dict(v) for k, v in data["files"].items()},
            context_length=int(data["context_length"]),
            seconds=float(data.get("seconds", 0.0)),
            extra={k: v for k, v in data.items() if k not in known},
        )

    def with_graph(self, tower: str, weights: str, graph: TowerGraph) -> ExportManifest:
        towers = dict(self.towers)
        towers[tower] = replace(towers[tower], graphs={**towers[tower].graphs, weights: graph})
        return replace(self, towers=towers)

    def graph_files(self, weights: str) -> list[str]:
        """The files the graphs of `weights` (fp32, int8) read: each .onnx and its data."""
        names = []
        for tower in self.towers.values():
            graph = tower.graphs.get(weights)
            if graph is not None:
                names += [name for name in self.files if name.startswith(graph.file)]
        return names


def runtime_versions() -> dict[str, str]:
    """The versions of the packages that write and check an export, and the export format."""
    versions = {"format": str(FORMAT)}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "none"
    return versions


def versions_key(versions: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:12]


def model_exports_dir(identity: ModelIdentity, cache_dir: Path | None) -> Path:
    """The folder of every export of one model (one sub-folder per versions key)."""
    return exports_dir(cache_dir) / identity.key


def export_folder(identity: ModelIdentity, cache_dir: Path | None) -> Path:
    """Where this model's export for the installed exporter and runtime lives."""
    return model_exports_dir(identity, cache_dir) / versions_key(runtime_versions())


def read_manifest(folder: Path) -> ExportManifest | None:
    """The folder's manifest; None when there is none (never exported, or not finished)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return ExportManifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ExportUnusable(
            str(folder), f"its manifest {MANIFEST} cannot be read ({exc})", REBUILD_ADVICE
        ) from None


def stale_reason(manifest: ExportManifest, identity: ModelIdentity) -> str | None:
    """Why an export cannot stand for this model as it is installed now; None when it can.
    (A manifest of another model: ModelMismatch's own words.)"""
    if manifest.identity.key != identity.key:
        return (
            f"it was made from another model ({manifest.identity.describe()}), not "
            f"{identity.describe()}"
        )
    versions = runtime_versions()
    if manifest.versions != versions:
        changed = sorted(k for k in versions if manifest.versions.get(k) != versions[k])
        return f"it was made with other versions of {', '.join(changed)}"
    return None


def check_files(folder: Path, manifest: ExportManifest, names: Sequence[str]) -> None:
    """ExportUnusable unless each file is there with the size and sha256 its manifest records."""
    for name in names:
        path = folder / name
        record = manifest.files.get(name)
        if record is None:
            raise ExportUnusable(str(folder), f"{name} is not in its manifest", REBUILD_ADVICE)
        if not path.is_file():
            raise ExportUnusable(str(folder), f"{name} is missing", REBUILD_ADVICE)
        size = path.stat().st_size
        if size != record.get("bytes"):
            raise ExportUnusable(
                str(folder),
                f"{name} has {size} bytes, its manifest says {record.get('bytes')}",
                REBUILD_ADVICE,
            )
        if sha256_file(path) != record.get("sha256"):
            raise ExportUnusable(
                str(folder), f"{name}: sha256 differs from its manifest", REBUILD_ADVICE
            )


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every graph file in the folder (a tower's graph and its data)."""
    return {
        path.name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name.startswith(tuple(f"{tower}." for tower in TOWERS))
    }


def write_manifest(folder: Path, manifest: ExportManifest) -> None:
    """Write the manifest atomically (the export's commit point)."""
    path = folder / MANIFEST
    partial = folder / f".{MANIFEST}.{os.getpid()}"
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(manifest.to_dict(), handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


@contextlib.contextmanager
def export_lock(identity: ModelIdentity, cache_dir: Path | None) -> Iterator[None]:
    """Held while a model's export is built or changed: two processes starting at once (two
    API workers, a server and an indexer) build it once, the second then finds it."""
    folder = model_exports_dir(identity, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def publish(built: Path, folder: Path) -> None:
    """Move a finished export from its build folder to `folder`, replacing what was there, and
    remove the model's exports made with other versions."""
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(built, folder)
    for sibling in folder.parent.iterdir():
        if sibling.is_dir() and sibling != folder:
            shutil.rmtree(sibling, ignore_errors=True)
