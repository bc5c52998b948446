"""`clipsearch models`: the recommended table, `fetch` (the hub faked at its download functions)
and `import` (checked, installed where the loaders find it, refused when a check fails)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import open_clip
import pytest

from retrieval.models import fetch as fetch_module
from retrieval.models import recommended
from retrieval.models.encoder import load_encoder
from retrieval.models.identity import ModelSpec
from retrieval.models.weights import register_model_configs, resolve_weights, sha256_file
from tests.conftest import TINY, FamilyModel
from tests.indexer.cli.test_cli import run_cli

TINY_REPO = "clipsearch-test/tiny-clip"
TINY_TAG = "tiny_tag"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty model cache (CLIPSEARCH_MODEL_CACHE_DIR) and no route to the hub."""
    folder = tmp_path / "model-cache"
    folder.mkdir()
    monkeypatch.setenv("CLIPSEARCH_MODEL_CACHE_DIR", str(folder))
    monkeypatch.setenv("CLIPSEARCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(fetch_module, "host_resolves", lambda url, timeout=3.0: False)
    return folder


def _table(tmp_path: Path, rows: list[dict[str, Any]]) -> Path:
    path = tmp_path / "recommended.json"
    path.write_text(json.dumps({"about": "test table", "models": rows}))
    return path


def _row(
    name: str, model: str, pretrained: str, family: str, repo: str, files: list[str], **kw: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "model": model,
        "pretrained": pretrained,
        "family": family,
        "languages": "English",
        "dim": 128,
        "params": 1000,
        "weights": {
            "repo": repo,
            "files": files,
            "size": kw.get("size"),
            "sha256": kw.get("sha256"),
        },
        "needs": kw.get("needs", []),
        "speed": None,
        "note": "",
    }


@pytest.fixture
def tiny_in_table(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, Any]]:
    """The tiny open_clip model as a recommended model with a hub tag (its sha256 recorded), so
    that an imported file is found by the loader exactly as a real tag's would be."""
    register_model_configs()
    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED, TINY, {TINY_TAG: {"hf_hub": f"{TINY_REPO}/"}}
    )
    row = _row(
        "tiny",
        TINY,
        TINY_TAG,
        "open_clip",
        TINY_REPO,
        ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"],
        sha256=sha256_file(tiny_checkpoint),
        size=tiny_checkpoint.stat().st_size,
    )
    rows = [row, *json.loads(recommended.TABLE.read_text())["models"]]
    monkeypatch.setattr(recommended, "TABLE", _table(tmp_path, rows))
    recommended.recommended_models.cache_clear()
    yield row
    recommended.recommended_models.cache_clear()


# --- the table ------------------------------------------------------------------------------


