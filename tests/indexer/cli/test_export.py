"""`clipsearch export`, and commands run with CLIPSEARCH_RUNTIME=onnx: a cached export is
reported, a corrupt one rebuilt by `export` and refused (exit 5) or run around by the others,
with nothing in the index changed."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from retrieval.config import Settings
from retrieval.models.runtimes.onnx_store import read_manifest
from retrieval.training.shapes import generate_shapes
from tests.indexer.cli.test_cli import env, run_cli  # noqa: F401 - `env` is a fixture

pytestmark = pytest.mark.usefixtures("env")


@pytest.fixture
def cache(tiny_export_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    copy = tmp_path / "model-cache"
    shutil.copytree(tiny_export_cache, copy)
    monkeypatch.setenv("CLIPSEARCH_MODEL_CACHE_DIR", str(copy))
    return copy


def _folder(cache: Path) -> Path:
    (key,) = [p for p in (cache / "clipsearch-exports").iterdir() if p.is_dir()]
    (folder,) = [p for p in key.iterdir() if p.is_dir()]
    return folder


def test_export_reports_the_cached_export(
    cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder(cache)
    code, out, err = run_cli(["export"], capsys, monkeypatch)
    assert code == 0, err
    lines = out.splitlines()
    manifest = read_manifest(folder)
    assert manifest is not None
    described = re.escape(manifest.identity.describe())
    assert re.fullmatch(rf"{described}: already exported \(cached, checked\) in [\d.]+ s", lines[0])
    assert lines[1] == f"folder: {folder}"
    assert lines[2].startswith("  image fp32 image.onnx ")
    assert "max diff to torch" in lines[2]
    assert lines[-1] == "run it with CLIPSEARCH_RUNTIME=onnx (or auto)"

    code, out, err = run_cli(["export", "--json"], capsys, monkeypatch)
    assert code == 0, err
    report = json.loads(out)
    assert report["folder"] == str(folder) and report["built"] is False
    assert set(report["towers"]) == {"image", "text"}
    assert report["towers"]["text"]["fp32"]["max_abs_diff"] <= 1e-5
    assert report["towers"]["text"]["int8"]["file"] == "text.int8.onnx"


@pytest.mark.slow  # one export
def test_export_rebuilds_a_corrupt_export(
    cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder(cache)
    data = folder / "image.onnx.data"
    data.write_bytes(data.read_bytes()[:-8])
    code, out, err = run_cli(["export", "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(out)["built"] is True
    assert "exporting the image tower" not in err  # --json prints nothing else
    manifest = read_manifest(folder)
    assert manifest is not None and manifest.files["image.onnx.data"]["bytes"] == (
        data.stat().st_size
    )


@pytest.mark.parametrize(("package", "extra"), [("onnxscript", "export"), ("onnxruntime", "onnx")])
def test_export_without_its_packages_names_the_extra(
    package: str, extra: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    code, out, err = run_cli(["export"], capsys, monkeypatch)
    assert code == 2
    assert err == (
        "error: Invalid setting clipsearch export: exporting a model to ONNX needs the package "
        f"{package}, not installed here; install it with: pip install 'clipsearch[{extra}]'\n"
    )


def _index_files(settings: Settings) -> dict[str, str]:
    """Every file of the index and the catalog, with its sha256."""
    paths = [p for p in settings.resolved_index_dir.rglob("*") if p.is_file()]
    url = settings.resolved_database_url
    if url.startswith("sqlite:///"):
        paths.append(Path(url.removeprefix("sqlite:///")))
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_search_on_onnx_and_a_corrupt_export(
    cache: Path,
    env: Settings,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    generate_shapes(tmp_path / "pics", 8, seed=4)
    assert run_cli(["index", str(tmp_path / "pics")], capsys, monkeypatch)[0] == 0
    query = ["search", "a red circle", "-k", "3", "--json"]
    code, torch_out, err = run_cli(query, capsys, monkeypatch)
    assert code == 0, err
    before = _index_files(env)

    monkeypatch.setenv("CLIPSEARCH_RUNTIME", "onnx")
    code, onnx_out, err = run_cli(query, capsys, monkeypatch)
    assert code == 0, err
    ours, theirs = json.loads(onnx_out)["results"], json.loads(torch_out)["results"]
    assert [r["id"] for r in ours] == [r["id"] for r in theirs]
    assert [r["score"] for r in ours] == pytest.approx([r["score"] for r in theirs], abs=1e-4)

    folder = _folder(cache)
    text = folder / "text.onnx.data"
    flipped = bytearray(text.read_bytes())
    flipped[100] ^= 0xFF
    text.write_bytes(bytes(flipped))
    monkeypatch.setenv("CLIPSEARCH_ONNX_FALLBACK", "refuse")
    code, out, err = run_cli(query, capsys, monkeypatch)
    assert code == 5 and out == ""
    assert err == (
        f"error: The ONNX export in {folder} cannot be used: text.onnx.data: sha256 differs "
        "from its manifest. Run `clipsearch export --force` to build it again, or set "
        "CLIPSEARCH_RUNTIME=torch.\n"
    )

    monkeypatch.setenv("CLIPSEARCH_ONNX_FALLBACK", "torch")  # the default
    code, out, err = run_cli(query, capsys, monkeypatch)
    assert code == 0
    assert "sha256 differs from its manifest" in caplog.text  # logged: on stderr in a shell
    assert "Running torch instead." in caplog.text
    assert json.loads(out)["results"] == json.loads(torch_out)["results"]
    assert _index_files(env) == before  # nothing in the index or the catalog changed
    assert text.read_bytes() == bytes(flipped)  # and the export was left for a look


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_eval_fidelity_compares_the_runtime_with_torch_fp32(
    quantize: str,
    cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pics = tmp_path / "pics"
    generate_shapes(pics, 8, seed=4)
    assert run_cli(["index", str(pics)], capsys, monkeypatch)[0] == 0
    monkeypatch.setenv("CLIPSEARCH_RUNTIME", "onnx")
    monkeypatch.setenv("CLIPSEARCH_QUANTIZE", quantize)
    args = ["eval", "--fidelity", "--zero-shot", str(pics), "-k", "3"]
    code, out, err = run_cli([*args, "--json"], capsys, monkeypatch)
    assert code == 0, err
    report = json.loads(out)
    assert report["reference"] == "torch fp32 on cpu"
    assert report["texts"] == 24 and report["images"] == 16  # 8 indexed, 8 of the set
    overlap, zero_shot = report["top3_overlap"], report["zero_shot"]
    assert overlap["queries"] == 24 and zero_shot["images"] == 8
    if quantize == "none":
        assert report["runtime"] == "onnx (CPUExecutionProvider)"
        assert report["cosine_min"] >= 0.99999
        assert overlap["mean"] == overlap["min"] == 1.0
        assert zero_shot["delta_top1"] == 0.0
    else:
        assert report["runtime"] == "onnx-int8 (CPUExecutionProvider)"
        assert 0.99 < report["cosine_min"] < 0.99999
        assert 0.0 <= overlap["min"] <= overlap["mean"] <= 1.0
        assert zero_shot["delta_top1"] == zero_shot["top1"] - zero_shot["reference_top1"]

    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert out.splitlines()[0] == f"fidelity of {report['runtime']} against torch fp32 on cpu"
    assert out.splitlines()[1].startswith("  cosine of embeddings (24 texts, 16 images): min ")


def test_eval_fidelity_needs_an_index_or_a_labelled_set(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run_cli(["eval", "--fidelity"], capsys, monkeypatch)
    assert code == 2
    assert err == (
        "error: Invalid setting eval --fidelity: needs an index (for the top-k overlap of its "
        "searches) or --zero-shot SET\n"
    )
