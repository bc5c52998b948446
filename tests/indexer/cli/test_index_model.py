"""Commands that read an index use its recorded model unless one is named, and refuse what they
can tell is wrong (a missing data dir, an empty index, a busy port, a model that is not the
index's) before any weights are loaded."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from retrieval.catalog.database import Catalog
from retrieval.config import Settings
from retrieval.models import encoder as encoder_module
from retrieval.training.shapes import generate_shapes
from tests.conftest import TINY
from tests.indexer.cli.test_cli import env, run_cli  # noqa: F401 - `env` is a fixture

MODEL_VARIABLES = ("CLIPSEARCH_MODEL", "CLIPSEARCH_PRETRAINED", "CLIPSEARCH_MODEL_CONFIG_DIR")


def free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


@pytest.fixture
def indexed(
    env: Settings,  # noqa: F811 - the fixture
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    """An index of 8 pictures built with the tiny model; afterwards no model is configured."""
    generate_shapes(tmp_path / "pics", 8, seed=5)
    code, _, err = run_cli(["index", str(tmp_path / "pics")], capsys, monkeypatch)
    assert code == 0, err
    for name in MODEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return env


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The models loaded from here on (each load is recorded, then goes ahead)."""
    seen: list[str] = []
    real = encoder_module.load_backend

    def recording(spec: Any, *args: Any) -> Any:
        seen.append(f"{spec.name} / {spec.pretrained}")
        return real(spec, *args)

    monkeypatch.setattr(encoder_module, "load_backend", recording)
    yield seen


# --- the index's model ----------------------------------------------------------------------