def test_the_table_names_each_model_and_whether_it_is_here(
    cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run_cli(["models", "--json"], capsys, monkeypatch)
    assert code == 0, err
    rows = {row["name"]: row for row in json.loads(out)["models"]}
    assert {
        "ViT-B-32",
        "ViT-L-14",
        "cn-clip:ViT-B-16",
        "cn-clip:RN50",
        "xlm-roberta-base-ViT-B-32",
        "ViT-B-16-SigLIP2",
        "hf:OFA-Sys/chinese-clip-vit-base-patch16",
    } <= set(rows)
    b32 = rows["ViT-B-32"]
    assert b32["pretrained"] == "laion2b_s34b_b79k" and b32["dim"] == 512
    assert b32["weights"]["repo"] == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert b32["speed"] == {"text_query_ms": 16.1, "images_per_s": 27.1}
    assert rows["ViT-L-14"]["speed"] is None  # not measured, and said so
    assert rows["xlm-roberta-base-ViT-B-32"]["needs"] == [{"repo": "xlm-roberta-base"}]
    assert not any(row["here"] for row in rows.values())

    # A file in the import folder makes its model present.
    imported = cache / "clipsearch-imports" / "laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    imported.mkdir(parents=True)
    (imported / "open_clip_model.safetensors").write_bytes(b"x")
    code, out, _ = run_cli(["models", "list"], capsys, monkeypatch)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert lines["ViT-B-32"].rstrip().endswith("yes")
    assert lines["ViT-L-14"].rstrip().endswith("no")
    assert "16.1 ms / 27.1/s" in lines["ViT-B-32"] and "not measured" in lines["ViT-L-14"]
    assert "~605 MB" in lines["ViT-B-32"]


def test_the_table_agrees_with_open_clip_and_cn_clip() -> None:
    from retrieval.models.families.chinese_clip import releases
    from retrieval.models.weights import hub_files

    for row in recommended.recommended_models():
        if row.family == "open_clip":
            cfg = open_clip.get_pretrained_cfg(row.model, row.pretrained)
            assert hub_files(cfg) == (row.weights.repo, row.weights.files), row.name
            assert open_clip.get_model_config(row.model)["embed_dim"] == row.dim
        elif row.family == "cn_clip":
            release = releases()[row.model.split(":", 1)[1]]
            assert (release.repo, (release.filename,)) == (row.weights.repo, row.weights.files)
        assert row.weights.sha256 is None or len(row.weights.sha256) == 64


# --- fetch ----------------------------------------------------------------------------------


def test_fetch_offline_fails_fast_naming_the_files_and_the_commands(
    cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    started = time.monotonic()
    code, out, err = run_cli(["models", "fetch", "cn-clip:ViT-B-16"], capsys, monkeypatch)
    assert code == 5
    assert "OFA-Sys/chinese-clip-vit-base-patch16" in err and "clip_cn_vit-b-16.pt" in err
    assert "unreachable" in err and "clipsearch models import FOLDER" in err
    assert "Traceback" not in err
    assert time.monotonic() - started < 30  # no retries against an absent network
    assert not any(cache.iterdir())


def test_fetch_names_the_nearest_model_for_a_typo(
    cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run_cli(["models", "fetch", "ViT-B-23"], capsys, monkeypatch)
    assert code == 2 and "Did you mean ViT-B-32" in err


def _fake_hub(cache: Path, files: dict[tuple[str, str], bytes], calls: list[Any]) -> Any:
    """hf_hub_download and snapshot_download as the hub would answer, writing the hub cache's
    own layout (refs/main, snapshots/<commit>/, blobs named by sha256)."""
    from huggingface_hub.errors import EntryNotFoundError

    commit = "0123456789abcdef0123456789abcdef01234567"

    def place(repo: str, name: str, cache_dir: Any) -> str:
        data = files[(repo, name)]
        folder = Path(cache_dir) / f"models--{repo.replace('/', '--')}"
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(commit)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
        return str(link)

    def hf_hub_download(repo: str, name: str, *, cache_dir: Any = None, **_: Any) -> str:
        calls.append(("file", repo, name, cache_dir))
        if (repo, name) not in files:
            raise EntryNotFoundError(f"{name} not in {repo}")
        return place(repo, name, cache_dir)

    def snapshot_download(repo: str, *, cache_dir: Any = None, **kw: Any) -> str:
        calls.append(("repo", repo, kw.get("allow_patterns"), cache_dir))
        if kw.get("local_files_only"):
            raise FileNotFoundError(repo)
        paths = [place(r, n, cache_dir) for r, n in files if r == repo]
        return str(Path(paths[0]).parent)

    return hf_hub_download, snapshot_download


def test_fetch_downloads_into_the_cache_the_loader_reads(
    cache: Path,
    tiny_in_table: dict[str, Any],
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import huggingface_hub

    calls: list[Any] = []
    # The repo has no safetensors file: fetch falls back to the .bin, as open_clip does.
    files = {(TINY_REPO, "open_clip_pytorch_model.bin"): tiny_checkpoint.read_bytes()}
    download, snapshot = _fake_hub(cache, files, calls)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(fetch_module, "host_resolves", lambda url, timeout=3.0: True)

    code, out, err = run_cli(["models", "fetch", "tiny", "--json"], capsys, monkeypatch)
    assert code == 0, err
    report = json.loads(out)
    assert [c[2] for c in calls] == ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    assert all(c[3] == cache for c in calls)  # into CLIPSEARCH_MODEL_CACHE_DIR
    assert report["files"][0]["sha256"] == sha256_file(tiny_checkpoint)
    assert report["folders"] == [str(cache / f"models--{TINY_REPO.replace('/', '--')}")]
    # The loader finds the fetched file without the network.
    path, _ = resolve_weights(ModelSpec(TINY, TINY_TAG, cache_dir=cache))
    assert path is not None and sha256_file(path) == sha256_file(tiny_checkpoint)


def test_fetch_also_gets_the_tokenizer_repo_a_model_reads(
    cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    calls: list[Any] = []
    files = {
        (
            "laion/CLIP-ViT-B-32-xlm-roberta-base-laion5B-s13B-b90k",
            "open_clip_model.safetensors",
        ): b"w",
        ("xlm-roberta-base", "tokenizer.json"): b"{}",
    }
    download, snapshot = _fake_hub(cache, files, calls)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(fetch_module, "host_resolves", lambda url, timeout=3.0: True)
    code, out, err = run_cli(
        ["models", "fetch", "xlm-roberta-base-ViT-B-32", "--no-progress"], capsys, monkeypatch
    )
    assert code == 0, err
    tokenizer_call = [c for c in calls if c[0] == "repo"]
    assert tokenizer_call and tokenizer_call[0][1] == "xlm-roberta-base"
    assert "*.safetensors" not in tokenizer_call[0][2] and "*.json" in tokenizer_call[0][2]
    assert "models--xlm-roberta-base" in out and "clipsearch models import FOLDER" in out


# --- import ---------------------------------------------------------------------------------


def test_import_checks_the_sha256_and_the_loader_finds_the_file(
    cache: Path,
    tiny_in_table: dict[str, Any],
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    carried = cache.parent / "carried" / "weights.bin"
    carried.parent.mkdir()
    carried.write_bytes(tiny_checkpoint.read_bytes())
    code, out, err = run_cli(
        ["models", "import", str(carried), "--name", "tiny", "--json"], capsys, monkeypatch
    )
    assert code == 0, err
    installed = json.loads(out)
    assert installed["sha256"] == sha256_file(tiny_checkpoint)
    assert any("clipsearch's table" in check for check in installed["checks"])
    assert any("tensors fit the architecture" in check for check in installed["checks"])
    target = Path(installed["target"])
    assert (
        target
        == cache
        / "clipsearch-imports"
        / "clipsearch-test--tiny-clip"
        / "open_clip_pytorch_model.bin"
    )
    encoder = load_encoder(ModelSpec(TINY, TINY_TAG, device="cpu", cache_dir=cache))
    assert encoder.identity.weights_sha256 == sha256_file(tiny_checkpoint)


def test_import_refuses_a_file_whose_sha256_differs(
    cache: Path,
    tiny_in_table: dict[str, Any],
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    damaged = cache.parent / "damaged.bin"
    data = bytearray(tiny_checkpoint.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the tensors: same size, same structure
    damaged.write_bytes(bytes(data))
    code, _, err = run_cli(
        ["models", "import", str(damaged), "--name", "tiny"], capsys, monkeypatch
    )
    assert code == 5, err
    assert "sha256" in err and tiny_in_table["weights"]["sha256"] in err
    assert "Nothing was installed" in err and "Traceback" not in err
    assert not (cache / "clipsearch-imports").exists()


def test_import_refuses_a_sha256_given_by_hand_that_differs(
    cache: Path,
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No sha256 is recorded for ViT-B-32: the user's --sha256 (the hub's page shows it) counts.
    code, _, err = run_cli(
        ["models", "import", str(tiny_checkpoint), "--name", "ViT-B-32", "--sha256", "0" * 64],
        capsys,
        monkeypatch,
    )
    assert code == 5 and "--sha256 says" in err and "Nothing was installed" in err
    assert not any(cache.rglob("*.bin"))


def test_import_refuses_weights_of_another_architecture(
    cache: Path,
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No sha256 is recorded for the real ViT-B-32: the tensors are compared with its
    # architecture (built on the meta device), and the tiny model's do not fit.
    code, _, err = run_cli(
        ["models", "import", str(tiny_checkpoint), "--name", "ViT-B-32"], capsys, monkeypatch
    )
    assert code == 5 and "does not hold the weights of ViT-B-32" in err
    assert "of another shape" in err or "missing" in err
    assert not any(cache.rglob("*.bin"))


def test_import_knows_a_chinese_clip_release_by_its_name_and_checks_it(
    cache: Path,
    family_models: dict[str, FamilyModel],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A tiny Chinese-CLIP checkpoint under the RN50 release's name: taken for cn-clip:RN50,
    # whose architecture it does not fit.
    carried = cache.parent / "clip_cn_rn50.pt"
    carried.write_bytes(Path(family_models["cn_clip"].pretrained).read_bytes())
    code, _, err = run_cli(["models", "import", str(carried)], capsys, monkeypatch)
    assert code == 5 and "does not hold the weights of cn-clip:RN50" in err
    assert not (cache / "clip_cn_rn50.pt").exists()


def test_import_needs_a_name_for_an_anonymous_file(
    cache: Path,
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, _, err = run_cli(["models", "import", str(tiny_checkpoint)], capsys, monkeypatch)
    assert code == 2 and "--name" in err and "ViT-B-32" in err


def _hub_folder(root: Path, repo: str, files: dict[str, bytes]) -> Path:
    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return folder


def test_import_of_a_hub_cache_folder_checks_every_blob(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from retrieval.models.cache import cached_repo_snapshot

    carried = _hub_folder(
        tmp_path / "carried", "xlm-roberta-base", {"tokenizer.json": b"{}", "config.json": b"{ }"}
    )
    code, out, err = run_cli(["models", "import", str(carried), "--json"], capsys, monkeypatch)
    assert code == 0, err
    installed = json.loads(out)
    assert installed["models"] == ["xlm-roberta-base-ViT-B-32"]
    assert "2 files match the hashes" in installed["checks"][0]
    found = cached_repo_snapshot("xlm-roberta-base", cache, hub_only=True)
    assert found is not None and (found / "tokenizer.json").read_bytes() == b"{}"
    # Importing the same folder again changes nothing and is not an error.
    assert run_cli(["models", "import", str(carried)], capsys, monkeypatch)[0] == 0

    # A blob whose content no longer matches its name is refused, and nothing is copied.
    damaged = _hub_folder(tmp_path / "damaged", "timm/ViT-B-16-SigLIP2", {"tokenizer.json": b"{}"})
    blob = next((damaged / "blobs").iterdir())
    blob.write_bytes(b"{ damaged }")
    code, _, err = run_cli(["models", "import", str(damaged)], capsys, monkeypatch)
    assert code == 5 and "is damaged" in err and "Nothing was installed" in err
    assert not (cache / damaged.name).exists()


def test_import_of_a_model_folder_installs_it_for_its_hub_name(
    cache: Path,
    family_models: dict[str, FamilyModel],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = Path(family_models["hf"].model.removeprefix("hf:"))
    code, out, err = run_cli(
        ["models", "import", str(folder), "--name", "hf:clipsearch-test/tiny-hf-clip"],
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    assert "tensors fit the architecture" in out
    imported = load_encoder(
        ModelSpec("hf:clipsearch-test/tiny-hf-clip", "", device="cpu", cache_dir=cache)
    )
    original = load_encoder(ModelSpec(family_models["hf"].model, "", device="cpu"))
    assert imported.identity.key == original.identity.key
