"""Finding model weights: a local checkpoint, the hub cache, or a download; never a silent miss.

A machine without internet gets one clear error that says what to do, after a quick DNS probe
instead of a minute of retries.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from retrieval.errors import WeightsUnavailable
from retrieval.models.cache import cached_repo_file, clip_cache_dir, hub_endpoint
from retrieval.models.identity import ModelSpec
from retrieval.models.recommended import nearest_names
from retrieval.models.sources import WeightsSource, source_for

# `pretrained` values that mean "no weights": only for timing benchmarks and the
# no-weights demo; results carry no meaning and the CLI says so.
RANDOM_INIT = frozenset({"", "none", "random"})
BUNDLED_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered_dirs: set[str] = set()
_MODEL_CONFIG_KEYS = {"embed_dim", "vision_cfg", "text_cfg"}  # what open_clip takes for a model
_register_lock = threading.Lock()


def register_model_configs(extra_dir: Path | None = None) -> None:
    """Register the bundled configs and any user configs (open_clip JSON files) once.

    open_clip keeps one registry a process, where the last directory registered wins a name.
    The configs of `extra_dir` are made to win whenever it is asked for, so that a process
    that loads models of two config directories with a name in common (or a config edited
    since) gets the one it asked for."""
    import open_clip

    dirs = [BUNDLED_CONFIG_DIR] + ([extra_dir] if extra_dir else [])
    with _register_lock:
        for directory in dirs:
            key = str(Path(directory).resolve())
            if key in _registered_dirs:
                continue
            if not Path(directory).is_dir():
                raise WeightsUnavailable(f"Model config directory {directory} does not exist.")
            open_clip.add_model_config(directory)
            _registered_dirs.add(key)
        if extra_dir:
            for path in sorted(Path(extra_dir).glob("*.json")):
                try:
                    config = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue  # open_clip skips it too, or fails on it with its own message
                is_model = isinstance(config, dict) and _MODEL_CONFIG_KEYS <= set(config)
                if is_model and open_clip.get_model_config(path.stem) != config:
                    open_clip.add_model_config(path)


def is_open_clip_tag(value: str) -> bool:
    """Whether `value` is one of open_clip's pretrained tags (`laion2b_s34b_b79k`, `webli`, ...).

    The default CLIPSEARCH_PRETRAINED is one; the other families read it as "this model's own
    weights", so that choosing a model is one setting."""
    import open_clip

    return value in {tag for _, tag in open_clip.list_pretrained()}


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# Files next to the vocabulary that change how a Hugging Face tokenizer splits text.
TOKENIZER_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def tokenizer_digest(folder: Path, tokenizer: Any) -> str:
    """A digest of the tokenizer's files (names and contents) as they are in the folder."""
    names = [*type(tokenizer).vocab_files_names.values(), *TOKENIZER_CONFIG_FILES]
    digest = hashlib.sha256()
    for name in sorted(set(names)):
        if (folder / name).is_file():
            digest.update(f"{name} {sha256_file(folder / name)}\n".encode())
    return digest.hexdigest()


def host_resolves(url: str, timeout: float = 3.0) -> bool:
    """A quick DNS probe, so an offline machine fails in seconds, not after a minute of retries."""
    host = urlparse(url).hostname or ""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.getaddrinfo(host, 443)
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def weights_help(spec: ModelSpec, reason: str, source: WeightsSource | None = None) -> str:
    """The message of a WeightsUnavailable: what failed, and (for weights that come from the
    hub) the repo, file, size and sha256, and the command that gets them."""
    lines = [f"Cannot load weights '{spec.pretrained}' for model {spec.name}: {reason}"]
    if source is not None:
        lines.append(source.howto(spec.cache_dir))
        lines.append(
            "  * or set CLIPSEARCH_PRETRAINED (or --pretrained) to a local checkpoint file "
            "(.pt, .bin or .safetensors)."
        )
    else:
        lines.append(
            "Set CLIPSEARCH_PRETRAINED (or --pretrained) to a local checkpoint file (.pt, .bin or "
            "or .safetensors), or to a pretrained tag (see `clipsearch models` for the "
            "recommended ones)."
        )
    return "\n".join(lines)


def hf_names(name: str) -> list[tuple[str, str]]:
    """(config key, value) of the Hugging Face names an open_clip model reads at creation: an HF
    tokenizer or HF text tower's config (SigLIP, XLM-R and NLLB models); their weights come with
    the checkpoint."""
    import open_clip

    text_cfg = (open_clip.get_model_config(name) or {}).get("text_cfg", {})
    keys = ("hf_tokenizer_name", "hf_model_name")
    return [(key, text_cfg[key]) for key in keys if text_cfg.get(key)]


def hub_files(cfg: dict[str, Any]) -> tuple[str, tuple[str, ...]] | None:
    """(repo, file names in open_clip's order of preference) of a tag's hub source, or None."""
    from open_clip import pretrained as oc_pretrained

    hub = cfg.get("hf_hub", "")
    if not hub:
        return None
    # 'org/name/file.bin', or 'org/name/' for open_clip's default file name.
    repo, filename = os.path.split(hub)
    filename = filename or "open_clip_pytorch_model.bin"
    alternatives: Callable[[str], Any] = getattr(
        oc_pretrained, "_get_safe_alternatives", lambda name: []
    )
    return repo, tuple(dict.fromkeys([*alternatives(filename), filename]))


