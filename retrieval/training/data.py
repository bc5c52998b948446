"""Training and evaluation sets: captioned tables, class folders and labelme rectangles.

Each format becomes a list of `TrainingSample`s (an image, optionally a crop box, its captions
and its class). Bad rows and annotations are skipped, and every skip is described in
`TrainingSet.warnings` so the caller can show them; only a set that is unusable as a whole
raises `TrainingDataError`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from retrieval.errors import ImageError, TrainingDataError
from retrieval.images import IMAGE_EXTENSIONS, decode_image, read_header
from retrieval.models.prompts import DEFAULT_PROMPT, class_name_from_folder, render

FORMATS = ("auto", "csv", "jsonl", "folder", "labelme")
IMAGE_COLUMNS = ("image", "path", "file", "filename", "filepath")
CAPTION_COLUMNS = ("caption", "text", "title")
LABEL_COLUMNS = ("label", "class")
DEFAULT_MAX_PIXELS = 100_000_000

Box = tuple[int, int, int, int]  # left, top, right, bottom, in upright image pixels


@dataclass(frozen=True)
class TrainingSample:
    """One (image, caption) pair; `captions[0]` is the canonical caption used for evaluation."""

    image: Path
    captions: tuple[str, ...]
    label: str | None = None
    box: Box | None = None

    @property
    def caption(self) -> str:
        return self.captions[0]


@dataclass
class TrainingSet:
    samples: list[TrainingSample]
    format: str
    source: Path
    warnings: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        """The distinct labels, sorted; empty when the set has none."""
        return sorted({s.label for s in self.samples if s.label is not None})

    @property
    def has_classes(self) -> bool:
        return bool(self.samples) and all(s.label is not None for s in self.samples)


def detect_format(path: Path) -> str:
    """csv or jsonl by extension; for a directory, labelme if it holds labelme JSON, else folder."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            return "csv"
        if suffix in (".jsonl", ".ndjson"):
            return "jsonl"
        raise TrainingDataError(str(path), "a file must be a .csv or .jsonl of image,caption pairs")
    if path.is_dir():
        for candidate in sorted(path.rglob("*.json"))[:20]:
            if _looks_like_labelme(candidate):
                return "labelme"
        return "folder"
    raise TrainingDataError(str(path), "does not exist")


