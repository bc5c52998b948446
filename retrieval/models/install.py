"""`clipsearch models import`: install weights carried over by hand where the loaders find them,
after checking them: their sha256 (given, recorded in the table, or the hub cache's own blob
names), their size where recorded, and that their tensors fit the model's architecture."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.errors import ConfigError, WeightsUnavailable
from retrieval.models.cache import clip_cache_dir, hub_cache_dir, imported_repo_dir
from retrieval.models.fetch import weights_source
from retrieval.models.identity import CN_CLIP, HF, OPEN_CLIP, parse_model_name
from retrieval.models.recommended import recommended_models
from retrieval.models.sources import WeightsSource
from retrieval.models.weights import (
    file_tensor_shapes,
    sha256_file,
    state_dict_differences,
    tensor_shapes,
)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")
_CHUNK = 1 << 22


@dataclass
class Installed:
    """What `models import` did."""

    kind: str  # hub-cache-folder, weights-file, model-folder
    target: Path
    models: list[str] = field(default_factory=list)  # the recommended models it serves
    checks: list[str] = field(default_factory=list)  # what was verified
    warnings: list[str] = field(default_factory=list)  # what could not be verified
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": str(self.target),
            "models": self.models,
            "checks": self.checks,
            "warnings": self.warnings,
            "sha256": self.sha256,
        }


def install(
    path: Path,
    *,
    name: str | None,
    pretrained: str | None = None,
    sha256: str | None = None,
    cache_dir: Path | None = None,
    config_dir: Path | None = None,
) -> Installed:
    """Check `path` (a weights file, an hf: model folder, or a hub cache folder models--*) and
    install it. WeightsUnavailable, with nothing installed, when a check fails."""
    path = path.expanduser()
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not _SHA256.fullmatch(sha256):
            raise ConfigError("--sha256", f"{sha256!r} is not a sha256 (64 hexadecimal digits)")
    if not path.exists():
        raise ConfigError("FILE_OR_FOLDER", f"{path} does not exist")
    if path.is_dir() and (path.name.startswith("models--") or (path / "snapshots").is_dir()):
        return _install_hub_folder(path, sha256, cache_dir, config_dir)
    if path.is_dir():
        return _install_model_folder(path, name, sha256, cache_dir)
    return _install_file(path, name, pretrained, sha256, cache_dir, config_dir)


# --- a hub cache folder ---------------------------------------------------------------------


def _install_hub_folder(
    folder: Path, sha256: str | None, cache_dir: Path | None, config_dir: Path | None
) -> Installed:
    if not folder.name.startswith("models--"):
        raise ConfigError(
            "FILE_OR_FOLDER",
            f"{folder} looks like a Hugging Face cache folder but is not named models--ORG--NAME; "
            "copy it under its own name",
        )
    repo = folder.name.removeprefix("models--").replace("--", "/")
    installed = Installed("hub-cache-folder", hub_cache_dir(cache_dir) / folder.name)
    blobs = folder / "blobs"
    checked = 0
    for blob in sorted(blobs.iterdir()) if blobs.is_dir() else []:
        expected = blob.name
        if _SHA256.fullmatch(expected):
            found = sha256_file(blob)
        elif _GIT_SHA1.fullmatch(expected):
            found = _git_blob_sha1(blob)
        else:
            continue
        if found != expected:
            raise WeightsUnavailable(
                f"{blob} is damaged: its content hashes to {found}, but the hub named it by its "
                f"hash {expected}. Nothing was installed; copy the folder again."
            )
        checked += 1
    snapshots = [p for p in (folder / "snapshots").glob("*/**/*") if p.is_symlink() or p.is_file()]
    dangling = [p for p in snapshots if not p.exists()]
    if dangling:
        raise WeightsUnavailable(
            f"{folder} is incomplete: {len(dangling)} files of its snapshots point at blobs that "
            f"are missing (e.g. {dangling[0]}). Copy the whole folder (cp -r keeps its links)."
        )
    if not snapshots:
        raise WeightsUnavailable(f"{folder} holds no snapshot files: nothing to install.")
    installed.checks.append(f"{checked} files match the hashes the hub named them by")
    for row in recommended_models():
        if row.weights.repo == repo or repo in (need.repo for need in row.needs):
            installed.models.append(row.name)
        if row.weights.repo == repo and row.weights.files:
            weights = [p for p in snapshots if p.name in row.weights.files and p.exists()]
            if weights:
                source = weights_source(row.name, None, config_dir)
                _verify_file(weights[0], source, sha256, installed, config_dir)
    if sha256 is not None and installed.sha256 != sha256:
        if not any(sha256_file(p) == sha256 for p in snapshots if p.exists()):
            raise WeightsUnavailable(
                f"No file in {folder} has sha256 {sha256}. Nothing was installed."
            )
        installed.checks.append(f"a file has sha256 {sha256}")
    _merge_hub_folder(folder, installed.target)
    return installed


def _merge_hub_folder(folder: Path, target: Path) -> None:
    """Copy a hub cache folder into the cache: blobs first, then the snapshots that link to
    them, then refs, so that a copy cut short never leaves a link to a missing blob. Blobs are
    named by their content, so merging into a folder that is already there only adds files
    (and refs/main moves to the copied commit); importing twice changes nothing."""
    for part in ("blobs", "snapshots", "refs"):
        source = folder / part
        for path in sorted(source.rglob("*")) if source.is_dir() else []:
            destination = target / path.relative_to(folder)
            if path.is_dir() and not path.is_symlink():
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            if destination.is_symlink() or destination.exists():
                destination.unlink()
            if path.is_symlink():
                destination.symlink_to(os.readlink(path))
            else:
                shutil.copy2(path, destination)


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


# --- an hf: model folder --------------------------------------------------------------------


def _install_model_folder(
    folder: Path, name: str | None, sha256: str | None, cache_dir: Path | None
) -> Installed:
    if not (folder / "config.json").is_file():
        raise ConfigError(
            "FILE_OR_FOLDER",
            f"{folder} is neither a weights file, a Hugging Face model folder (it has no "
            "config.json) nor a hub cache folder (models--ORG--NAME)",
        )
    if name is None:
        raise ConfigError(
            "--name",
            f"say which hub model the folder {folder} is, e.g. --name "
            "hf:OFA-Sys/chinese-clip-vit-base-patch16 (or use it where it is: "
            f"CLIPSEARCH_MODEL=hf:{folder.resolve()})",
        )
    family, repo = parse_model_name(name if ":" in name else f"{HF}:{name}")
    if family != HF or repo.count("/") != 1 or repo.startswith(("/", ".", "~")):
        raise ConfigError("--name", f"a model folder installs as hf:ORG/NAME, not {name}")
    from retrieval.models.families import hf
    from retrieval.models.identity import ModelSpec

    spec = ModelSpec(f"{HF}:{folder}", "", device="cpu")
    config = hf.read_config(folder, spec)
    files = hf.folder_weights(folder, spec)
    installed = Installed("model-folder", imported_repo_dir(repo, cache_dir))
    installed.sha256 = files.sha256
    if sha256 is not None and sha256 != files.sha256:
        raise WeightsUnavailable(
            f"The weights in {folder} have sha256 {files.sha256}, not {sha256}. Nothing was "
            "installed."
        )
    if sha256 is not None:
        installed.checks.append(f"sha256 {sha256}")
    architecture = hf.ARCHITECTURES[config["model_type"]]
    model_config = hf.model_config(folder, spec, architecture)
    import torch

    with torch.device("meta"):
        expected = tensor_shapes(architecture.model_class._from_config(model_config).state_dict())
    found: dict[str, tuple[int, ...]] = {}
    for path in files.files:
        found.update(_file_shapes(path))
    _require_fit(expected, found, f"{folder} ({config['model_type']})", installed)
    installed.models = [row.name for row in recommended_models() if row.weights.repo == repo]
    _copy_folder(folder, installed.target)
    return installed


def _copy_folder(folder: Path, target: Path) -> None:
    """Copy beside the target, then swap it in: a failed copy leaves the old one whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}"
    shutil.copytree(folder, staging, symlinks=False)
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)


