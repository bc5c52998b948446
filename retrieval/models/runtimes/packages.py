"""The optional packages (torch; what ONNX exports need), and the errors that name the extra
installing them."""

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


def torch_installed() -> bool:
    """Whether torch can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # blocked, or set to None in sys.modules
        return False


TORCH_EXTRA = "torch"  # the pip extra that installs torch, torchvision and open_clip


def torch_missing(setting: str, purpose: str) -> ConfigError:
    """The error of a command or setting that needs torch where it is not installed."""
    return ConfigError(
        setting,
        f"{purpose} needs torch, not installed here; install it with: "
        f"pip install 'clipsearch[{TORCH_EXTRA}]'",
    )


def require_torch(setting: str, purpose: str) -> None:
    """`torch_missing` unless torch is installed (before anything imports it)."""
    if not torch_installed():
        raise torch_missing(setting, purpose)