def load_training_set(
    path: str | Path,
    *,
    fmt: str = "auto",
    templates: Sequence[str] = (DEFAULT_PROMPT,),
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> TrainingSet:
    """Read any of the supported layouts. `templates` turn class names into captions.

    Raises TrainingDataError when the set is unusable (missing, wrong layout, no samples).
    """
    source = Path(path)
    if fmt not in FORMATS:
        raise TrainingDataError(str(source), f"unknown format {fmt!r}; use one of {FORMATS}")
    if not source.exists():
        raise TrainingDataError(str(source), "does not exist")
    chosen = detect_format(source) if fmt == "auto" else fmt
    if chosen == "csv":
        result = read_caption_csv(source)
    elif chosen == "jsonl":
        result = read_caption_jsonl(source)
    elif chosen == "folder":
        result = read_image_folder(source, templates)
    else:
        result = read_labelme(source, templates, max_pixels=max_pixels)
    if not result.samples:
        detail = f" ({len(result.warnings)} problems, first: {result.warnings[0]})"
        raise TrainingDataError(
            str(source),
            f"no usable samples in this {chosen} set" + (detail if result.warnings else ""),
        )
    return result


# --------------------------------------------------------------------------------------------
# Captioned tables


def _pick_column(names: Sequence[str], candidates: Sequence[str]) -> str | None:
    lowered = {name.strip().lower(): name for name in names}
    return next((lowered[c] for c in candidates if c in lowered), None)


def _resolve_image(base: Path, value: str) -> Path:
    candidate = Path(value)
    return candidate if candidate.is_absolute() else base / candidate


def read_caption_csv(path: Path) -> TrainingSet:
    """A CSV with a header: image (or path/file) and caption (or text) columns, optional label."""
    result = TrainingSet([], "csv", path)
    with open(path, newline="", encoding="utf-8-sig") as stream:
        dialect = csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel
        reader = csv.DictReader(stream, dialect=dialect)
        names = reader.fieldnames or []
        image_col = _pick_column(names, IMAGE_COLUMNS)
        caption_col = _pick_column(names, CAPTION_COLUMNS)
        label_col = _pick_column(names, LABEL_COLUMNS)
        if image_col is None or caption_col is None:
            raise TrainingDataError(
                str(path),
                f"the header {names} needs an image column ({'/'.join(IMAGE_COLUMNS)}) and a "
                f"caption column ({'/'.join(CAPTION_COLUMNS)})",
            )
        for line, row in enumerate(reader, start=2):
            label = (row.get(label_col) or "").strip() if label_col else ""
            _add_pair(
                result,
                f"{path.name} line {line}",
                path.parent,
                row.get(image_col),
                row.get(caption_col),
                label or None,
            )
    return result


def read_caption_jsonl(path: Path) -> TrainingSet:
    """One JSON object per line: {"image": ..., "caption": "..." or [...], "label"?: ...}."""
    result = TrainingSet([], "jsonl", path)
    with open(path, encoding="utf-8") as stream:
        for line_no, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                result.warnings.append(f"{where}: not valid JSON ({exc.msg}); skipped")
                continue
            if not isinstance(row, dict):
                result.warnings.append(f"{where}: not a JSON object; skipped")
                continue
            image = next((row[c] for c in IMAGE_COLUMNS if c in row), None)
            caption = next((row[c] for c in CAPTION_COLUMNS if c in row), None)
            label = next((row[c] for c in LABEL_COLUMNS if c in row), None)
            _add_pair(
                result,
                where,
                path.parent,
                image,
                caption,
                str(label).strip() or None if label is not None else None,
            )
    return result


def _add_pair(
    result: TrainingSet, where: str, base: Path, image: Any, caption: Any, label: str | None
) -> None:
    if not isinstance(image, str) or not image.strip():
        result.warnings.append(f"{where}: no image path; skipped")
        return
    captions: list[str] = []
    if isinstance(caption, str):
        captions = [caption.strip()]
    elif isinstance(caption, list):
        captions = [c.strip() for c in caption if isinstance(c, str)]
    captions = [c for c in captions if c]
    if not captions:
        result.warnings.append(f"{where}: empty caption; skipped")
        return
    path = _resolve_image(base, image.strip())
    if not path.is_file():
        result.warnings.append(f"{where}: image {image.strip()} does not exist; skipped")
        return
    result.samples.append(TrainingSample(path, tuple(captions), label))


# --------------------------------------------------------------------------------------------
# Class folders


def _image_files(directory: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(dirpath) / name


def read_image_folder(root: Path, templates: Sequence[str]) -> TrainingSet:
    """`root/<class>/**/*.jpg`: each class folder name (red_circle -> red circle) is the label."""
    result = TrainingSet([], "folder", root)
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise TrainingDataError(str(root), "no class folders (expected root/<class>/*.jpg)")
    for class_dir in class_dirs:
        label = class_name_from_folder(class_dir.name)
        if not label:
            result.warnings.append(f"{class_dir.name}/: folder name gives an empty class; skipped")
            continue
        captions = tuple(render(t, label) for t in templates)
        files = list(_image_files(class_dir))
        if not files:
            result.warnings.append(f"{class_dir.name}/: no images; class skipped")
        result.samples.extend(TrainingSample(path, captions, label) for path in files)
    return result


# --------------------------------------------------------------------------------------------
# labelme annotations


def _looks_like_labelme(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as stream:
            data = json.load(stream)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "shapes" in data and "imagePath" in data


def read_labelme(
    root: Path, templates: Sequence[str], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> TrainingSet:
    """Every rectangle of every labelme JSON file under `root` becomes a crop of its label.

    Skipped, each with a message: unreadable files, missing or undecodable images, shapes that
    are not rectangles, empty labels, malformed points, and rectangles wholly outside the image
    or less than a pixel wide once clipped. Rectangles partly outside are clipped to the image.
    """
    result = TrainingSet([], "labelme", root)
    clipped = 0
    files = sorted(root.rglob("*.json"))
    if not files:
        raise TrainingDataError(str(root), "no labelme .json files")
    for path in files:
        name = path.relative_to(root).as_posix()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            result.warnings.append(f"{name}: not readable JSON ({exc}); skipped")
            continue
        if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
            result.warnings.append(f"{name}: not a labelme file (no 'shapes' list); skipped")
            continue
        image_ref = data.get("imagePath")
        if not isinstance(image_ref, str) or not image_ref.strip():
            result.warnings.append(f"{name}: no imagePath; skipped")
            continue
        # labelme writes Windows separators when run on Windows.
        image_path = _resolve_image(path.parent, image_ref.strip().replace("\\", "/"))
        if not image_path.is_file():
            result.warnings.append(
                f"{name}: image {image_ref} does not exist; skipped with its "
                f"{len(data['shapes'])} shape(s)"
            )
            continue
        try:
            _, width, height = read_header(str(image_path), max_pixels=max_pixels)
        except ImageError as exc:
            result.warnings.append(f"{name}: image {image_ref} is unusable ({exc.reason}); skipped")
            continue
        declared = (data.get("imageWidth"), data.get("imageHeight"))
        if all(isinstance(v, int) for v in declared) and declared != (width, height):
            result.warnings.append(
                f"{name}: annotated for a {declared[0]}x{declared[1]} image, but {image_ref} is "
                f"{width}x{height}; skipped"
            )
            continue
        for number, shape in enumerate(data["shapes"]):
            where = f"{name} shape {number}"
            sample, problem, was_clipped = _rectangle_sample(
                shape, image_path, width, height, templates
            )
            if problem:
                result.warnings.append(f"{where}: {problem}; skipped")
            elif sample is not None:
                result.samples.append(sample)
                clipped += was_clipped
    if clipped:
        result.warnings.append(
            f"{clipped} rectangle(s) extended past the image border and were clipped to it"
        )
    return result


def _rectangle_sample(
    shape: Any, image_path: Path, width: int, height: int, templates: Sequence[str]
) -> tuple[TrainingSample | None, str | None, bool]:
    """(sample, None, clipped) for a usable rectangle, else (None, why it is skipped, False)."""
    if not isinstance(shape, dict):
        return None, "not an object", False
    kind = shape.get("shape_type", "polygon")
    label_text = shape.get("label")
    label = class_name_from_folder(label_text) if isinstance(label_text, str) else ""
    if kind != "rectangle":
        return None, f"a {kind}, not a rectangle", False
    if not label:
        return None, "empty label", False
    points = shape.get("points")
    try:
        (x1, y1), (x2, y2) = points  # type: ignore[misc]
        coords = [float(v) for v in (x1, y1, x2, y2)]
    except (TypeError, ValueError):
        return None, f"malformed points {points!r} (need two [x, y] corners)", False
    if not all(math.isfinite(v) for v in coords):
        return None, "non-finite coordinates", False
    x1, y1, x2, y2 = coords
    left, right = sorted((x1, x2))
    top, bottom = sorted((y1, y2))
    if right - left < 1 or bottom - top < 1:
        return None, f"degenerate rectangle ({right - left:g}x{bottom - top:g} px)", False
    inside = (max(left, 0.0), max(top, 0.0), min(right, float(width)), min(bottom, float(height)))
    if inside[2] - inside[0] < 1 or inside[3] - inside[1] < 1:
        return None, f"rectangle lies outside the {width}x{height} image", False
    box = (
        math.floor(inside[0]),
        math.floor(inside[1]),
        math.ceil(inside[2]),
        math.ceil(inside[3]),
    )
    was_clipped = inside != (left, top, right, bottom)
    captions = tuple(render(t, label) for t in templates)
    return TrainingSample(image_path, captions, label, box), None, was_clipped


# --------------------------------------------------------------------------------------------
# Pixels


def load_sample_image(
    sample: TrainingSample, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode a sample's image (upright RGB) and cut its box, if it has one. Raises ImageError."""
    image = decode_image(str(sample.image), max_pixels=max_pixels).image
    return image.crop(sample.box) if sample.box is not None else image
