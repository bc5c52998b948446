"""Zero-shot label set definitions: parsing and validating them, from YAML/JSON or the API.

A label set names classes in plain words, in any language its model reads. Each label becomes
one class embedding (see `retrieval.labels.scoring`), from its name and synonyms rendered
through the set's templates, or from its own prompts.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import ConfigError, LabelSetError, TooManyPrompts
from retrieval.models.prompts import PLACEHOLDER, TEMPLATE_SET_SOURCES, render, resolve_templates

DEFAULT_TEMPLATES = "openai"
DEFAULT_TOP_K = 3
MAX_TOP_K = 50
MAX_LABELS = 20_000
MAX_NAME_CHARS = 200
# Set names appear in URLs (/label-sets/{name}) and on the command line.
SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SET_KEYS = {
    "name",
    "labels",
    "templates",
    "top_k",
    "threshold",
    "min_cosine",
    "store_cosine",
    "label_options",
}
_LABEL_KEYS = {"name", "synonyms", "prompts", "threshold", "min_cosine"}


@dataclass(frozen=True)
class LabelSpec:
    """One label: its name, optional synonyms or prompts, optional thresholds of its own."""

    name: str
    synonyms: tuple[str, ...] = ()
    # Full sentences used as they are, instead of the templates.
    prompts: tuple[str, ...] = ()
    threshold: float | None = None
    min_cosine: float | None = None

    def texts(self, templates: Sequence[str]) -> list[str]:
        if self.prompts:
            return list(self.prompts)
        return [render(t, name) for name in (self.name, *self.synonyms) for t in templates]

    def options(self) -> dict[str, Any]:
        """The settings beyond the name (empty for a plain label)."""
        found: dict[str, Any] = {}
        if self.synonyms:
            found["synonyms"] = list(self.synonyms)
        if self.prompts:
            found["prompts"] = list(self.prompts)
        if self.threshold is not None:
            found["threshold"] = self.threshold
        if self.min_cosine is not None:
            found["min_cosine"] = self.min_cosine
        return found


@dataclass(frozen=True)
class LabelSet:
    """A named list of labels and how to turn them into class embeddings and stored labels.

    `threshold` is the smallest probability a label needs to be stored for an image, and
    `min_cosine` the smallest raw cosine; a label's own values replace the set's. An image none
    of whose top labels passes is stored as unlabelled: "none of these".
    """

    name: str
    labels: tuple[LabelSpec, ...]
    # A template set name (openai, simple, photo) or the templates themselves.
    templates: str | tuple[str, ...] = DEFAULT_TEMPLATES
    top_k: int = DEFAULT_TOP_K
    threshold: float = 0.0
    min_cosine: float | None = None
    store_cosine: bool = False
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index.update({label.name.casefold(): n for n, label in enumerate(self.labels)})

    @property
    def names(self) -> list[str]:
        return [label.name for label in self.labels]

    def index_of(self, name: str) -> int | None:
        """The position of a label, matched without regard to case; None if absent."""
        return self._index.get(name.strip().casefold())

    def resolved_templates(self) -> tuple[str, ...]:
        try:
            return resolve_templates(
                self.templates if isinstance(self.templates, str) else list(self.templates)
            )
        except ConfigError as exc:
            raise LabelSetError(self.name, str(exc)) from None

    def prompt_groups(self) -> list[list[str]]:
        templates = self.resolved_templates()
        return [label.texts(templates) for label in self.labels]

    def prompt_count(self) -> int:
        """How many prompts `prompt_groups` holds, counted without rendering them."""
        templates = len(self.resolved_templates())
        return sum(
            len(label.prompts) or (1 + len(label.synonyms)) * templates for label in self.labels
        )

    def require_prompts_within(self, limit: int, setting: str, advice: str = "") -> None:
        """TooManyPrompts unless encoding this set takes at most `limit` prompts."""
        count = self.prompt_count()
        if count > limit:
            raise TooManyPrompts(self.name, count, limit, setting, advice)

    def thresholds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per label: the smallest probability and the smallest cosine for it to be stored."""
        probability = np.array(
            [self.threshold if x.threshold is None else x.threshold for x in self.labels],
            dtype=np.float32,
        )
        set_cosine = -math.inf if self.min_cosine is None else self.min_cosine
        cosine = np.array(
            [set_cosine if x.min_cosine is None else x.min_cosine for x in self.labels],
            dtype=np.float32,
        )
        return probability, cosine

    def to_dict(self) -> dict[str, Any]:
        """The canonical definition: what is stored, versioned and compared."""
        options = {label.name: label.options() for label in self.labels if label.options()}
        return {
            "name": self.name,
            "labels": self.names,
            "label_options": options,
            "templates": self.templates
            if isinstance(self.templates, str)
            else list(self.templates),
            "top_k": self.top_k,
            "threshold": self.threshold,
            "min_cosine": self.min_cosine,
            "store_cosine": self.store_cosine,
        }

    def same_definition(self, other: LabelSet) -> bool:
        return json.dumps(self.to_dict(), sort_keys=True) == json.dumps(
            other.to_dict(), sort_keys=True
        )

    @classmethod
    def from_dict(cls, data: Any, *, name: str | None = None, source: str = "") -> LabelSet:
        """Validate a definition (a parsed YAML/JSON file, or an API body).

        `labels` entries are names or objects {name, synonyms, prompts, threshold,
        min_cosine}; `label_options` (name -> those settings) is accepted too, as
        `to_dict` writes it. LabelSetError says what is wrong and where.
        """
        where = source or (name or "label set")
        if not isinstance(data, Mapping):
            raise LabelSetError(where, "a label set must be an object with a 'labels' list")
        unknown = set(data) - _SET_KEYS
        if unknown:
            raise LabelSetError(
                where,
                f"unknown keys {sorted(unknown)}; allowed: {', '.join(sorted(_SET_KEYS))}",
            )
        given = data.get("name")
        set_name = name or given
        if name and given and given != name:
            raise LabelSetError(where, f"the definition names {given!r}, not {name!r}")
        # fullmatch: `$` alone would let a trailing newline through ("docs\n").
        if not isinstance(set_name, str) or not SET_NAME.fullmatch(set_name):
            raise LabelSetError(
                where,
                "a label set needs a name of letters, digits, '.', '_' or '-' "
                f"(1-128 characters), got {set_name!r}",
            )
        where = source or set_name
        options = data.get("label_options") or {}
        if not isinstance(options, Mapping):
            raise LabelSetError(where, "label_options must map label names to settings")
        raw_labels = data.get("labels")
        if not isinstance(raw_labels, list) or not raw_labels:
            raise LabelSetError(where, "'labels' must be a non-empty list")
        if len(raw_labels) > MAX_LABELS:
            raise LabelSetError(where, f"{len(raw_labels)} labels; the limit is {MAX_LABELS}")
        labels = [_label(entry, options, where, n) for n, entry in enumerate(raw_labels)]
        seen: dict[str, str] = {}
        for label in labels:
            key = label.name.casefold()
            if key in seen:
                raise LabelSetError(where, f"label {label.name!r} appears twice")
            seen[key] = label.name
        stray = [key for key in options if str(key).casefold() not in seen]
        if stray:
            raise LabelSetError(where, f"label_options name labels not in the list: {stray}")
        top_k = data.get("top_k", DEFAULT_TOP_K)
        if not _is_int(top_k) or not 1 <= top_k <= MAX_TOP_K:
            raise LabelSetError(where, f"top_k must be an integer from 1 to {MAX_TOP_K}")
        store_cosine = data.get("store_cosine", False)
        if not isinstance(store_cosine, bool):
            raise LabelSetError(where, "store_cosine must be true or false")
        label_set = cls(
            name=set_name,
            labels=tuple(labels),
            templates=_templates(data.get("templates", DEFAULT_TEMPLATES), where),
            top_k=int(top_k),
            threshold=_probability(data.get("threshold", 0.0), where, "threshold") or 0.0,
            min_cosine=_cosine(data.get("min_cosine"), where, "min_cosine"),
            store_cosine=store_cosine,
        )
        label_set.resolved_templates()  # a bad template fails now, not at labelling time
        return label_set


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _probability(value: Any, where: str, key: str) -> float | None:
    if value is None:
        return None
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise LabelSetError(where, f"{key} must be a probability from 0 to 1, got {value!r}")
    return float(value)


