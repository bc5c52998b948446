"""`clipsearch models fetch`: download a model's weights (and the tokenizer or text-tower repos it
reads) from the Hugging Face hub into the cache the loaders read."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.errors import ConfigError, WeightsUnavailable
from retrieval.models.cache import hub_cache_dir, hub_endpoint, repo_folder_name
from retrieval.models.identity import CN_CLIP, OPEN_CLIP, ModelSpec, parse_model_name
from retrieval.models.recommended import find_recommended, nearest_names, recommended_models
from retrieval.models.sources import WeightsSource, from_row
from retrieval.models.weights import RANDOM_INIT, host_resolves, sha256_file

# The files of a tokenizer or a text tower's config (never a repo's weights).
CONFIG_PATTERNS = ("*.json", "*.txt", "*.model", "*.tiktoken")
# Weights transformers reads from a model folder, safetensors first.
SAFETENSORS_PATTERNS = ("model.safetensors", "model.safetensors.index.json", "model-*.safetensors")
TORCH_BIN_PATTERNS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin")


@dataclass(frozen=True)
class FetchedFile:
    repo: str
    path: Path
    size: int
    sha256: str


@dataclass
class FetchReport:
    source: WeightsSource
    files: list[FetchedFile] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)  # hub cache folders, to carry elsewhere

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.source.model,
            "pretrained": self.source.pretrained,
            "files": [
                {"repo": f.repo, "path": str(f.path), "size": f.size, "sha256": f.sha256}
                for f in self.files
            ],
            "folders": [str(folder) for folder in self.folders],
        }


def weights_source(name: str, pretrained: str | None, config_dir: Path | None) -> WeightsSource:
    """What `models fetch NAME [--pretrained P]` downloads: a row of the recommended table, an
    open_clip model and tag, a Chinese-CLIP release, or an hf: hub id."""
    row = find_recommended(name, pretrained)
    if row is not None:
        return from_row(row)
    family, family_name = parse_model_name(name)
    if family == OPEN_CLIP:
        return _open_clip_source(name, family_name, pretrained, config_dir)
    if family == CN_CLIP:
        return _release_source(name, family_name)
    if family_name.startswith(("/", ".", "~")) or family_name.count("/") != 1:
        raise ConfigError("NAME", f"{name} is a folder, not a hub id (ORG/NAME) to download")
    return WeightsSource(name, "", family_name, ())


def _open_clip_source(
    name: str, family_name: str, pretrained: str | None, config_dir: Path | None
) -> WeightsSource:
    import open_clip

    from retrieval.models.weights import (
        hf_names,
        open_clip_source,
        register_model_configs,
        unknown_tag_reason,
    )

    register_model_configs(config_dir)
    if open_clip.get_model_config(family_name) is None:
        known = [row.name for row in recommended_models()] + open_clip.list_models()
        nearest = nearest_names(name, known)
        guess = f" Did you mean {' or '.join(nearest)}?" if nearest else ""
        raise ConfigError(
            "NAME",
            f"{name} is neither a recommended model nor an open_clip model.{guess} "
            "`clipsearch models` lists the recommended ones.",
        )
    if pretrained is None:
        tags = open_clip.list_pretrained_tags_by_model(family_name)
        raise ConfigError(
            "--pretrained",
            f"{name} is not in the recommended table: say which weights with --pretrained "
            f"(its tags: {', '.join(tags) or 'none'})",
        )
    if pretrained.strip().lower() in RANDOM_INIT:
        # Random weights: only the repos the model reads at creation (a tokenizer).
        needs = tuple(dict.fromkeys(repo for _, repo in hf_names(family_name)))
        return WeightsSource(name, pretrained, "", (), needs)
    source = open_clip_source(family_name, pretrained)
    if source is None:
        spec = ModelSpec(family_name, pretrained)
        raise ConfigError("--pretrained", unknown_tag_reason(spec))
    if not source.repo:
        raise ConfigError(
            "--pretrained",
            f"{name} / {pretrained} is not on the Hugging Face hub; download {source.url} and "
            "run clipsearch models import FILE",
        )
    return source


def _release_source(name: str, family_name: str) -> WeightsSource:
    try:
        from retrieval.models.families.chinese_clip import release_source, releases
    except ImportError:
        raise ConfigError(
            "NAME",
            f"{name} is not in the recommended table, and naming other Chinese-CLIP models "
            "needs the cn_clip package: pip install 'clipsearch[chinese]'",
        ) from None
    release = releases().get(family_name)
    if release is None:
        nearest = nearest_names(family_name, list(releases()))
        guess = f" (did you mean cn-clip:{' or cn-clip:'.join(nearest)}?)" if nearest else ""
        raise ConfigError(
            "NAME",
            f"Chinese-CLIP has no released checkpoint for {family_name}{guess}; released: "
            f"{', '.join(releases())}",
        )
    return release_source(release)


@contextlib.contextmanager
def _progress_bars(shown: bool) -> Iterator[None]:
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    if shown:
        enable_progress_bars()
    else:
        disable_progress_bars()
    try:
        yield
    finally:
        (disable_progress_bars if was_disabled else enable_progress_bars)()


def offline_help(source: WeightsSource, endpoint: str) -> str:
    return (
        f"Cannot download {source.fetch_name}: the hub {endpoint} is unreachable from here (no "
        "internet access, or HF_ENDPOINT names a mirror that does not answer).\n"
        f"{source.describe()}\n"
        f"Run `clipsearch models fetch {source.fetch_name}` on a machine with internet access, "
        "copy the folders it prints over, and run `clipsearch models import FOLDER` here."
    )


def fetch(source: WeightsSource, cache_dir: Path | None, progress: bool = True) -> FetchReport:
    """Download `source` into the hub cache (`cache_dir`, else huggingface_hub's own).

    Fails in seconds with WeightsUnavailable when the hub does not answer."""
    endpoint = hub_endpoint()
    if not host_resolves(endpoint):
        raise WeightsUnavailable(offline_help(source, endpoint))
    report = FetchReport(source)
    with _progress_bars(progress):
        if source.repo and source.files:
            path = _download_file(source, cache_dir)
            report.files.append(_checked(source, path))
        elif source.repo:
            for path in _download_folder(source.repo, cache_dir, source):
                report.files.append(FetchedFile(source.repo, path, path.stat().st_size, ""))
        for repo in source.needs:
            _download_repo(repo, CONFIG_PATTERNS, cache_dir, source)
    repos = [source.repo] if source.repo else []
    for repo in dict.fromkeys([*repos, *source.needs]):
        report.folders.append(hub_cache_dir(cache_dir) / f"models--{repo_folder_name(repo)}")
    return report


def _failed(source: WeightsSource, what: str, exc: Exception) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"Cannot download {what} for {source.fetch_name}: {type(exc).__name__}: "
        f"{str(exc)[:300]}\n{source.describe()}"
    )


def _download_file(source: WeightsSource, cache_dir: Path | None) -> Path:
    """The first of the source's files that the repo has (open_clip's order: safetensors
    first), downloaded."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    for name in source.files:
        try:
            return Path(huggingface_hub.hf_hub_download(source.repo, name, cache_dir=cache_dir))
        except EntryNotFoundError:
            continue
        except Exception as exc:  # noqa: BLE001 - network and hub errors are many; one message
            raise _failed(source, f"{source.repo}/{name}", exc) from None
    raise WeightsUnavailable(
        f"Cannot download {source.fetch_name}: the repo {source.repo} has none of "
        f"{', '.join(source.files)}."
    )


