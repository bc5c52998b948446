"""A tower of a torch model as a module of its own, what the ONNX exporter traces."""

from __future__ import annotations

import torch


class MethodTower(torch.nn.Module):
    """One tower of a model as a module of its own: `forward(pixels)` or `forward(ids)` calls
    one method of the model."""

    def __init__(self, model: torch.nn.Module, method: str) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = getattr(self.model, self.method)(inputs)
        return features
