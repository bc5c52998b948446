"""The optional packages ONNX exports need, and the error that names the extra installing them."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from retrieval.errors import ConfigError

ONNX_EXTRA = "onnx"
RUNTIME_PACKAGES = ("onnxruntime",)  # running an export
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # making one (and checking it)


def missing_packages(packages: Sequence[str]) -> list[str]:
    return [name for name in packages if importlib.util.find_spec(name) is None]


def require_packages(packages: Sequence[str], setting: str, purpose: str) -> None:
    """ConfigError naming the packages that are not installed and the extra that installs them."""
    missing = missing_packages(packages)
    if missing:
        raise ConfigError(
            setting,
            f"{purpose} needs the package{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)}, not installed here; install "
            f"{'them' if len(missing) > 1 else 'it'} with: pip install 'clipsearch[{ONNX_EXTRA}]'",
        )