# --- one weights file -----------------------------------------------------------------------


def _install_file(
    path: Path,
    name: str | None,
    pretrained: str | None,
    sha256: str | None,
    cache_dir: Path | None,
    config_dir: Path | None,
) -> Installed:
    if name is None:
        name = _release_by_file_name(path.name)
    if name is None:
        examples = ", ".join(row.name for row in recommended_models()[:3])
        raise ConfigError(
            "--name",
            f"say which model the weights in {path.name} are, e.g. --name {examples} (see "
            "clipsearch models), or --name MODEL --pretrained TAG",
        )
    source = weights_source(name, pretrained, config_dir)
    family = parse_model_name(source.model)[0]
    if family == HF:
        raise ConfigError(
            "FILE_OR_FOLDER",
            f"{source.model} is a model folder; import the folder (config.json, weights, "
            "preprocessor and tokenizer files), not one file",
        )
    if not source.files:
        raise ConfigError("--name", f"{source.fetch_name} has no weights file to import")
    if family == CN_CLIP:
        target = clip_cache_dir(cache_dir) / source.files[0]
    else:
        suffix = ".safetensors" if path.suffix == ".safetensors" else ".bin"
        candidates = [f for f in source.files if f.endswith(suffix)] or list(source.files)
        target = imported_repo_dir(source.repo, cache_dir) / candidates[0]
    installed = Installed("weights-file", target)
    installed.models = [row.name for row in recommended_models() if row.name == source.fetch_name]
    _verify_file(path, source, sha256, installed, config_dir)
    _copy_file(path, target, installed.sha256)
    return installed


