"""Label set definitions, files, and block scoring against an independent float64 reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrieval.errors import LabelSetError
from retrieval.index.kinds import IndexParams
from retrieval.index.shard import iter_embedding_blocks, write_shard
from retrieval.labels.definitions import LabelSet, load_label_set_file
from retrieval.labels.scoring import ClassEmbeddings, rank_labels, score_block
from retrieval.models.prompts import prompt_group_embeddings, resolve_templates


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def reference_top_k(
    vectors: np.ndarray, classes: np.ndarray, scale: float, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Softmax of scale * cosine in float64, the textbook way."""
    cosines = vectors.astype(np.float64) @ classes.astype(np.float64).T
    logits = scale * cosines
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return (
        order,
        np.take_along_axis(probs, order, axis=1),
        np.take_along_axis(cosines, order, axis=1),
    )


# --- definitions -------------------------------------------------------------------------


def test_a_full_definition_round_trips_through_to_dict() -> None:
    label_set = LabelSet.from_dict(
        {
            "name": "docs",
            "labels": [
                "invoice",
                {"name": "receipt", "synonyms": ["till receipt"], "threshold": 0.5},
                {"name": "cat", "prompts": ["a photo of my cat", "a kitten"], "min_cosine": 0.2},
            ],
            "templates": "simple",
            "top_k": 2,
            "threshold": 0.1,
            "store_cosine": True,
        }
    )
    assert label_set.names == ["invoice", "receipt", "cat"]
    assert label_set.index_of(" RECEIPT ") == 1 and label_set.index_of("dog") is None
    again = LabelSet.from_dict(json.loads(json.dumps(label_set.to_dict())))
    assert again.same_definition(label_set) and again == label_set
    groups = label_set.prompt_groups()
    simple = resolve_templates("simple")
    assert len(groups[0]) == len(simple)  # the name through every template
    assert len(groups[1]) == 2 * len(simple)  # the name and its synonym
    assert groups[2] == ["a photo of my cat", "a kitten"]  # own prompts, verbatim
    probability, cosine = label_set.thresholds()
    np.testing.assert_allclose(probability, [0.1, 0.5, 0.1])
    assert cosine[2] == pytest.approx(0.2) and np.isneginf(cosine[0])


def test_defaults_are_openai_templates_and_top_3() -> None:
    label_set = LabelSet.from_dict({"name": "x", "labels": ["a", "b"]})
    assert label_set.templates == "openai" and label_set.top_k == 3
    assert len(label_set.resolved_templates()) == 80


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x"}, "'labels' must be a non-empty list"),
        ({"name": "x", "labels": []}, "non-empty list"),
        ({"name": "x", "labels": ["Cat", "cat"]}, "appears twice"),
        ({"name": "x", "labels": ["a"], "top_k": 0}, "top_k"),
        ({"name": "x", "labels": ["a"], "top_k": True}, "top_k"),
        ({"name": "x", "labels": ["a"], "threshold": 1.5}, "threshold"),
        ({"name": "x", "labels": ["a"], "min_cosine": -2}, "min_cosine"),
        ({"name": "x", "labels": ["a"], "colour": "red"}, "unknown keys"),
        ({"name": "x", "labels": [{"name": "a", "weight": 2}]}, "unknown keys"),
        ({"name": "x", "labels": ["a"], "templates": "fancy"}, "template set"),
        ({"name": "x", "labels": ["a"], "templates": ["a {} {}"]}, "exactly once"),
        ({"name": "x", "labels": [{"name": "a", "prompts": ["a {}"]}]}, "full sentences"),
        ({"name": "x", "labels": [""]}, "non-empty string"),
        ({"name": "x", "labels": [3]}, "a name or an object"),
        ({"name": "bad name", "labels": ["a"]}, "name of letters"),
        ({"name": "docs\n", "labels": ["a"]}, "name of letters"),
        ({"name": "x", "labels": ["a"], "label_options": {"b": {}}}, "not in the list"),
        ({"name": "x", "labels": ["a"], "store_cosine": "yes"}, "store_cosine"),
        (["a", "b"], "must be an object"),
    ],
)
def test_bad_definitions_say_what_is_wrong(data: object, message: str) -> None:
    with pytest.raises(LabelSetError, match=message):
        LabelSet.from_dict(data)


def test_a_definition_cannot_rename_its_set() -> None:
    with pytest.raises(LabelSetError, match="names 'a', not 'b'"):
        LabelSet.from_dict({"name": "a", "labels": ["x"]}, name="b")


def test_label_options_apply_to_their_labels() -> None:
    label_set = LabelSet.from_dict(
        {"name": "x", "labels": ["cat", "dog"], "label_options": {"Dog": {"threshold": 0.7}}}
    )
    assert label_set.labels[1].threshold == 0.7
    assert label_set.to_dict()["label_options"] == {"dog": {"threshold": 0.7}}


