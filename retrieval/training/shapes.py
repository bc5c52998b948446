"""Generated pictures for the offline demo, the tests and the benchmarks.

Coloured shapes with captions ("a red circle") give the tiny model something it can learn in
a minute; noisy synthetic photos give decoding benchmarks a realistic cost per file.
"""

from __future__ import annotations

import csv
import math
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Saturated and far apart in RGB, so colour is learnable from a 64-px thumbnail and none is
# confused with the low-saturation backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# The classes' names in Chinese: "红色的圆形" is "a red circle".
COLOURS_ZH = {
    "red": "红色",
    "green": "绿色",
    "blue": "蓝色",
    "yellow": "黄色",
    "purple": "紫色",
    "orange": "橙色",
}
SHAPES_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形"}
LANGUAGES = ("en", "zh")

_SHAPE_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png"}
_SUPERSAMPLE = 2  # draw at twice the size and shrink, for anti-aliased edges
_MIN_BACKGROUND_DISTANCE = 110.0  # RGB distance; below this a background could read as a colour
_COLOUR_JITTER = 12
_MAX_ROTATION_DEGREES = 20.0
_STAR_INNER_RATIO = 0.45
_NOISE_MARGIN = 64  # the noise pool is this much larger than a photo, for random offsets


@dataclass(frozen=True)
class ShapeSample:
    """One generated picture and the class it shows."""

    path: Path
    colour: str
    shape: str
    language: str = "en"

    @property
    def label(self) -> str:
        """The class name: "red circle", or in Chinese "红色的圆形"."""
        return class_name(self.colour, self.shape, self.language)

    @property
    def caption(self) -> str:
        return f"a {self.label}" if self.language == "en" else self.label


def class_name(colour: str, shape: str, language: str = "en") -> str:
    if language == "zh":
        return f"{COLOURS_ZH[colour]}的{SHAPES_ZH[shape]}"
    return f"{colour} {shape}"


def draw_shape(colour: str, shape: str, rng: random.Random, size: int = 96) -> Image.Image:
    """Draw one `colour` `shape` at a random size, place and tilt on a contrasting background."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; known: {', '.join(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    fill = _jitter(COLOURS[colour], rng)
    canvas_size = size * _SUPERSAMPLE
    canvas = Image.new("RGB", (canvas_size, canvas_size), _background(fill, rng))
    # The shape is inscribed in a circle whose diameter is 35-80% of the canvas, and that
    # circle lies wholly inside the canvas, so no rotation can cut a corner off.
    radius = rng.uniform(0.35, 0.80) * canvas_size / 2
    centre = (rng.uniform(radius, canvas_size - radius), rng.uniform(radius, canvas_size - radius))
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        x, y = centre
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
    else:
        tilt = math.radians(rng.uniform(-_MAX_ROTATION_DEGREES, _MAX_ROTATION_DEGREES))
        draw.polygon(_outline(shape, centre, radius, tilt), fill=fill)
    image = canvas.resize((size, size), Image.Resampling.BOX)
    if rng.random() < 0.5:
        image = _with_noise(image, np.random.default_rng(rng.getrandbits(64)), rng.uniform(2, 8))
    return image


def generate_shapes(
    out_dir: Path,
    count: int,
    *,
    seed: int = 0,
    size: int = 96,
    fmt: str = "JPEG",
    language: str = "en",
) -> list[ShapeSample]:
    """Write `count` pictures balanced over all colour x shape classes, plus captions.csv.

    Sample i depends only on (seed, i), so a smaller count gives a prefix of a larger one.
    With `language="zh"` the captions are Chinese ("红色的圆形") and captions.csv also has a
    label column (the same Chinese class name), so a model can be trained and zero-shot
    evaluated in Chinese from that file alone.
    """
    if language not in LANGUAGES:
        raise ValueError(f"unsupported language {language!r}; use one of {', '.join(LANGUAGES)}")
    suffix = _SHAPE_SUFFIXES.get(fmt.upper())
    if suffix is None:
        raise ValueError(f"unsupported format {fmt!r}; use one of {', '.join(_SHAPE_SUFFIXES)}")
    if count < 0:
        raise ValueError(f"count must not be negative, got {count}")
    classes = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    samples: list[ShapeSample] = []
    for index in range(count):
        # Cycling through the classes keeps every prefix balanced to within one per class.
        colour, shape = classes[index % len(classes)]
        # A string seed is hashed with SHA-512, so it is stable across runs and processes.
        image = draw_shape(colour, shape, random.Random(f"{seed}/{index}"), size)
        path = out_dir / f"{colour}_{shape}" / f"{index:05d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".jpg":
            image.save(path, "JPEG", quality=92)
        else:
            image.save(path, "PNG")
        samples.append(ShapeSample(path=path, colour=colour, shape=shape, language=language))
    _write_captions(out_dir, samples, with_labels=language != "en")
    return samples


def generate_photos(
    out_dir: Path,
    count: int,
    *,
    seed: int = 0,
    size: tuple[int, int] = (1024, 768),
    quality: int = 90,
) -> list[Path]:
    """Write `count` photo-like JPEGs whose decoding costs about what a real photo's does.

    Smooth gradients, shapes, mid-frequency texture and per-pixel noise keep the JPEG from
    compressing to nothing. Image i depends only on (seed, i). `seed` must be >= 0.
    """
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if count < 0:
        raise ValueError(f"count must not be negative, got {count}")
    out_dir.mkdir(parents=True, exist_ok=True)
    noise = _noise_pool(np.random.default_rng([seed, 0]), width, height)
    paths = [out_dir / f"photo_{index:05d}.jpg" for index in range(count)]

    def render(index: int) -> None:
        photo = _photo(np.random.default_rng([seed, 1, index]), width, height, noise)
        photo.save(paths[index], "JPEG", quality=quality)

    # numpy and Pillow's JPEG encoder release the GIL, so threads use every core.
    with ThreadPoolExecutor(max_workers=max(1, min(count, os.cpu_count() or 1))) as pool:
        for _ in pool.map(render, range(count)):
            pass
    return paths


def _jitter(colour: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER))) for c in colour)
    return r, g, b


def _background(fill: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    """A light or dark, nearly grey background far from the shape's colour."""
    for _ in range(100):
        level = rng.randint(185, 245) if rng.random() < 0.5 else rng.randint(15, 75)
        r, g, b = (min(255, max(0, level + rng.randint(-15, 15))) for _ in range(3))
        if math.dist((r, g, b), fill) >= _MIN_BACKGROUND_DISTANCE:
            return r, g, b
    # Unreachable with the current palette; kept so a new colour can never loop forever.
    white, black = (255, 255, 255), (0, 0, 0)
    return white if math.dist(white, fill) > math.dist(black, fill) else black


