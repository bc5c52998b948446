"""A model's image preprocessing as data, and its numpy + Pillow implementation.

An export records the steps of the family's transform (`describe.image_steps` reads them off
torchvision's Compose at export time); `ImagePreprocess` replays them with the same Pillow calls
torchvision makes on a PIL image (its Resize is `Image.resize`, its CenterCrop `Image.crop`), so
the pixels equal torch's up to float rounding. Steps:

- `{"op": "resize", "size": [s] | [h, w], "interpolation": "bicubic", "max_size": null}`
  (one number: the shorter side, the longer one scaled and truncated, as torchvision does)
- `{"op": "center_crop", "size": [h, w]}` (zero padding where the image is smaller)
- `{"op": "rgb"}` (`convert("RGB")` unless it is RGB already), `{"op": "convert", "mode": m}`
- `{"op": "to_array"}` (uint8 HWC -> float32 CHW / 255) and `{"op": "normalize", "mean", "std"}`
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
OPS = ("resize", "center_crop", "rgb", "convert", "to_array", "normalize")


class PreprocessUnsupported(ValueError):
    """A step this implementation does not replay (the export then cannot run without torch)."""


def resized_size(
    height: int, width: int, size: Sequence[int], max_size: int | None
) -> tuple[int, int]:
    """(height, width) after a resize to `size`: both sides, or the shorter side (see above)."""
    if len(size) == 2:
        return int(size[0]), int(size[1])
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = int(size[0]), int(int(size[0]) * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), int(max_size)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _resize(image: Image.Image, step: dict[str, Any]) -> Image.Image:
    height, width = resized_size(image.height, image.width, step["size"], step.get("max_size"))
    if (height, width) == (image.height, image.width):
        return image
    return image.resize((width, height), INTERPOLATIONS[step["interpolation"]])


def _center_crop(image: Image.Image, step: dict[str, Any]) -> Image.Image:
    crop_height, crop_width = (int(v) for v in step["size"])
    if crop_width > image.width or crop_height > image.height:
        left = (crop_width - image.width) // 2 if crop_width > image.width else 0
        top = (crop_height - image.height) // 2 if crop_height > image.height else 0
        padded = Image.new(
            image.mode, (max(crop_width, image.width), max(crop_height, image.height))
        )
        if image.mode == "P" and image.palette is not None:
            padded.putpalette(image.getpalette() or [])
        padded.paste(image, (left, top))
        image = padded
        if (crop_width, crop_height) == image.size:
            return image
    top = int(round((image.height - crop_height) / 2.0))
    left = int(round((image.width - crop_width) / 2.0))
    return image.crop((left, top, left + crop_width, top + crop_height))


def _to_array(image: Image.Image) -> np.ndarray:
    if image.mode not in ("RGB", "L", "RGBA", "CMYK", "LA", "P", "YCbCr"):
        raise PreprocessUnsupported(f"an image of mode {image.mode} after the transform's steps")
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)).astype(np.float32) / np.float32(255)


class ImagePreprocess:
    """PIL image -> float32 array (3, H, W), as the model's own transform makes it. A class
    rather than a closure, so that decoding workers can pickle it."""

    def __init__(self, steps: Sequence[dict[str, Any]]) -> None:
        for step in steps:
            if step.get("op") not in OPS:
                raise PreprocessUnsupported(f"unknown preprocessing step {step!r}")
        self.steps = [dict(step) for step in steps]

    def __call__(self, image: Image.Image) -> np.ndarray:
        current: Any = image
        for step in self.steps:
            op = step["op"]
            if op == "resize":
                current = _resize(current, step)
            elif op == "center_crop":
                current = _center_crop(current, step)
            elif op == "rgb":
                current = current if current.mode == "RGB" else current.convert("RGB")
            elif op == "convert":
                current = current.convert(step["mode"])
            elif op == "to_array":
                current = _to_array(current)
            else:  # normalize
                mean = np.asarray(step["mean"], dtype=np.float32)[:, None, None]
                std = np.asarray(step["std"], dtype=np.float32)[:, None, None]
                current = (current - mean) / std
        if not isinstance(current, np.ndarray):
            current = _to_array(current)
        return current