def test_files_in_yaml_and_json_with_a_template_file(tmp_path: Path) -> None:
    (tmp_path / "templates.txt").write_text("a scan of a {}\n\na photo of a {}\n")
    yaml_file = tmp_path / "docs.yaml"
    yaml_file.write_text(
        "# document types\n"
        "labels:\n"
        "  - invoice\n"
        "  - name: receipt\n"
        "    synonyms: [till receipt]\n"
        "templates: templates.txt\n"
        "top_k: 1\n"
    )
    from_yaml = load_label_set_file(yaml_file)
    assert from_yaml.name == "docs"  # the file's stem when the file names none
    assert from_yaml.templates == ("a scan of a {}", "a photo of a {}")
    json_file = tmp_path / "other.json"
    json_file.write_text(json.dumps({**from_yaml.to_dict(), "name": "docs"}))
    assert load_label_set_file(json_file).same_definition(from_yaml)
    assert load_label_set_file(json_file, name="docs").name == "docs"


def test_a_broken_file_names_itself(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("labels: [a, b\n")
    with pytest.raises(LabelSetError, match="broken.yaml: not valid yaml"):
        load_label_set_file(broken)
    with pytest.raises(LabelSetError, match="cannot read"):
        load_label_set_file(tmp_path / "absent.json")


# Chinese labels, synonyms and templates, as a user would write them in an editor (UTF-8).
SCENES_ZH_YAML = """\
# 日常照片的场景
name: scenes-zh
templates: zh
labels:
  - 海滩
  - name: 猫
    synonyms: [小猫, 猫咪]
  - name: 截图
    prompts: [一张手机屏幕的截图。]
    threshold: 0.5
"""


def test_chinese_labels_synonyms_and_templates_from_yaml_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "scenes-zh.yaml"
    yaml_file.write_bytes(SCENES_ZH_YAML.encode("utf-8"))
    label_set = load_label_set_file(yaml_file)
    assert label_set.names == ["海滩", "猫", "截图"]
    assert label_set.labels[1].synonyms == ("小猫", "猫咪")
    assert label_set.index_of(" 猫 ") == 1 and label_set.index_of("狗") is None
    zh = resolve_templates("zh")
    beach, cat, screenshot = label_set.prompt_groups()
    assert beach[0] == "一张海滩的照片。" and len(beach) == len(zh)
    assert "一张小猫的照片。" in cat and "一张猫咪的照片。" in cat and len(cat) == 3 * len(zh)
    assert screenshot == ["一张手机屏幕的截图。"]
    # JSON, with the characters as they are or as \u escapes: the same definition.
    for ascii_only in (False, True):
        text = json.dumps(label_set.to_dict(), ensure_ascii=ascii_only)
        json_file = tmp_path / f"scenes-zh-{ascii_only}.json"
        json_file.write_bytes(text.encode("utf-8"))
        assert load_label_set_file(json_file).same_definition(label_set)


def test_chinese_literal_templates_and_a_template_file(tmp_path: Path) -> None:
    literal = LabelSet.from_dict(
        {"name": "x", "labels": ["狗"], "templates": "一张{}的照片。|{}在户外。"}
    )
    assert literal.prompt_groups() == [["一张狗的照片。", "狗在户外。"]]
    (tmp_path / "模板.txt").write_bytes("一张{}的照片。\n\n一张{}的特写。\n".encode())
    yaml_file = tmp_path / "pets.yaml"
    yaml_file.write_bytes("labels: [狗, 猫, 鸟]\ntemplates: 模板.txt\n".encode())
    from_file = load_label_set_file(yaml_file)
    assert from_file.templates == ("一张{}的照片。", "一张{}的特写。")


def test_files_saved_with_a_byte_order_mark_load_like_any_other(tmp_path: Path) -> None:
    # Windows editors (Notepad before 2019) start UTF-8 files with a byte order mark.
    bom = "\ufeff".encode()
    json_file = tmp_path / "pets.json"
    json_file.write_bytes(bom + json.dumps({"labels": ["狗", "猫", "鸟"]}).encode())
    (tmp_path / "templates.txt").write_bytes(bom + "一张{}的照片。\n".encode())
    yaml_file = tmp_path / "zh.yaml"
    yaml_file.write_bytes(bom + "labels: [狗, 猫, 鸟]\ntemplates: templates.txt\n".encode())
    assert load_label_set_file(json_file).names == ["狗", "猫", "鸟"]
    assert load_label_set_file(yaml_file).templates == ("一张{}的照片。",)


def test_a_file_in_another_encoding_is_refused_with_a_hint(tmp_path: Path) -> None:
    gbk = tmp_path / "pets.yaml"
    gbk.write_bytes("labels: [狗, 猫, 鸟]\n".encode("gbk"))  # Chinese Windows' old default
    with pytest.raises(LabelSetError, match="is not UTF-8 text .*save it as UTF-8"):
        load_label_set_file(gbk)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "labels": ["猫", "猫"]}, "label '猫' appears twice"),
        ({"name": "x", "labels": ["猫"], "templates": "一张{}和{}的照片"}, "exactly once"),
        ({"name": "x", "labels": ["猫"], "templates": "一张照片"}, "template set"),
        # Set names appear in URLs and on the command line: ASCII only, labels are free.
        ({"name": "场景", "labels": ["猫"]}, "name of letters"),
    ],
)
def test_bad_chinese_definitions_say_what_is_wrong(data: object, message: str) -> None:
    with pytest.raises(LabelSetError, match=message):
        LabelSet.from_dict(data)