def _release_by_file_name(filename: str) -> str | None:
    """The recommended Chinese-CLIP model whose released file this is (its name is unique)."""
    for row in recommended_models():
        if row.family == CN_CLIP and filename in row.weights.files:
            return row.name
    return None


def _verify_file(
    path: Path,
    source: WeightsSource,
    sha256: str | None,
    installed: Installed,
    config_dir: Path | None,
) -> None:
    size = path.stat().st_size
    if source.size is not None:
        if size != source.size:
            raise WeightsUnavailable(
                f"{path} is {size:,} bytes; {source.fetch_name}'s {source.files[0]} is "
                f"{source.size:,}. Nothing was installed: copy the file again."
            )
        installed.checks.append(f"size {size:,} bytes")
    digest = sha256_file(path)
    installed.sha256 = digest
    for expected, said in ((sha256, "--sha256"), (source.sha256, "clipsearch's table")):
        if expected is None:
            continue
        if digest != expected:
            raise WeightsUnavailable(
                f"{path} has sha256 {digest}, but {said} says {expected} for "
                f"{source.fetch_name}. Nothing was installed: the file is damaged or another "
                "model's."
            )
        installed.checks.append(f"sha256 {digest} ({said})")
    if sha256 is None and source.sha256 is None:
        installed.warnings.append(
            f"sha256 {digest} not compared: none is recorded for {source.fetch_name} (give "
            "--sha256 with the value the hub shows for the file)"
        )
    expected_shapes, why_not = _architecture_shapes(source, config_dir)
    if expected_shapes is None:
        installed.warnings.append(f"tensors not compared with the architecture: {why_not}")
        return
    found = _file_shapes(path)
    _require_fit(expected_shapes, found, f"{path}", installed, source.fetch_name)


def _require_fit(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    what: str,
    installed: Installed,
    model: str = "",
) -> None:
    missing_or_reshaped = {key: shape for key, shape in expected.items() if found.get(key) != shape}
    if missing_or_reshaped:
        subset = {key: found[key] for key in missing_or_reshaped if key in found}
        detail = state_dict_differences(missing_or_reshaped, subset)
        raise WeightsUnavailable(
            f"{what} does not hold the weights of {model or 'this model'}: {detail}. Nothing "
            "was installed."
        )
    installed.checks.append(f"{len(expected)} tensors fit the architecture")


def _architecture_shapes(
    source: WeightsSource, config_dir: Path | None
) -> tuple[dict[str, tuple[int, ...]] | None, str]:
    """The tensor shapes the model's architecture expects (built on the meta device: no memory,
    no weights), or None and why they cannot be known here."""
    import torch

    family, family_name = parse_model_name(source.model)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip warns that the model has no weights
    try:
        with torch.device("meta"):
            if family == OPEN_CLIP:
                import open_clip

                from retrieval.models.weights import register_model_configs

                register_model_configs(config_dir)
                model: Any = open_clip.create_model(
                    family_name, pretrained=None, device="meta", pretrained_text=False
                )
            else:
                from retrieval.models.families.chinese_clip import CLIP, model_config

                model = CLIP(**model_config(family_name, config_dir).model_info)
    except Exception as exc:  # noqa: BLE001 - e.g. a text tower whose config is not here yet
        return None, f"{source.model} cannot be built here ({type(exc).__name__}: {str(exc)[:200]})"
    finally:
        logging.disable(previous)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}, ""


def _copy_file(source: Path, target: Path, sha256: str | None) -> None:
    """Copy next to the target, check the copy's sha256, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    staging = Path(staging_name)
    try:
        digest = hashlib.sha256()
        with open(source, "rb") as reader, os.fdopen(handle, "wb") as writer:
            while block := reader.read(_CHUNK):
                digest.update(block)
                writer.write(block)
            writer.flush()
            os.fsync(writer.fileno())
        if sha256 is not None and digest.hexdigest() != sha256:
            raise WeightsUnavailable(
                f"{source} changed while it was copied (sha256 {digest.hexdigest()}, checked "
                f"{sha256}). Nothing was installed."
            )
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensors' shapes in a weights file, as the loaders name them ("module." prefixes of
    checkpoints saved from DistributedDataParallel dropped)."""
    try:
        shapes = file_tensor_shapes(path)
    except ValueError as exc:
        raise WeightsUnavailable(f"{exc}. Nothing was installed.") from None
    return {key.removeprefix("module."): shape for key, shape in shapes.items()}
