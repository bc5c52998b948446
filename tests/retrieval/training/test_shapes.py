"""retrieval.training.shapes: the generated shapes corpus and the benchmark photos."""

from __future__ import annotations

import csv
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from retrieval.images import decode_image
from retrieval.training.shapes import (
    COLOURS,
    SHAPES,
    ShapeSample,
    draw_shape,
    generate_photos,
    generate_shapes,
)

CAP = 100_000_000
CLASSES = len(COLOURS) * len(SHAPES)


def file_bytes(samples: list[ShapeSample], root: Path) -> dict[str, bytes]:
    return {s.path.relative_to(root).as_posix(): s.path.read_bytes() for s in samples}


def test_palette_is_large_and_distinct() -> None:
    assert {"red", "green", "blue", "yellow", "purple", "orange"} <= set(COLOURS)
    assert {"circle", "square", "triangle", "star"} <= set(SHAPES)
    colours = list(COLOURS.values())
    closest = min(math.dist(a, b) for i, a in enumerate(colours) for b in colours[i + 1 :])
    assert closest > 80


def test_generate_shapes_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = generate_shapes(tmp_path / "a", 30, seed=4)
    again = generate_shapes(tmp_path / "b", 30, seed=4)
    other = generate_shapes(tmp_path / "c", 30, seed=5)
    assert file_bytes(first, tmp_path / "a") == file_bytes(again, tmp_path / "b")
    assert file_bytes(first, tmp_path / "a") != file_bytes(other, tmp_path / "c")
    # Sample i depends only on (seed, i): a smaller run is a prefix of a larger one.
    prefix = generate_shapes(tmp_path / "d", 10, seed=4)
    assert file_bytes(prefix, tmp_path / "d") == dict(
        list(file_bytes(first, tmp_path / "a").items())[:10]
    )


@pytest.mark.parametrize("count", [CLASSES * 2, CLASSES * 2 + 5])
def test_generate_shapes_is_balanced(tmp_path: Path, count: int) -> None:
    samples = generate_shapes(tmp_path, count, seed=1, size=32)
    per_class = Counter((s.colour, s.shape) for s in samples)
    assert len(per_class) == CLASSES
    assert max(per_class.values()) - min(per_class.values()) <= 1
    assert len(samples) == count


def test_layout_and_captions_csv(tmp_path: Path) -> None:
    samples = generate_shapes(tmp_path, 26, seed=2, size=48, fmt="PNG")
    for index, sample in enumerate(samples):
        assert sample.path == tmp_path / f"{sample.colour}_{sample.shape}" / f"{index:05d}.png"
        assert sample.caption == f"a {sample.colour} {sample.shape}"
    with open(tmp_path / "captions.csv", newline="", encoding="utf-8") as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == ["path", "caption"]
    assert rows[1:] == [[s.path.relative_to(tmp_path).as_posix(), s.caption] for s in samples]


@pytest.mark.parametrize(("fmt", "expected"), [("JPEG", "JPEG"), ("PNG", "PNG")])
def test_every_shape_file_decodes(tmp_path: Path, fmt: str, expected: str) -> None:
    for sample in generate_shapes(tmp_path, CLASSES, seed=3, size=64, fmt=fmt):
        decoded = decode_image(sample.path, max_pixels=CAP)
        assert (decoded.format, decoded.width, decoded.height) == (expected, 64, 64)


def test_unknown_format_colour_or_shape_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_shapes(tmp_path, 1, fmt="GIF")
    with pytest.raises(ValueError):
        draw_shape("teal", "circle", random.Random(0))
    with pytest.raises(ValueError):
        draw_shape("red", "hexagon", random.Random(0))


def test_shape_stands_out_from_its_background() -> None:
    rng = random.Random(11)
    for _ in range(5):
        for colour, rgb in COLOURS.items():
            for shape in SHAPES:
                pixels = np.asarray(draw_shape(colour, shape, rng, size=64), dtype=np.float32)
                distance = np.linalg.norm(pixels - np.array(rgb, dtype=np.float32), axis=2)
                # Jitter, noise and anti-aliasing move pixels a little, never a background
                # pixel anywhere near the shape colour.
                share = float((distance < 45).mean())
                assert 0.03 < share < 0.6, (colour, shape, share)
                corners = [pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]]
                assert any(math.dist(c, rgb) > 90 for c in corners), (colour, shape)


def test_generate_photos_writes_realistic_jpegs(tmp_path: Path) -> None:
    paths = generate_photos(tmp_path / "a", 3, seed=9)
    assert [p.name for p in paths] == ["photo_00000.jpg", "photo_00001.jpg", "photo_00002.jpg"]
    for path in paths:
        decoded = decode_image(path, max_pixels=CAP)
        assert (decoded.format, decoded.width, decoded.height) == ("JPEG", 1024, 768)
        # A flat picture would compress to a few kB; a real photo of this size is 100-300 kB.
        assert path.stat().st_size > 50_000
    assert len({p.read_bytes() for p in paths}) == 3
    again = generate_photos(tmp_path / "b", 1, seed=9, size=(1024, 768))
    assert again[0].read_bytes() == paths[0].read_bytes()


def test_generate_photos_honours_size(tmp_path: Path) -> None:
    (path,) = generate_photos(tmp_path, 1, size=(320, 200), quality=80)
    decoded = decode_image(path, max_pixels=CAP)
    assert (decoded.width, decoded.height) == (320, 200)


def test_chinese_captions_name_every_class_and_train_from_the_table(tmp_path: Path) -> None:
    from retrieval.training.data import load_training_set

    samples = generate_shapes(tmp_path / "zh", CLASSES, seed=3, language="zh")
    assert {s.caption for s in samples if s.colour == "red" and s.shape == "circle"} == {
        "红色的圆形"
    }
    assert len({s.caption for s in samples}) == CLASSES  # 24 distinct Chinese class names
    with open(tmp_path / "zh" / "captions.csv", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert rows[0].keys() == {"path", "caption", "label"}
    assert all(row["caption"] == row["label"] for row in rows)
    dataset = load_training_set(tmp_path / "zh" / "captions.csv")
    assert dataset.has_classes and "蓝色的正方形" in dataset.classes
    # English files are unchanged: no label column, so a caption table has no classes.
    generate_shapes(tmp_path / "en", 4, seed=3)
    assert (tmp_path / "en" / "captions.csv").read_text().splitlines()[0] == "path,caption"
    with pytest.raises(ValueError, match="language"):
        generate_shapes(tmp_path / "x", 1, language="fr")
