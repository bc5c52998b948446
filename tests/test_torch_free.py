"""A torch-free install runs from a model's export: index, search, label and serve (with a
search and a /classify) in processes where torch, torchvision and open_clip cannot be imported
(tests/fixtures/no_torch), with the results of the torch runtime on the same pictures; the
commands that need torch say which extra installs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY
from tests.serving import REPO, running_server

NO_TORCH = REPO / "tests" / "fixtures" / "no_torch"
COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 200, 40)}
LABEL_SET = {"name": "colours", "labels": ["a red picture", "a blue picture", "a green one"]}
QUERIES = ["a red circle", "一只蓝色的正方形", "🙂"]
Hits = dict[str, tuple[float, dict[str, float]]]  # path -> score, labels (name -> score)

pytestmark = pytest.mark.slow


def _pictures(root: Path) -> None:
    """Pictures of several sizes and modes (so preprocessing crops, pads nothing, converts)."""
    rng = np.random.default_rng(3)
    for n, (name, colour) in enumerate(COLOURS.items()):
        for size in ((90, 60), (61, 97), (128, 128)):
            noise = rng.integers(-25, 25, (size[1], size[0], 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels, "RGB")
            image.save(root / f"{name}-{size[0]}.jpg")
        Image.fromarray(pixels, "RGB").convert("P").save(root / f"{name}-palette-{n}.png")


def _env(model: Mapping[str, str], data: Path, runtime: str, *, torch_free: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_")}
    env.update(model)
    env.update({"CLIPSEARCH_DATA_DIR": str(data), "CLIPSEARCH_RUNTIME": runtime})
    if torch_free:
        env["PYTHONPATH"] = os.pathsep.join([str(NO_TORCH), str(REPO)])
    return env


def _cli(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "indexer", *args],
        env=dict(env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _ok(env: Mapping[str, str], *args: str) -> str:
    done = _cli(env, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _hits(results: list[dict[str, Any]]) -> Hits:
    """Each hit's path: its score and labels (name: score). Paths, not ids or ranks: pictures of
    one colour tie, and ties may come in either order."""
    return {
        Path(hit["path"]).name: (
            float(hit["score"]),
            {str(label["label"]): float(label["score"]) for label in hit["labels"]},
        )
        for hit in results
    }


def _same(
    ours: Hits,
    torch: Hits,
) -> None:
    assert ours.keys() == torch.keys()
    for path, (score, labels) in ours.items():
        assert score == pytest.approx(torch[path][0], abs=1e-4), path
        assert labels.keys() == torch[path][1].keys(), path
        for name, value in labels.items():
            assert value == pytest.approx(torch[path][1][name], abs=1e-4), (path, name)


@pytest.fixture(scope="module")
def model(tiny_export_cache: Path, tiny_checkpoint: Path) -> dict[str, str]:
    """The tiny model, named as settings name it, and the cache that holds its export."""
    return {
        "CLIPSEARCH_MODEL": TINY,
        "CLIPSEARCH_PRETRAINED": str(tiny_checkpoint),
        "CLIPSEARCH_MODEL_CACHE_DIR": str(tiny_export_cache),
        "CLIPSEARCH_DEVICE": "cpu",
    }


def _index_search_label(env: Mapping[str, str], root: Path, labels: Path) -> list[Hits]:
    _ok(env, "index", str(root), "--workers", "2", "--batch-size", "4")
    _ok(env, "labels", "add", str(labels))
    _ok(env, "label")
    return [
        _hits(json.loads(_ok(env, "search", query, "-k", "20", "--json"))["results"])
        for query in QUERIES
    ]


def test_index_search_label_and_serve_without_torch_equal_the_torch_runtime(
    model: dict[str, str], tmp_path: Path
) -> None:
    root = tmp_path / "pictures"
    root.mkdir()
    _pictures(root)
    labels = tmp_path / "colours.json"
    labels.write_text(json.dumps(LABEL_SET), encoding="utf-8")
    torch_env = _env(model, tmp_path / "torch", "torch", torch_free=False)
    free_env = _env(model, tmp_path / "onnx", "onnx", torch_free=True)

    # The blocker works: this process cannot import torch.
    blocked = _cli(free_env, "finetune", str(root), "--out", str(tmp_path / "tuned"))
    assert (blocked.returncode, blocked.stderr) == (
        2,
        "error: Invalid setting clipsearch finetune: fine-tuning needs torch, not installed "
        "here; install it with: pip install 'clipsearch[torch]'\n",
    )

    expected = _index_search_label(torch_env, root, labels)
    got = _index_search_label(free_env, root, labels)
    for ours, theirs in zip(got, expected, strict=True):
        assert len(ours) == 12
        _same(ours, theirs)

    server_env = {k: v for k, v in free_env.items() if k.startswith("CLIPSEARCH_")}
    server_env["PYTHONPATH"] = free_env["PYTHONPATH"]
    with running_server(server_env, tmp_path / "serve.log") as server:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            response = client.post("/search/text", json={"query": QUERIES[0], "k": 20})
            assert response.status_code == 200, response.text
            _same(_hits(response.json()["results"]), expected[0])
            with open(root / "red-90.jpg", "rb") as picture:
                classified = client.post(
                    "/classify",
                    files={"file": ("red.jpg", picture, "image/jpeg")},
                    data={"label_set": "colours"},
                )
            assert classified.status_code == 200, classified.text
            assert classified.json()["labels"]
    assert "Traceback" not in server.log()


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["export"], "Invalid setting clipsearch export: exporting a model to ONNX needs torch"),
        (
            ["index", "ROOT"],
            "Invalid setting CLIPSEARCH_RUNTIME: CLIPSEARCH_RUNTIME=torch needs torch",
        ),
    ],
)
def test_commands_that_need_torch_name_its_extra(
    model: dict[str, str], tmp_path: Path, args: list[str], line: str
) -> None:
    root = tmp_path / "pictures"
    root.mkdir()
    Image.new("RGB", (32, 32)).save(root / "black.png")
    args = [str(root) if arg == "ROOT" else arg for arg in args]
    done = _cli(_env(model, tmp_path / "data", "torch", torch_free=True), *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {line}, not installed here; install it with: ")
    assert "pip install 'clipsearch[torch]'" in done.stderr
    assert done.stderr.count("\n") == 1


def test_the_service_modules_import_without_torch() -> None:
    # What index, search, serve, label and classify import, torch blocked: a module that
    # imports torch at import time fails here in seconds (the test above takes a minute).
    modules = (
        "api.app, indexer.cli.app, indexer.pipeline, indexer.engines.local, indexer.labelling, "
        "retrieval.models.encoder, retrieval.models.exported.loading, retrieval.labels.scoring"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(NO_TORCH), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-c", f"import {modules}; import sys; print(sorted(sys.modules))"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "'torch'" not in done.stdout and "'open_clip'" not in done.stdout
