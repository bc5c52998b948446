"""retrieval.training.data: the three input formats, and labelme's bad annotations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from retrieval.errors import TrainingDataError
from retrieval.models.prompts import resolve_templates
from retrieval.training.data import detect_format, load_sample_image, load_training_set
from retrieval.training.shapes import generate_shapes

TEMPLATES = ("a {}", "a photo of a {}.")


def write_image(path: Path, size: tuple[int, int] = (40, 30), colour: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_csv_paths_are_relative_to_the_file_and_bad_rows_are_reported(tmp_path: Path) -> None:
    write_image(tmp_path / "pics" / "a.png")
    write_image(tmp_path / "pics" / "b.png")
    table = tmp_path / "pairs.csv"
    table.write_text(
        "image,caption,label\n"
        "pics/a.png,a red square,red square\n"
        f"{tmp_path / 'pics' / 'b.png'},another one,\n"
        "pics/missing.png,ghost,\n"
        "pics/a.png,   ,\n",
        encoding="utf-8",
    )
    data = load_training_set(table)
    assert data.format == "csv"
    assert [(s.image, s.caption, s.label) for s in data.samples] == [
        (tmp_path / "pics" / "a.png", "a red square", "red square"),
        (tmp_path / "pics" / "b.png", "another one", None),
    ]
    assert len(data.warnings) == 2
    assert "line 4" in data.warnings[0] and "missing.png does not exist" in data.warnings[0]
    assert "line 5" in data.warnings[1] and "empty caption" in data.warnings[1]
    assert not data.has_classes


def test_generated_captions_csv_reads_as_pairs(tmp_path: Path) -> None:
    samples = generate_shapes(tmp_path, 30, seed=1)
    data = load_training_set(tmp_path / "captions.csv")
    assert [s.image for s in data.samples] == [s.path for s in samples]
    assert [s.caption for s in data.samples] == [s.caption for s in samples]
    assert data.warnings == []


def test_csv_without_caption_column_is_refused(tmp_path: Path) -> None:
    table = tmp_path / "pairs.csv"
    table.write_text("file,words\na.png,hello\n", encoding="utf-8")
    with pytest.raises(TrainingDataError, match="caption column"):
        load_training_set(table)


def test_jsonl_accepts_caption_lists_and_reports_bad_lines(tmp_path: Path) -> None:
    write_image(tmp_path / "a.jpg")
    lines = [
        json.dumps({"image": "a.jpg", "caption": ["first", "second"], "label": "thing"}),
        "{not json",
        json.dumps(["a list"]),
        "",
        json.dumps({"image": "a.jpg", "text": "via the text key"}),
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = load_training_set(path)
    assert data.format == "jsonl"
    assert [s.captions for s in data.samples] == [("first", "second"), ("via the text key",)]
    assert data.samples[0].label == "thing" and data.samples[1].label is None
    assert [w.split(":")[0] for w in data.warnings] == ["pairs.jsonl line 2", "pairs.jsonl line 3"]


def test_image_folder_class_names_and_templates(tmp_path: Path) -> None:
    generate_shapes(tmp_path, 48, seed=2)
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / "notes.txt").write_text("not an image: the class has none")
    data = load_training_set(tmp_path, templates=TEMPLATES)
    assert data.format == "folder"
    assert len(data.samples) == 48
    assert len(data.classes) == 24 and "red circle" in data.classes
    red = next(s for s in data.samples if s.label == "red circle")
    assert red.captions == ("a red circle", "a photo of a red circle.")
    assert red.image.parent.name == "red_circle"
    assert data.has_classes
    assert any("empty_class/: no images" in w for w in data.warnings)


def test_folder_without_class_folders_is_refused(tmp_path: Path) -> None:
    write_image(tmp_path / "loose.png")
    with pytest.raises(TrainingDataError, match="no class folders"):
        load_training_set(tmp_path)


def labelme(
    path: Path, image: str, shapes: list[dict[str, object]], size: tuple[int, int] = (100, 80)
) -> None:
    path.write_text(
        json.dumps(
            {
                "version": "5.4.1",
                "shapes": shapes,
                "imagePath": image,
                "imageData": None,
                "imageWidth": size[0],
                "imageHeight": size[1],
            }
        ),
        encoding="utf-8",
    )


def rect(label: str, points: object, kind: str = "rectangle") -> dict[str, object]:
    return {"label": label, "points": points, "shape_type": kind, "flags": {}}


def test_labelme_crops_rectangles_and_skips_bad_annotations(tmp_path: Path) -> None:
    canvas = Image.new("RGB", (100, 80), "white")
    canvas.paste(Image.new("RGB", (30, 20), "red"), (10, 10))
    canvas.save(tmp_path / "scene.png")
    labelme(
        tmp_path / "scene.json",
        "scene.png",
        [
            rect("red_box", [[40, 30], [10, 10]]),  # corners in either order
            rect("edge", [[90, 70], [120, 95]]),  # partly outside: clipped
            rect("gone", [[150, 10], [190, 40]]),  # wholly outside
            rect("", [[0, 0], [10, 10]]),  # empty label
            rect("flat", [[5, 5], [50, 5]]),  # degenerate: zero height
            rect("blob", [[1, 1], [5, 9], [9, 2]], kind="polygon"),
            rect("broken", [[1, 2]]),
        ],
    )
    labelme(tmp_path / "lost.json", "nowhere.png", [rect("x", [[0, 0], [5, 5]])])
    (tmp_path / "notes.json").write_text("{broken", encoding="utf-8")
    assert detect_format(tmp_path) == "labelme"

    data = load_training_set(tmp_path, templates=("a {}",))
    assert data.format == "labelme"
    assert [(s.label, s.box, s.caption) for s in data.samples] == [
        ("red box", (10, 10, 40, 30), "a red box"),
        ("edge", (90, 70, 100, 80), "a edge"),
    ]
    text = "\n".join(data.warnings)
    assert "lost.json: image nowhere.png does not exist; skipped with its 1 shape(s)" in text
    assert "notes.json: not readable JSON" in text
    assert "scene.json shape 2: rectangle lies outside the 100x80 image; skipped" in text
    assert "scene.json shape 3: empty label; skipped" in text
    assert "scene.json shape 4: degenerate rectangle (45x0 px); skipped" in text
    assert "scene.json shape 5: a polygon, not a rectangle; skipped" in text
    assert "scene.json shape 6: malformed points" in text
    assert "1 rectangle(s) extended past the image border and were clipped" in text
    assert len(data.warnings) == 8

    crop = load_sample_image(data.samples[0])
    assert crop.size == (30, 20)
    assert crop.getpixel((15, 10)) == (255, 0, 0)
    assert load_sample_image(data.samples[1]).size == (10, 10)


def test_labelme_size_mismatch_skips_the_file(tmp_path: Path) -> None:
    write_image(tmp_path / "small.png", size=(50, 40))
    labelme(tmp_path / "small.json", "small.png", [rect("a", [[0, 0], [10, 10]])], size=(100, 80))
    labelme(tmp_path / "ok.json", "small.png", [rect("b", [[0, 0], [10, 10]])], size=(50, 40))
    data = load_training_set(tmp_path)
    assert [s.label for s in data.samples] == ["b"]
    assert data.warnings == [
        "small.json: annotated for a 100x80 image, but small.png is 50x40; skipped"
    ]


def test_a_set_with_nothing_usable_is_refused_with_its_first_problem(tmp_path: Path) -> None:
    labelme(tmp_path / "a.json", "missing.png", [rect("x", [[0, 0], [5, 5]])])
    with pytest.raises(TrainingDataError, match="no usable samples.*missing.png"):
        load_training_set(tmp_path, fmt="labelme")


def test_missing_path_and_unknown_file_type(tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match="does not exist"):
        load_training_set(tmp_path / "nope.csv")
    other = tmp_path / "data.txt"
    other.write_text("x")
    with pytest.raises(TrainingDataError, match=r"\.csv or \.jsonl"):
        load_training_set(other)


def test_resolve_templates() -> None:
    assert resolve_templates("a {}|a photo of a {}.") == ("a {}", "a photo of a {}.")
    openai = resolve_templates("openai")
    assert len(openai) == 80 and all(t.count("{}") == 1 for t in openai)
    assert resolve_templates("simple")[0] == "itap of a {}."
    from retrieval.errors import ConfigError

    with pytest.raises(ConfigError, match="not a template set"):
        resolve_templates("fancy")
    with pytest.raises(ConfigError, match="exactly once"):
        resolve_templates("a {} and {}")
