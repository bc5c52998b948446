"""Training data on its way to the model: the train/validation split, the pixels of samples
(pre-decoded into one tensor when they fit), and endless shuffled micro-batches."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from retrieval.errors import ImageError
from retrieval.training.data import TrainingSample, load_sample_image


def split_samples(
    samples: Sequence[TrainingSample], fraction: float, seed: int
) -> tuple[list[TrainingSample], list[TrainingSample]]:
    """(train, val) with round(fraction * n) validation samples, stratified by class.

    Each class gives its proportional share (the rounding remainders go to randomly chosen
    classes), and always keeps at least one training sample.
    """
    target = round(len(samples) * fraction)
    if target == 0 or len(samples) < 2:
        return list(samples), []
    rng = random.Random(seed)
    by_class: dict[str | None, list[int]] = {}
    for index, sample in enumerate(samples):
        by_class.setdefault(sample.label, []).append(index)
    groups = list(by_class.values())
    quotas = [math.floor(len(members) * fraction) for members in groups]
    spare = sorted(
        range(len(groups)),
        key=lambda g: (-(len(groups[g]) * fraction - quotas[g]), rng.random()),
    )
    for g in spare[: max(0, target - sum(quotas))]:
        quotas[g] += 1
    val: set[int] = set()
    for members, quota in zip(groups, quotas, strict=True):
        val.update(rng.sample(members, min(quota, len(members) - 1)))
    train = [s for i, s in enumerate(samples) if i not in val]
    return train, [s for i, s in enumerate(samples) if i in val]


class ImageSource:
    """Preprocessed pixels of samples, by index: pre-decoded in one tensor, or decoded on demand."""

    def __init__(
        self,
        samples: Sequence[TrainingSample],
        preprocess: Callable[[Any], torch.Tensor],
        *,
        max_pixels: int,
        cache_bytes: int,
        workers: int,
    ) -> None:
        self.samples = list(samples)
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.workers = max(1, workers)
        self.warnings: list[str] = []
        self.cache: torch.Tensor | None = None
        # The first decodable sample tells the tensor size (map is lazy: it stops there).
        loaded = map(self._load, range(len(self.samples)))
        probe = next((t for t in loaded if isinstance(t, torch.Tensor)), None)
        per_sample = int(probe.numel()) * 2 if isinstance(probe, torch.Tensor) else 0
        self.usable = list(range(len(self.samples)))
        if per_sample and per_sample * len(self.samples) <= cache_bytes:
            self._fill_cache(probe.shape)  # type: ignore[union-attr]

    def _load(self, index: int) -> torch.Tensor | ImageError:
        try:
            image = load_sample_image(self.samples[index], max_pixels=self.max_pixels)
        except ImageError as exc:
            return exc
        return self.preprocess(image)

    def _fill_cache(self, shape: torch.Size) -> None:
        cache = torch.empty((len(self.samples), *shape), dtype=torch.float16)
        ok = []
        # Pillow and torchvision release the GIL for most of the work, so threads help.
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for index, item in enumerate(pool.map(self._load, range(len(self.samples)))):
                if isinstance(item, ImageError):
                    self.warnings.append(f"{self.samples[index].image}: {item.reason}; skipped")
                    continue
                cache[index] = item
                ok.append(index)
        self.cache = cache
        self.usable = ok

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        """Pixels (float32) of the given sample indices; undecodable ones are dropped."""
        if self.cache is not None:
            return self.cache[list(indices)].float(), list(indices)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            loaded = list(pool.map(self._load, indices))
        kept = [i for i, t in zip(indices, loaded, strict=True) if isinstance(t, torch.Tensor)]
        for index, item in zip(indices, loaded, strict=True):
            if isinstance(item, ImageError):
                message = f"{self.samples[index].image}: {item.reason}; skipped"
                if message not in self.warnings:
                    self.warnings.append(message)
        tensors = [t for t in loaded if isinstance(t, torch.Tensor)]
        if not tensors:
            return torch.empty(0), []
        return torch.stack(tensors), kept


def micro_batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless shuffled batches of positions 0..count-1; each epoch drops its short remainder."""
    size = min(batch_size, count)
    while True:
        order = torch.randperm(count, generator=generator).tolist()
        for start in range(0, count - size + 1, size):
            yield order[start : start + size]