def open_clip_source(name: str, tag: str) -> WeightsSource | None:
    """Where open_clip gets the weights of `name` / `tag` (with the table's figures when the
    model is a recommended one); None for a tag open_clip does not know."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        return None
    needs = tuple(dict.fromkeys(repo for _, repo in hf_names(name) if not _is_local(repo)))
    known = source_for(name, tag)
    hub = hub_files(cfg)
    if hub is None:
        url = str(cfg.get("url", ""))
        file = os.path.basename(urlparse(url).path)
        return WeightsSource(name, tag, "", (file,) if file else (), needs, url=url)
    repo, files = hub
    if known is not None and known.repo == repo:
        return WeightsSource(
            name, tag, repo, files, needs, known.size, known.approx_size, known.sha256
        )
    return WeightsSource(name, tag, repo, files, needs)


def _is_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def _cached_tag_file(cfg: dict[str, Any], cache_dir: Path | None) -> str | None:
    """The local file for a pretrained tag if it is already here (imported by hand or in the
    hub cache); never touches the network."""
    if cfg.get("file"):
        return str(cfg["file"])
    hub = hub_files(cfg)
    if hub is not None:
        found = cached_repo_file(hub[0], hub[1], cache_dir)
        if found is not None:
            return str(found)
    url = cfg.get("url", "")
    if url:
        target = clip_cache_dir(cache_dir) / os.path.basename(urlparse(url).path)
        if target.is_file():
            return str(target)
    return None


def unknown_tag_reason(spec: ModelSpec) -> str:
    """Why a pretrained value that is neither a file nor a tag of the model is refused: the
    nearest known tags first (a typo), then every tag of the model."""
    import open_clip

    tags = list(open_clip.list_pretrained_tags_by_model(spec.family_name))
    nearest = nearest_names(spec.pretrained, tags)
    guess = f" Did you mean {' or '.join(repr(tag) for tag in nearest)}?" if nearest else ""
    return (
        f"it is neither an existing file nor a known tag for {spec.family_name}.{guess} "
        f"Known tags: {', '.join(tags) or 'none'}."
    )


def resolve_weights(spec: ModelSpec) -> tuple[str | None, dict[str, Any]]:
    """Return (checkpoint path or None for random init, preprocess overrides from the tag)."""
    import open_clip

    if spec.pretrained.lower() in RANDOM_INIT:
        return None, {}
    if os.path.isfile(spec.pretrained):
        return spec.pretrained, {}
    cfg = open_clip.get_pretrained_cfg(spec.family_name, spec.pretrained)
    if not cfg:
        if os.sep in spec.pretrained or spec.pretrained.endswith((".pt", ".bin", ".safetensors")):
            raise WeightsUnavailable(weights_help(spec, "that checkpoint file does not exist."))
        raise WeightsUnavailable(weights_help(spec, unknown_tag_reason(spec)))
    overrides = {
        "image_mean": cfg.get("mean"),
        "image_std": cfg.get("std"),
        "image_interpolation": cfg.get("interpolation"),
        "image_resize_mode": cfg.get("resize_mode"),
        "force_quick_gelu": bool(cfg.get("quick_gelu", False)),
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    cached = _cached_tag_file(cfg, spec.cache_dir)
    if cached:
        return cached, overrides
    source = open_clip_source(spec.family_name, spec.pretrained)
    where = hub_endpoint() if cfg.get("hf_hub") else cfg.get("url", "")
    if not where or not host_resolves(where):
        raise WeightsUnavailable(
            weights_help(
                spec, "they are not in the local cache and the hub is unreachable.", source
            )
        )
    try:
        path = open_clip.download_pretrained(
            cfg, cache_dir=str(spec.cache_dir) if spec.cache_dir else None
        )
    except Exception as exc:  # noqa: BLE001 - hub errors are many; the user needs one message
        raise WeightsUnavailable(weights_help(spec, f"download failed ({exc}).", source)) from None
    if not path:
        raise WeightsUnavailable(weights_help(spec, "the tag has no download source.", source))
    return str(path), overrides


@dataclass(frozen=True)
class CheckpointFile:
    """The tensors of a weights file, and clipsearch's fine-tuning metadata when it has some."""

    state_dict: dict[str, Any]  # name -> torch.Tensor
    meta: dict[str, Any]


def read_checkpoint_file(path: Path) -> CheckpointFile:
    """A `{"state_dict": ...}` checkpoint (clipsearch fine-tuning, cn_clip releases), a bare
    state dict (.pt/.bin), or a .safetensors file. ValueError saying what is wrong with it."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path))
        else:
            # weights_only: a checkpoint is data; unpickling arbitrary objects would run code.
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - loading fails in many ways; one message
        raise ValueError(f"{path} is not a readable checkpoint ({str(exc)[:300]})") from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise ValueError(f"{path} holds no state dict of model weights")
    meta = loaded.get("clipsearch") if isinstance(loaded, dict) else None
    return CheckpointFile(state, meta if isinstance(meta, dict) else {})


def file_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensors' names and shapes in a weights file (.safetensors, or a torch state dict,
    bare or under "state_dict"), without reading the tensors where possible. ValueError saying
    what is wrong with an unreadable file."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        try:
            loaded: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in many ways; one message
        raise ValueError(f"{path} is not a readable weights file ({str(exc)[:200]})") from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict of model weights")
    return {key: tuple(value.shape) for key, value in state.items() if hasattr(value, "shape")}


def tensor_shapes(state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


def state_dict_differences(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]
) -> str:
    """What keeps weights of shapes `found` from loading into a model with `expected` tensors,
    for an error message ("" when nothing)."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    reshaped = [
        f"{key} {found[key]} (this model: {shape})"
        for key, shape in expected.items()
        if key in found and found[key] != shape
    ]
    kinds = ((reshaped, "of another shape"), (missing, "missing"), (unexpected, "unexpected"))
    return "; ".join(
        f"{len(items)} {what} (e.g. {', '.join(items[:3])})" for items, what in kinds if items
    )