def _checked(source: WeightsSource, path: Path) -> FetchedFile:
    """The downloaded file with its size and sha256, checked against the table's."""
    size, digest = path.stat().st_size, sha256_file(path)
    if (source.size is not None and size != source.size) or (
        source.sha256 is not None and digest != source.sha256
    ):
        raise WeightsUnavailable(
            f"The download of {source.fetch_name} ({path}) is {size:,} bytes with sha256 "
            f"{digest}, but clipsearch records {source.size} bytes and sha256 {source.sha256}. "
            "It is not used: delete it and fetch again."
        )
    return FetchedFile(source.repo, path, size, digest)


def _download_folder(repo: str, cache_dir: Path | None, source: WeightsSource) -> list[Path]:
    """An hf: model's folder: config, preprocessor and tokenizer files and one set of weights
    (safetensors where the repo has them), never the repo's other formats."""
    import huggingface_hub

    try:
        names = huggingface_hub.HfApi().list_repo_files(repo)
    except Exception as exc:  # noqa: BLE001 - network and hub errors are many; one message
        raise _failed(source, f"the file list of {repo}", exc) from None
    has_safetensors = any(fnmatch.fnmatch(n, p) for n in names for p in SAFETENSORS_PATTERNS)
    patterns = (
        *CONFIG_PATTERNS,
        *(SAFETENSORS_PATTERNS if has_safetensors else TORCH_BIN_PATTERNS),
    )
    folder = _download_repo(repo, patterns, cache_dir, source)
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in patterns)
    )


def _download_repo(
    repo: str, patterns: tuple[str, ...], cache_dir: Path | None, source: WeightsSource
) -> Path:
    import huggingface_hub

    try:
        return Path(
            huggingface_hub.snapshot_download(
                repo, cache_dir=cache_dir, allow_patterns=list(patterns)
            )
        )
    except Exception as exc:  # noqa: BLE001 - network and hub errors are many; one message
        raise _failed(source, f"the files of {repo}", exc) from None
