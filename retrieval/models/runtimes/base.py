"""The runtime seam: running the towers of a loaded model on a batch.

A runtime is a property of a loaded encoder (CLIPSEARCH_RUNTIME), never a path of its own
through the service: the backend still tokenizes, preprocesses, trims and scores, and each tower
is run by the runtime chosen for it. An export is verified against torch when it is made and
cached by model identity (`onnx_store`), so the identity guard holds for it as for the weights.
Other runtimes (OpenVINO, TensorRT) fit the same seam: a `TowerRuntime` and an entry in
`choice`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from retrieval.models.backend import ModelBackend, TokenBatch

if TYPE_CHECKING:
    import torch


class TowerRuntime(ABC):
    """Runs the towers of one loaded model; returns unnormalised features."""

    name: str  # as CLIPSEARCH_RUNTIME spells it (onnx-int8 for quantized weights)

    @abstractmethod
    def encode_image(self, pixels: Any) -> Any:
        """Features of a preprocessed batch (N, 3, H, W), on the CPU in float32: a torch tensor
        or a numpy array (ONNX Runtime, which takes either)."""

    @abstractmethod
    def encode_text(self, tokens: TokenBatch, *, trim: bool) -> Any:
        """Features of a token batch (on the CPU); `trim` as in `ModelBackend.encode_text`."""

    def describe(self) -> str:
        return self.name


class TorchRuntime(TowerRuntime):
    """The backend's own torch model, on its device and in its precision."""

    name = "torch"

    def __init__(self, backend: ModelBackend, device: str, dtype: torch.dtype) -> None:
        self.backend = backend
        self.device = device
        self.dtype = dtype

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backend.encode_image(pixels.to(self.device, dtype=self.dtype))

    def encode_text(self, tokens: TokenBatch, *, trim: bool) -> torch.Tensor:
        return self.backend.encode_text(tokens.to(self.device), trim=trim)

    def describe(self) -> str:
        precision = str(self.dtype).removeprefix("torch.").replace("float", "fp")
        precision = {"bfp16": "bf16"}.get(precision, precision)
        return f"torch {precision} on {self.device}"


@dataclass(frozen=True)
class Runtimes:
    """The runtime of each tower (one object may run both)."""

    image: TowerRuntime
    text: TowerRuntime

    def describe(self) -> str:
        image, text = self.image.describe(), self.text.describe()
        return image if image == text else f"image {image}, text {text}"
