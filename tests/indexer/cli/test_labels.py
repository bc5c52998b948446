"""`clipsearch labels add/list/show/delete`, `clipsearch label`, and `search --label`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from retrieval.config import Settings
from retrieval.labels.definitions import load_label_set_file
from retrieval.training.shapes import COLOURS, SHAPES, generate_shapes
from tests.indexer.cli.test_cli import env, run_cli  # noqa: F401 - `env` is a fixture

# Label sets live in a catalog, which only `clipsearch index` or `db upgrade` creates: each test
# starts from an empty one, as the setup script leaves it.
pytestmark = pytest.mark.usefixtures("catalog")

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "labels"
HAN = re.compile(r"[\u4e00-\u9fff]")


def write_set(path: Path, **overrides: object) -> Path:
    names = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
    body = {"name": "shapes", "labels": names, "templates": "a {}|a photo of a {}", **overrides}
    path.write_text(json.dumps(body))
    return path


def test_label_sets_from_the_command_line(
    env: Settings,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def cli(*args: str) -> tuple[int, str, str]:
        return run_cli(list(args), capsys, monkeypatch)

    generate_shapes(tmp_path / "pics", 12, seed=4)
    definition = write_set(tmp_path / "shapes.json")
    code, out, err = cli("labels", "add", str(definition))
    assert code == 0, err
    assert "created label set shapes: version 1, 24 labels" in out
    code, out, _ = cli("labels", "add", str(definition))
    assert "unchanged label set shapes: version 1" in out

    # Indexing labels the new images on its own.
    code, out, err = cli("index", str(tmp_path / "pics"))
    assert code == 0, err
    assert "labelled 12 images with label set shapes" in out
    code, out, _ = cli("labels", "show", "shapes", "--json")
    shown = json.loads(out)
    assert shown["version"] == 1 and shown["labelled_version"] == 1
    assert sum(shown["counts"]["counts"].values()) + shown["counts"]["unlabelled"] == 12
    code, out, _ = cli("labels", "show", "shapes")
    assert "corpus labelled with version 1" in out and "(unlabelled)" in out

    # An edit is a new version; `label` relabels with it.
    write_set(definition, top_k=1)
    code, out, _ = cli("labels", "add", str(definition), "--json")
    assert json.loads(out)["outcome"] == "updated" and json.loads(out)["version"] == 2
    code, out, _ = cli("labels", "list")
    assert out.splitlines()[2].split()[:4] == ["shapes", "2", "1", "24"]
    code, out, err = cli("label", "--json")
    assert code == 0, err
    (entry,) = json.loads(out)["sets"]
    assert entry["images"] == 12 and entry["published"] and entry["version"] == 2
    code, out, _ = cli("label", "--set", "shapes")
    assert "0 images labelled" in out  # nothing new

    # Search shows labels and filters by them.
    code, out, _ = cli("search", "a red circle", "-k", "3", "--json")
    first = json.loads(out)["results"][0]
    assert len(first["labels"]) == 1 and first["labels"][0]["set"] == "shapes"
    label = first["labels"][0]["label"]
    code, out, err = cli("search", "a blue star", "-k", "12", "--label", label, "--json")
    assert code == 0, err
    hits = json.loads(out)["results"]
    assert hits and all(hit["labels"][0]["label"] == label for hit in hits)
    code, out, _ = cli("search", "a blue star", "-k", "2")
    header, first, _ = out.splitlines()
    assert header == "   score        id  path  [labels]"
    assert first.endswith("]") and f"[{label} " in first  # text output names the labels

    code, out, _ = cli("labels", "delete", "shapes", "--yes")
    assert code == 0 and "deleted label set shapes" in out
    code, out, _ = cli("labels", "list")
    assert "no label sets" in out


def test_label_errors_are_one_line_with_exit_codes(
    env: Settings,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("labels: [a, a]\n")
    cases = [
        (["labels", "add", str(broken)], 2, "label 'a' appears twice"),
        (["labels", "add", str(tmp_path / "absent.yaml")], 2, "cannot read the file"),
        (["labels", "show", "nope"], 7, "No label set named 'nope'"),
        (["labels", "delete", "nope", "--yes"], 7, "No label set named 'nope'"),
        (["label", "--set", "nope"], 7, "No label set named 'nope'"),
        (["search", "a", "--label", "cat"], 2, "No label 'cat' in any label set"),
    ]
    for args, code, message in cases:
        got, _, err = run_cli(args, capsys, monkeypatch)
        assert got == code, (args, err)
        assert message in err and "Traceback" not in err
    run_cli(["labels", "add", str(write_set(tmp_path / "s.json"))], capsys, monkeypatch)
    got, _, err = run_cli(["labels", "delete", "shapes"], capsys, monkeypatch)
    assert got == 2 and "--yes" in err  # not a terminal: no silent deletion


def test_a_label_file_over_the_prompt_bound_is_refused_and_not_stored(
    env: Settings,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = write_set(tmp_path / "s.json")  # 24 labels x 2 templates = 48 prompts
    monkeypatch.setenv("CLIPSEARCH_LABEL_SET_MAX_PROMPTS", "47")
    got, _, err = run_cli(["labels", "add", str(path)], capsys, monkeypatch)
    assert got == 2 and "Traceback" not in err
    assert "48 prompts" in err and "CLIPSEARCH_LABEL_SET_MAX_PROMPTS" in err
    assert run_cli(["labels", "show", "shapes"], capsys, monkeypatch)[0] == 7
    monkeypatch.setenv("CLIPSEARCH_LABEL_SET_MAX_PROMPTS", "48")
    assert run_cli(["labels", "add", str(path)], capsys, monkeypatch)[0] == 0


@pytest.mark.parametrize("path", sorted(EXAMPLES.iterdir()), ids=lambda p: p.name)
def test_shipped_example_label_sets_are_valid(path: Path) -> None:
    label_set = load_label_set_file(path)
    assert label_set.name == path.stem and len(label_set.labels) >= 3
    groups = label_set.prompt_groups()
    assert all(groups) and all(len(set(group)) == len(group) for group in groups)
    if label_set.name == "moderation":  # review labels need more than the set's threshold
        probability, _ = label_set.thresholds()
        assert (probability > label_set.threshold).sum() >= 5
    if label_set.name.endswith("-zh"):  # Chinese labels through Chinese templates only
        assert label_set.templates == "zh" and 15 <= len(label_set.labels) <= 30
        for label, prompts in zip(label_set.labels, groups, strict=True):
            assert HAN.search(label.name), label.name
            assert not any(re.search("[A-Za-z]", prompt) for prompt in prompts), prompts


def test_the_chinese_example_labels_images_from_the_command_line(
    env: Settings,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def cli(*args: str) -> tuple[int, str, str]:
        return run_cli(list(args), capsys, monkeypatch)

    generate_shapes(tmp_path / "pics", 6, seed=5)
    code, _, err = cli("index", str(tmp_path / "pics"))
    assert code == 0, err
    # The example as shipped but for its threshold: the random test model's probabilities are
    # nearly uniform over 25 labels, all under the shipped 0.15.
    definition = yaml.safe_load((EXAMPLES / "scenes-zh.yaml").read_text(encoding="utf-8"))
    example = tmp_path / "scenes-zh.yaml"
    dumped = yaml.safe_dump({**definition, "threshold": 0.0}, allow_unicode=True)
    example.write_text(dumped, encoding="utf-8")
    names = load_label_set_file(example).names
    code, out, err = cli("labels", "add", str(example))
    assert code == 0, err
    assert f"created label set scenes-zh: version 1, {len(names)} labels" in out
    code, out, err = cli("label", "--set", "scenes-zh", "--json")
    assert code == 0, err
    assert json.loads(out)["sets"][0]["images"] == 6
    code, out, _ = cli("labels", "show", "scenes-zh", "--json")
    counts = json.loads(out)["counts"]["counts"]
    assert list(counts) == names  # Chinese names, as written
    # The random test model reads no Chinese, but a Chinese label filter and query still work.
    best = max(counts, key=counts.__getitem__)
    code, out, err = cli("search", "海边的日落", "-k", "6", "--label", best, "--json")
    assert code == 0, err
    hits = json.loads(out)["results"]
    assert hits and all(best in [x["label"] for x in hit["labels"]] for hit in hits)
    code, out, _ = cli("search", "海边的日落", "-k", "2")
    assert code == 0 and any(name in out.splitlines()[1] for name in names)  # shown as written
