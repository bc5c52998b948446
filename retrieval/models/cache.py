"""Where model weights live on this machine, and finding them there without the network.

Three places for weights, each the one its loader already reads:
- the Hugging Face hub cache (`models--ORG--NAME/` folders): CLIPSEARCH_MODEL_CACHE_DIR when
  set, else huggingface_hub's own (`$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`);
- the folder of `clipsearch models import` (`<repo as ORG--NAME>/<file>`): under
  CLIPSEARCH_MODEL_CACHE_DIR when set, else `$XDG_CACHE_HOME/clipsearch/models`;
- Chinese-CLIP's own folder of release files (`~/.cache/clip`, or CLIPSEARCH_MODEL_CACHE_DIR).

And one for what clipsearch derives from weights: ONNX exports, beside the imports.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

# cn_clip's default download root (its `load_from_name`), where its users already keep files.
CLIP_CACHE_DIR = Path.home() / ".cache" / "clip"
IMPORTS_FOLDER = "clipsearch-imports"  # under CLIPSEARCH_MODEL_CACHE_DIR
EXPORTS_FOLDER = "clipsearch-exports"  # under CLIPSEARCH_MODEL_CACHE_DIR


def hub_endpoint() -> str:
    """The hub's address (HF_ENDPOINT, e.g. a mirror, or https://huggingface.co)."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def hub_cache_dir(cache_dir: Path | None) -> Path:
    """The Hugging Face hub cache the loaders read (and `models fetch` writes)."""
    if cache_dir is not None:
        return Path(cache_dir)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def clip_cache_dir(cache_dir: Path | None) -> Path:
    """Chinese-CLIP's folder of release files."""
    return Path(cache_dir) if cache_dir is not None else CLIP_CACHE_DIR


def clipsearch_cache_dir() -> Path:
    """clipsearch's own cache folder: `$XDG_CACHE_HOME/clipsearch` (`~/.cache/clipsearch`)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clipsearch"


def imports_dir(cache_dir: Path | None) -> Path:
    """Where `clipsearch models import` puts files carried over by hand."""
    if cache_dir is not None:
        return Path(cache_dir) / IMPORTS_FOLDER
    return clipsearch_cache_dir() / "models"


def exports_dir(cache_dir: Path | None) -> Path:
    """Where ONNX exports of models are kept, one folder per model identity."""
    if cache_dir is not None:
        return Path(cache_dir) / EXPORTS_FOLDER
    return clipsearch_cache_dir() / "exports"


def repo_folder_name(repo: str) -> str:
    """`laion/CLIP-ViT-B-32` -> `laion--CLIP-ViT-B-32` (the hub cache's own spelling)."""
    return repo.replace("/", "--")


def imported_repo_dir(repo: str, cache_dir: Path | None) -> Path:
    return imports_dir(cache_dir) / repo_folder_name(repo)


def cached_repo_file(repo: str, filenames: Sequence[str], cache_dir: Path | None) -> Path | None:
    """The first of `filenames` of the hub repo that is on this machine (imported by hand, or in
    the hub cache); never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    imported = imported_repo_dir(repo, cache_dir)
    for name in filenames:
        if (imported / name).is_file():
            return imported / name
    for name in filenames:
        try:
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        except Exception:  # noqa: BLE001 - a malformed id or cache: "not here"
            continue
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    return None


def cached_repo_snapshot(
    repo: str, cache_dir: Path | None, *, hub_only: bool = False
) -> Path | None:
    """The hub repo's folder on this machine (imported by hand, unless `hub_only`, or its
    snapshot in the hub cache); never touches the network.

    `hub_only` for the repos transformers reads by name (a tokenizer, a text tower's config),
    which it looks for in the hub cache alone."""
    imported = imported_repo_dir(repo, cache_dir)
    if not hub_only and imported.is_dir():
        return imported
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, cache_dir=cache_dir, local_files_only=True))
    except Exception:  # noqa: BLE001 - a bad id, a missing snapshot: all mean "not here"
        return None


def weights_here(
    family: str, repo: str, files: Sequence[str], needs: Sequence[str], cache_dir: Path | None
) -> bool:
    """Whether a model's weights (`files` of `repo`, or the repo's folder when there are none)
    and the repos it reads (`needs`) are all on this machine where its loader looks."""
    if family == "cn_clip" and any((clip_cache_dir(cache_dir) / f).is_file() for f in files):
        found = True
    elif files:
        found = cached_repo_file(repo, files, cache_dir) is not None
    elif repo:
        folder = cached_repo_snapshot(repo, cache_dir)
        found = folder is not None and (folder / "config.json").is_file()
    else:
        found = True
    return found and all(
        cached_repo_snapshot(need, cache_dir, hub_only=True) is not None for need in needs
    )