def test_prompt_groups_of_different_sizes_average_within_each_group() -> None:
    table = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [1.0, 0.0]}

    def encode(texts: list[str]) -> np.ndarray:
        return np.array([table[t] for t in texts], dtype=np.float32)

    vectors = prompt_group_embeddings(encode, [["a", "b"], ["c"]])
    np.testing.assert_allclose(vectors, [[2**-0.5, 2**-0.5], [1.0, 0.0]], atol=1e-6)
    with pytest.raises(ValueError):
        prompt_group_embeddings(encode, [["a"], []])


# --- scoring ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_score_block_matches_a_float64_softmax(dtype: type) -> None:
    vectors: np.ndarray = unit_rows(500, 32, seed=1).astype(dtype)
    classes = ClassEmbeddings(unit_rows(40, 32, seed=2), logit_scale=100.0)
    block = score_block(vectors, classes, top_k=5)
    labels, probs, cosines = reference_top_k(vectors.astype(np.float32), classes.vectors, 100.0, 5)
    assert block.keep.all()
    np.testing.assert_array_equal(block.labels, labels)
    np.testing.assert_allclose(block.scores, probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(block.cosines, cosines, atol=1e-6)


def test_thresholds_drop_labels_and_keep_the_rest_in_order() -> None:
    vectors = unit_rows(300, 16, seed=3)
    classes = ClassEmbeddings(unit_rows(6, 16, seed=4), logit_scale=10.0)
    min_probability = np.array([0.0, 0.3, 0.0, 0.3, 0.0, 0.3], dtype=np.float32)
    min_cosine = np.full(6, 0.05, dtype=np.float32)
    block = score_block(vectors, classes, 3, min_probability, min_cosine)
    labels, probs, cosines = reference_top_k(vectors, classes.vectors, 10.0, 3)
    assert 0 < block.keep.sum() < block.keep.size  # the thresholds do something here
    for row in range(len(vectors)):
        passing = [
            (label, prob)
            for label, prob, cosine in zip(labels[row], probs[row], cosines[row], strict=True)
            if prob >= min_probability[label] and cosine >= 0.05
        ]
        kept = int(block.keep[row].sum())
        assert block.keep[row, :kept].all()  # survivors first
        assert [int(x) for x in block.labels[row, :kept]] == [int(x) for x, _ in passing]
        np.testing.assert_allclose(block.scores[row, :kept], [p for _, p in passing], rtol=1e-4)


def test_rank_labels_ranks_every_label_and_sums_to_one() -> None:
    classes = ClassEmbeddings(unit_rows(7, 8, seed=5), logit_scale=30.0)
    ranked = rank_labels(unit_rows(1, 8, seed=6)[0], classes)
    assert sorted(i for i, _, _ in ranked) == list(range(7))
    scores = [p for _, p, _ in ranked]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-5)


def test_embedding_blocks_read_back_exactly_what_the_shard_stores(tmp_path: Path) -> None:
    ids = np.arange(10, 10 + 1000, dtype=np.int64)
    vectors = unit_rows(1000, 24, seed=7)
    write_shard(
        tmp_path, "s1", ids=ids, embeddings=vectors, params=IndexParams("flat"), model={"k": 1}
    )
    blocks = list(iter_embedding_blocks(tmp_path, "s1", 300))
    assert [len(b_ids) for b_ids, _ in blocks] == [300, 300, 300, 100]
    np.testing.assert_array_equal(np.concatenate([b for b, _ in blocks]), ids)
    stored = np.concatenate([v for _, v in blocks])
    assert stored.dtype == np.float16
    np.testing.assert_array_equal(stored, vectors.astype(np.float16))


def test_sigmoid_models_score_each_label_on_its_own() -> None:
    # SigLIP: p = sigmoid(scale * cosine + bias) per label, computed in float64 here.
    vectors = unit_rows(200, 16, seed=7)
    classes = ClassEmbeddings(unit_rows(9, 16, seed=8), logit_scale=12.0, logit_bias=-3.0)
    block = score_block(vectors, classes, top_k=4)
    cosines = vectors.astype(np.float64) @ classes.vectors.astype(np.float64).T
    expected = 1 / (1 + np.exp(-(12.0 * cosines - 3.0)))
    order = np.argsort(-cosines, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(block.labels, order)
    np.testing.assert_allclose(
        block.scores, np.take_along_axis(expected, order, axis=1), rtol=1e-5, atol=1e-7
    )
    ranked = rank_labels(vectors[0], classes)
    assert sum(p for _, p, _ in ranked) != pytest.approx(1.0)  # independent, not a softmax
    assert [i for i, _, _ in ranked] == list(np.argsort(-cosines[0], kind="stable"))
