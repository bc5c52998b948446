"""Prompt templates: class names become captions, for zero-shot labels and class-folder training."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import numpy as np

from retrieval.errors import ConfigError

PLACEHOLDER = "{}"
# CLIP's single-prompt baseline ("A photo of a {label}." in the CLIP paper).
DEFAULT_PROMPT = "a photo of a {}."


@cache
def _open_clip_templates(name: str) -> tuple[str, ...]:
    """open_clip's ImageNet prompt sets (`zero_shot_metadata`: OpenAI's 80, and 7 of them), kept
    as data beside this module so that labels need neither open_clip nor torch; a test holds
    them equal to open_clip's."""
    sets = json.loads((Path(__file__).with_name("templates.json")).read_text(encoding="utf-8"))
    return tuple(sets[name])


# Chinese captions in the spirit of the openai set, for models with a Chinese text tower
# (Chinese-CLIP, multilingual CLIP): the same kinds of photo (blurry, close-up, black and
# white, ...), phrased as a Chinese caption would be. An English set would put English words
# around a Chinese label, a mix such models rarely saw in training.
ZH_TEMPLATES = (
    "一张{}的照片。",
    "{}的照片。",
    "一张{}的图片。",
    "一张模糊的{}的照片。",
    "一张清晰的{}的照片。",
    "一张{}的特写照片。",
    "一张{}的黑白照片。",
    "一张{}的低分辨率照片。",
    "一张光线昏暗的{}的照片。",
    "一张明亮的{}的照片。",
    "一张裁剪过的{}的照片。",
    "一张拍得不好的{}的照片。",
    "一张拍得很好的{}的照片。",
    "一张有{}的照片。",
    "我拍的{}的照片。",
    "一幅{}的画。",
    "{}的素描。",
)
ZH_PROMPT = "一张{}的照片。"

TEMPLATE_SET_SOURCES: dict[str, Callable[[], tuple[str, ...]]] = {
    "openai": lambda: _open_clip_templates("openai"),  # 80 prompts
    "simple": lambda: _open_clip_templates("simple"),  # 7 of them
    "photo": lambda: (DEFAULT_PROMPT,),
    "zh": lambda: ZH_TEMPLATES,
    "zh-photo": lambda: (ZH_PROMPT,),
    # The bare label: Chinese-CLIP's own zero-shot examples often pass class names as they are.
    "zh-simple": lambda: (PLACEHOLDER,),
}


def render(template: str, class_name: str) -> str:
    # str.format would trip over braces in a class name or a template's other text.
    return template.replace(PLACEHOLDER, class_name)


def class_name_from_folder(folder: str) -> str:
    """`red_circle` -> `red circle`: folder names cannot hold spaces comfortably, captions can."""
    return " ".join(folder.replace("_", " ").split())


def resolve_templates(spec: str | Sequence[str], setting: str = "templates") -> tuple[str, ...]:
    """Templates from a set name (`TEMPLATE_SET_SOURCES`), a file (one per line), or literals.

    A string holding the placeholder is taken literally; several literals are separated by
    `|` (`"a {}|a photo of a {}."`). Every template must contain `{}` exactly once.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text in TEMPLATE_SET_SOURCES:
            templates: Sequence[str] = TEMPLATE_SET_SOURCES[text]()
        elif PLACEHOLDER in text:
            templates = [part.strip() for part in text.split("|")]
        elif Path(text).is_file():
            lines = Path(text).read_text(encoding="utf-8-sig").splitlines()  # BOM or not
            templates = [line.strip() for line in lines if line.strip()]
        else:
            known = ", ".join(TEMPLATE_SET_SOURCES)
            raise ConfigError(
                setting,
                f"{spec!r} is not a template set ({known}), a file, or a template with {{}}",
            )
    else:
        templates = [str(part).strip() for part in spec]
    if not templates:
        raise ConfigError(setting, "no templates given")
    for template in templates:
        if template.count(PLACEHOLDER) != 1:
            raise ConfigError(setting, f"template {template!r} must contain {{}} exactly once")
    return tuple(templates)


def class_text_embeddings(
    encode_texts: Callable[[list[str]], np.ndarray],
    class_names: Sequence[str],
    templates: Sequence[str],
) -> np.ndarray:
    """One unit vector per class: the mean of its template embeddings, renormalised.

    `encode_texts` returns L2-normalised rows (as `Encoder.encode_texts` does).
    """
    if not class_names:
        raise ValueError("no class names")
    return prompt_group_embeddings(
        encode_texts, [[render(t, name) for t in templates] for name in class_names]
    )


def prompt_group_embeddings(
    encode_texts: Callable[[list[str]], np.ndarray], groups: Sequence[Sequence[str]]
) -> np.ndarray:
    """One unit vector per group of prompts: the mean of the group's embeddings, renormalised.

    Groups may differ in size (a label with synonyms or its own prompts); all prompts are
    encoded in one call, so `encode_texts` can batch them as it likes.
    """
    if not groups or any(not group for group in groups):
        raise ValueError("every prompt group needs at least one prompt")
    prompts = [prompt for group in groups for prompt in group]
    return group_means(encode_texts(prompts), [len(group) for group in groups])


def group_means(vectors: np.ndarray, group_sizes: Sequence[int]) -> np.ndarray:
    """One unit vector per run of `group_sizes` consecutive rows: their mean, renormalised."""
    vectors = vectors.astype(np.float32, copy=False)
    sizes = np.array(group_sizes, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    means = np.add.reduceat(vectors, starts, axis=0) / sizes[:, None].astype(np.float32)
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    return np.ascontiguousarray(means / np.maximum(norms, 1e-12), dtype=np.float32)
