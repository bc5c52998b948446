"""`clipsearch finetune` and `clipsearch eval` in-process: outputs, reports, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrieval.training.shapes import generate_shapes
from tests.indexer.cli.test_cli import run_cli

TINY = "clipsearch-tiny"


@pytest.fixture
def shapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CLIPSEARCH_DATA_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CLIPSEARCH_MODEL", TINY)
    monkeypatch.setenv("CLIPSEARCH_DEVICE", "cpu")
    monkeypatch.setenv("CLIPSEARCH_WORKERS", "0")
    root = tmp_path / "shapes"
    generate_shapes(root, 48, seed=11)
    return root


def test_help_names_the_new_commands(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run_cli(["--help"], capsys, monkeypatch)
    assert code == 0 and "finetune" in out and "eval" in out
    code, out, _ = run_cli(["finetune", "--help"], capsys, monkeypatch)
    assert code == 0 and "labelme" in out and "class-aware" in out


def test_finetune_then_index_and_eval_with_the_checkpoint(
    shapes: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "model" / "tuned.pt"
    args = ["finetune", str(shapes), "--out", str(out), "--pretrained", "none", "--steps", "2"]
    args += ["--batch-size", "12", "--lr", "1e-3", "--templates", "a {}", "--no-progress"]
    code, text, err = run_cli([*args, "--json"], capsys, monkeypatch)
    assert code == 0, err
    report = json.loads(text)
    assert report["steps"] == 2 and report["loss"] == "class-aware"
    assert Path(report["checkpoint"]) == out and out.is_file()
    assert (tmp_path / "model" / "tuned.report.json").is_file()

    code, _, err = run_cli(["index", str(shapes), "--pretrained", str(out)], capsys, monkeypatch)
    assert code == 0, err
    eval_args = ["eval", "--retrieval", str(shapes / "captions.csv"), "--zero-shot", str(shapes)]
    eval_args += ["--prompt", "a {}", "--templates", "a {}|a photo of a {}.", "--ann"]
    eval_args += ["--ann-queries", "8", "--pretrained", str(out)]
    code, text, err = run_cli([*eval_args, "--json"], capsys, monkeypatch)
    assert code == 0, err
    results = json.loads(text)
    assert results["model"]["weights_sha256"] == report["checkpoint_sha256"]
    retrieval = results["retrieval"]
    assert retrieval["images"] == 48 and retrieval["captions"] == 24
    assert set(retrieval["metrics"]["text_to_image"]) >= {"R@1", "R@5", "R@10", "mean_rank"}
    zero_shot = results["zero_shot"]["metrics"]
    assert zero_shot["templates"] == 2 and zero_shot["single_prompt"]["classes"] == 24
    ann = results["ann"]
    assert ann["vectors"] == 40 and ann["queries"] == 8
    assert [k["kind"] for k in ann["kinds"]] == ["flat", "hnsw", "ivf", "ivfpq"]
    assert ann["kinds"][0]["recall"] == 1.0

    code, text, err = run_cli(eval_args, capsys, monkeypatch)
    assert code == 0, err
    for heading in ("text to image", "image to text", "single: a {}", "ensemble of 2", "hnsw"):
        assert heading in text

    # With no weights named, eval measures the index's model: the fine-tuned checkpoint.
    assert eval_args[-2:] == ["--pretrained", str(out)]
    code, text, err = run_cli([*eval_args[:-2], "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(text)["model"]["weights_sha256"] == report["checkpoint_sha256"]


def test_finetune_reports_skipped_annotations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    monkeypatch.setenv("CLIPSEARCH_MODEL", TINY)
    for n, colour in enumerate(["red", "blue", "green", "white"]):
        Image.new("RGB", (40, 40), colour).save(tmp_path / f"{n}.png")
        shapes = [{"label": colour, "points": [[2, 2], [30, 30]], "shape_type": "rectangle"}]
        if n == 0:
            shapes.append({"label": "x", "points": [[50, 50], [60, 60]], "shape_type": "rectangle"})
        doc = {"shapes": shapes, "imagePath": f"{n}.png", "imageWidth": 40, "imageHeight": 40}
        (tmp_path / f"{n}.json").write_text(json.dumps(doc))
    out = tmp_path / "m.pt"
    args = ["finetune", str(tmp_path), "--out", str(out), "--pretrained", "none", "--steps", "1"]
    args += ["--batch-size", "4", "--val-fraction", "0", "--device", "cpu"]
    code, text, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert f"wrote {out}" in text
    assert "1 samples or annotations skipped" in err
    assert "0.json shape 1: rectangle lies outside the 40x40 image; skipped" in err


def test_bad_inputs_exit_with_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run_cli(["eval"], capsys, monkeypatch)
    assert code == 2 and "--retrieval" in err
    args = ["finetune", str(tmp_path / "nothing"), "--out", str(tmp_path / "m.pt")]
    code, _, err = run_cli([*args, "--model", TINY, "--pretrained", "none"], capsys, monkeypatch)
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli([*args, "--loss", "triplet"], capsys, monkeypatch)
    assert code == 2 and "finetune loss" in err
    code, _, err = run_cli([*args, "--templates", "fancy"], capsys, monkeypatch)
    assert code == 2 and "--templates" in err