def _cosine(value: Any, where: str, key: str) -> float | None:
    if value is None:
        return None
    if not _is_number(value) or not -1.0 <= value <= 1.0:
        raise LabelSetError(where, f"{key} must be a cosine from -1 to 1, got {value!r}")
    return float(value)


def _text(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise LabelSetError(where, f"{what} must be a non-empty string, got {value!r}")
    text = " ".join(value.split())
    if len(text) > MAX_NAME_CHARS:
        raise LabelSetError(where, f"{what} is longer than {MAX_NAME_CHARS} characters")
    return text


def _texts(value: Any, where: str, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise LabelSetError(where, f"{what} must be a list of strings")
    return tuple(_text(item, where, what) for item in value)


def _label(entry: Any, options: Mapping[str, Any], where: str, position: int) -> LabelSpec:
    if isinstance(entry, str):
        settings: Mapping[str, Any] = {"name": entry}
    elif isinstance(entry, Mapping):
        settings = entry
    else:
        raise LabelSetError(where, f"labels[{position}] must be a name or an object")
    unknown = set(settings) - _LABEL_KEYS
    if unknown:
        raise LabelSetError(
            where,
            f"labels[{position}]: unknown keys {sorted(unknown)}; allowed: "
            f"{', '.join(sorted(_LABEL_KEYS))}",
        )
    name = _text(settings.get("name"), where, f"labels[{position}].name")
    extra = next((v for k, v in options.items() if str(k).casefold() == name.casefold()), None)
    if extra is not None:
        if not isinstance(extra, Mapping) or set(extra) - (_LABEL_KEYS - {"name"}):
            raise LabelSetError(where, f"label_options[{name!r}] has unknown keys")
        settings = {**extra, **settings}
    label_where = f"{where}: label {name!r}"
    prompts = _texts(settings.get("prompts"), label_where, "prompts")
    for prompt in prompts:
        if PLACEHOLDER in prompt:
            raise LabelSetError(
                label_where, f"prompt {prompt!r} holds {{}}: prompts are full sentences"
            )
    return LabelSpec(
        name=name,
        synonyms=_texts(settings.get("synonyms"), label_where, "synonyms"),
        prompts=prompts,
        threshold=_probability(settings.get("threshold"), label_where, "threshold"),
        min_cosine=_cosine(settings.get("min_cosine"), label_where, "min_cosine"),
    )


def _templates(value: Any, where: str) -> str | tuple[str, ...]:
    """A template set name, or literal templates with {} (a list, or one string split on |).

    File paths are not accepted here: a definition may come over HTTP. The command line
    reads template files itself (`load_label_set_file`).
    """
    if isinstance(value, str):
        text = value.strip()
        if text in TEMPLATE_SET_SOURCES:
            return text
        if PLACEHOLDER not in text:
            known = ", ".join(TEMPLATE_SET_SOURCES)
            raise LabelSetError(
                where, f"templates {value!r} is neither a template set ({known}) nor has {{}}"
            )
        value = text.split("|")
    if not isinstance(value, list) or not value:
        raise LabelSetError(where, "templates must be a set name or a non-empty list")
    templates = tuple(_text(item, where, "a template") for item in value)
    for template in templates:
        if template.count(PLACEHOLDER) != 1:
            raise LabelSetError(where, f"template {template!r} must contain {{}} exactly once")
    return templates


def load_label_set_file(path: Path, *, name: str | None = None) -> LabelSet:
    """Read a label set from a YAML or JSON file (by suffix; otherwise JSON, then YAML).

    A `templates` value naming an existing file (relative to the label set file) is read as
    one template per line, here on the command line, and stored as the templates themselves.
    """
    import yaml

    source = str(path)
    text = _read_text(Path(path), source)
    suffix = Path(path).suffix.lower()
    data: Any
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            try:
                data = json.loads(text)
            except ValueError:
                data = yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        what = suffix.lstrip(".") or "JSON or YAML"
        raise LabelSetError(source, f"not valid {what}: {exc}") from None
    if isinstance(data, Mapping) and isinstance(data.get("templates"), str):
        candidate = Path(path).parent / data["templates"]
        if data["templates"] not in TEMPLATE_SET_SOURCES and candidate.is_file():
            lines = _read_text(candidate, source).splitlines()
            data = {**data, "templates": [line.strip() for line in lines if line.strip()]}
    return LabelSet.from_dict(data, name=name or _name_from(data, path), source=source)


def _read_text(path: Path, source: str) -> str:
    """A UTF-8 file's text, without the byte order mark some Windows editors write."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LabelSetError(
            source, f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise LabelSetError(source, f"cannot read the file: {exc}") from None


def _name_from(data: Any, path: Path) -> str:
    if isinstance(data, Mapping) and isinstance(data.get("name"), str):
        return str(data["name"])
    return Path(path).stem
