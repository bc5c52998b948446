"""Prompt template sets by name: the Chinese ones (zh, zh-photo, zh-simple) next to open_clip's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from retrieval.errors import ConfigError
from retrieval.models.prompts import PLACEHOLDER, ZH_TEMPLATES, render, resolve_templates

HAN = re.compile(r"[\u4e00-\u9fff]")


def test_the_zh_set_is_a_small_ensemble_of_chinese_captions() -> None:
    templates = resolve_templates("zh")
    assert templates == ZH_TEMPLATES
    assert 10 <= len(templates) <= 20 and len(set(templates)) == len(templates)
    for template in templates:
        assert template.count(PLACEHOLDER) == 1, template
        assert HAN.search(template.replace(PLACEHOLDER, "")), template  # Chinese words around it
        assert not re.search(r"[A-Za-z]", template), template  # no English left in
    captions = [render(template, "猫") for template in templates]
    assert captions[0] == "一张猫的照片。"
    assert "一张模糊的猫的照片。" in captions and "一张清晰的猫的照片。" in captions


def test_zh_photo_and_zh_simple_are_one_prompt_each() -> None:
    assert resolve_templates("zh-photo") == ("一张{}的照片。",)
    (bare,) = resolve_templates("zh-simple")
    assert render(bare, "城市街道") == "城市街道"  # the label as it is


def test_chinese_literal_templates_and_files(tmp_path: Path) -> None:
    assert resolve_templates(" 一张{}的照片。 | {}的特写 ") == ("一张{}的照片。", "{}的特写")
    templates = tmp_path / "templates.txt"
    templates.write_bytes("\ufeff一张{}的照片。\n\n{}的素描。\n".encode())  # with a BOM
    assert resolve_templates(str(templates)) == ("一张{}的照片。", "{}的素描。")


def test_an_unknown_set_lists_the_chinese_sets_too() -> None:
    with pytest.raises(ConfigError, match=r"zh, zh-photo, zh-simple"):
        resolve_templates("zh-tw")
    with pytest.raises(ConfigError, match="exactly once"):
        resolve_templates("一张{}和{}的照片")


def test_the_openai_and_simple_sets_are_open_clips_own() -> None:
    # Kept as data (templates.json), so that labels need no open_clip; they must not drift.
    from open_clip import zero_shot_metadata

    from retrieval.models.prompts import resolve_templates

    for name, source in (
        ("openai", zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES),
        ("simple", zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES),
    ):
        assert resolve_templates(name) == tuple(template("{}") for template in source)
