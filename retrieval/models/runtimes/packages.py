"""The optional packages ONNX exports need, and the error that names the extra installing them."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from retrieval.errors import ConfigError

ONNX_EXTRA = "onnx"  # running exports (no torch)
EXPORT_EXTRA = "export"  # making them (torch, onnx, onnxscript)
RUNTIME_PACKAGES = ("onnxruntime",)  # running an export
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # making one (and checking it)
# Running one without torch: its tokenizers too (open_clip's BPE cleans with ftfy, splits with
# regex; Hugging Face and BERT tokenizers run in `tokenizers`).
EXPORTED_PACKAGES = ("onnxruntime", "tokenizers", "ftfy", "regex")


def missing_packages(packages: Sequence[str]) -> list[str]:
    return [name for name in packages if importlib.util.find_spec(name) is None]


def require_packages(packages: Sequence[str], setting: str, purpose: str) -> None:
    """ConfigError naming the packages that are not installed and the extra that installs them."""
    missing = missing_packages(packages)
    extra = EXPORT_EXTRA if {"onnx", "onnxscript"} & set(missing) else ONNX_EXTRA
    if missing:
        raise ConfigError(
            setting,
            f"{purpose} needs the package{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)}, not installed here; install "
            f"{'them' if len(missing) > 1 else 'it'} with: pip install 'clipsearch[{extra}]'",
        )