def test_search_with_no_model_named_uses_the_indexs(
    indexed: Settings,
    tiny_checkpoint: Path,
    loads: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without the record, the default ViT-B-32 / laion2b_s34b_b79k would be loaded (and its
    # weights are not here).
    code, out, err = run_cli(["search", "a red circle", "-k", "3", "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert loads == [f"{TINY} / {tiny_checkpoint.resolve()}"]
    result = json.loads(out)
    assert len(result["results"]) == 3 and result["model"].startswith(TINY)


def test_a_named_model_wins_over_the_indexs(
    indexed: Settings,
    loads: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Random weights of the same architecture: a certain mismatch, refused before loading.
    code, _, err = run_cli(
        ["search", "a red circle", "--model", TINY, "--pretrained", "none"], capsys, monkeypatch
    )
    assert code == 4, err
    assert "random weights, the index's are trained ones" in err
    assert "Leave out --model and --pretrained" in err and "re-index" in err
    assert loads == []


def test_other_weights_in_a_file_are_refused_by_their_sha256_before_loading(
    indexed: Settings,
    tmp_path: Path,
    loads: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import open_clip

    torch.manual_seed(99)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": open_clip.create_model(TINY).state_dict()}, other)
    monkeypatch.setenv("CLIPSEARCH_PRETRAINED", str(other))  # explicit, by the environment
    code, _, err = run_cli(["search", "a red circle"], capsys, monkeypatch)
    assert code == 4, err
    assert f"the weights in {other} are not the index's (another sha256)" in err
    assert loads == []


def test_the_indexs_model_is_named_when_its_weights_are_gone(
    env: Settings,  # noqa: F811 - the fixture
    tmp_path: Path,
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    weights = tmp_path / "moving.pt"
    weights.write_bytes(tiny_checkpoint.read_bytes())
    monkeypatch.setenv("CLIPSEARCH_PRETRAINED", str(weights))
    generate_shapes(tmp_path / "pics", 3, seed=5)
    assert run_cli(["index", str(tmp_path / "pics")], capsys, monkeypatch)[0] == 0
    for name in MODEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    weights.unlink()
    code, _, err = run_cli(["search", "a red circle"], capsys, monkeypatch)
    assert code == 5
    assert "the model the index was built with" in err and "--pretrained" in err


def test_index_and_label_keep_the_indexs_model(
    indexed: Settings,
    tmp_path: Path,
    tiny_checkpoint: Path,
    loads: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generate_shapes(tmp_path / "pics" / "more", 2, seed=9)
    code, out, err = run_cli(["index", str(tmp_path / "pics"), "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(out)["new"] == 2
    labels = tmp_path / "shapes.yaml"
    labels.write_text("name: shapes\nlabels: [circle, square, triangle]\n")
    assert run_cli(["labels", "add", str(labels)], capsys, monkeypatch)[0] == 0
    code, _, err = run_cli(["label"], capsys, monkeypatch)
    assert code == 0, err
    assert set(loads) == {f"{TINY} / {tiny_checkpoint.resolve()}"} and len(loads) == 2


# --- cheap checks first ---------------------------------------------------------------------


def test_search_of_an_empty_index_exits_9_with_the_hint(
    env: Settings,  # noqa: F811 - the fixture
    catalog: Catalog,  # an empty one, as `clipsearch db upgrade` leaves it
    loads: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env.data_dir.mkdir(parents=True)
    code, out, err = run_cli(["search", "a red circle"], capsys, monkeypatch)
    assert code == 9
    assert "holds no images yet" in err and "clipsearch index ROOT" in err
    assert loads == [] and out == ""


def test_a_missing_data_dir_is_named_as_it_was_given(
    env: Settings,  # noqa: F811 - the fixture
    tmp_path: Path,
    loads: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CLIPSEARCH_DATABASE_URL")  # the catalog is the data dir's
    missing = tmp_path / "no-such-data"
    for args in (["search", "a red circle"], ["label"], ["serve", "--port", free_port()]):
        code, _, err = run_cli([*args, "--data-dir", str(missing)], capsys, monkeypatch)
        assert code == 2, (args, err)
        assert f"Invalid setting --data-dir: the data dir {missing} does not exist" in err
    monkeypatch.setenv("CLIPSEARCH_DATA_DIR", str(missing))
    code, _, err = run_cli(["search", "a red circle"], capsys, monkeypatch)
    assert code == 2 and "Invalid setting CLIPSEARCH_DATA_DIR" in err
    assert loads == [] and not missing.exists()


# --- serve ----------------------------------------------------------------------------------


@pytest.fixture
def uvicorn_runs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """uvicorn.run, recorded instead of serving; the environment the app would read with it."""
    import os

    import uvicorn

    runs: list[dict[str, Any]] = []
    for name in ("CLIPSEARCH_DATA_DIR", "CLIPSEARCH_INDEX_DIR", *MODEL_VARIABLES):
        # Recorded by monkeypatch, so that what serve exports is undone after the test.
        monkeypatch.setenv(name, os.environ.get(name, "-"))
        if os.environ[name] == "-":
            monkeypatch.delenv(name)

    def run(app: str, **kwargs: Any) -> None:
        model = {n: os.environ.get(n) for n in ("CLIPSEARCH_DATA_DIR", *MODEL_VARIABLES)}
        runs.append({"app": app, **kwargs, "env": model})

    monkeypatch.setattr(uvicorn, "run", run)
    return runs


def test_serve_takes_the_data_dir_and_model_flags(
    indexed: Settings,
    tiny_checkpoint: Path,
    loads: list[str],
    uvicorn_runs: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CLIPSEARCH_DATA_DIR")
    flags = ["--data-dir", str(indexed.data_dir), "--model", TINY]
    port = free_port()
    flags += ["--pretrained", str(tiny_checkpoint), "--port", port]
    code, _, err = run_cli(["serve", *flags], capsys, monkeypatch)
    assert code == 0, err
    (run,) = uvicorn_runs
    assert run["port"] == int(port) and run["factory"] is True
    assert run["env"]["CLIPSEARCH_DATA_DIR"] == str(indexed.data_dir)
    assert run["env"]["CLIPSEARCH_MODEL"] == TINY
    assert run["env"]["CLIPSEARCH_PRETRAINED"] == str(tiny_checkpoint)
    assert loads == []  # the app loads the model, once, in its lifespan


def test_serve_refuses_another_model_before_loading_it(
    indexed: Settings,
    loads: list[str],
    uvicorn_runs: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, _, err = run_cli(
        ["serve", "--model", "ViT-B-32", "--port", free_port()], capsys, monkeypatch
    )
    assert code == 4 and "architecture ViT-B-32, the index's is clipsearch-tiny" in err
    assert uvicorn_runs == [] and loads == []


def test_serve_refuses_a_busy_port_first(
    indexed: Settings,
    uvicorn_runs: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, _, err = run_cli(["serve", "--port", str(port)], capsys, monkeypatch)
        assert code == 2
        assert f"Invalid setting --port: port {port} on 127.0.0.1 is in use" in err
        monkeypatch.setenv("CLIPSEARCH_PORT", str(port))
        code, _, err = run_cli(["serve"], capsys, monkeypatch)
        assert code == 2 and "Invalid setting CLIPSEARCH_PORT" in err
    assert uvicorn_runs == []


def test_serve_warns_about_an_empty_index_and_serves_it(
    env: Settings,  # noqa: F811 - the fixture
    catalog: Catalog,  # an empty one, as `clipsearch db upgrade` leaves it
    uvicorn_runs: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env.data_dir.mkdir(parents=True)
    code, _, err = run_cli(["serve", "--port", free_port()], capsys, monkeypatch)
    assert code == 0, err
    assert "holds no images yet" in err and "clipsearch index ROOT" in err
    assert len(uvicorn_runs) == 1