def _outline(
    shape: str, centre: tuple[float, float], radius: float, tilt: float
) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(radius, math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif shape == "triangle":
        corners = [(radius, -math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "star":
        corners = [
            (radius if k % 2 == 0 else radius * _STAR_INNER_RATIO, -math.pi / 2 + k * math.pi / 5)
            for k in range(10)
        ]
    else:
        raise ValueError(f"{shape!r} has no polygon outline")
    x, y = centre
    return [(x + r * math.cos(a + tilt), y + r * math.sin(a + tilt)) for r, a in corners]


def _with_noise(image: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0.0, sigma, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_captions(out_dir: Path, samples: Sequence[ShapeSample], *, with_labels: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "captions.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "caption", "label"] if with_labels else ["path", "caption"])
        for sample in samples:
            row = [sample.path.relative_to(out_dir).as_posix(), sample.caption]
            writer.writerow([*row, sample.label] if with_labels else row)


def _noise_pool(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    # Per-pixel noise is what makes a JPEG cost as much as a photo, and drawing fresh Gaussian
    # noise per image dominated generation time; one pool, cut at a random offset per image,
    # costs the decoder exactly the same.
    shape = (height + _NOISE_MARGIN, width + _NOISE_MARGIN, 3)
    return np.clip(rng.normal(0.0, 6.0, shape), -127, 127).astype(np.int16)


def _photo(rng: np.random.Generator, width: int, height: int, noise: np.ndarray) -> Image.Image:
    # Low-frequency colour field: a few random colours, smoothly interpolated.
    grid = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    base = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(int(rng.integers(4, 12))):
        x0, x1 = sorted(rng.integers(-width // 4, width + width // 4, size=2).tolist())
        y0, y1 = sorted(rng.integers(-height // 4, height + height // 4, size=2).tolist())
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    # Mid-frequency luminance texture (foliage, fabric): features about 12 px across.
    coarse = rng.integers(0, 256, size=(max(1, height // 12), max(1, width // 12)), dtype=np.uint8)
    texture = np.asarray(
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16
    )
    pixels = np.asarray(base, dtype=np.int16)
    pixels += (texture - 128)[:, :, None] // 4
    dy, dx = (int(v) for v in rng.integers(0, _NOISE_MARGIN + 1, size=2))
    pixels += noise[dy : dy + height, dx : dx + width]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
