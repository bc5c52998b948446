"""`clipsearch verify` and `repair`, and what the other commands say about a corrupt shard:
exit codes, messages that name the shard and the repair command, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrieval.catalog.database import Catalog
from retrieval.config import Settings
from retrieval.index.shard import EMBEDDINGS_FILE, INDEX_FILE, list_shard_dirs
from retrieval.training.shapes import generate_shapes
from tests.indexer.cli.test_cli import env, run_cli  # noqa: F401  # `env` is a fixture

CORRUPT_EXIT = 6


@pytest.fixture
def indexed(
    env: Settings,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> list[str]:
    """Twelve images in three shards; returns the shard ids."""
    monkeypatch.setenv("CLIPSEARCH_SHARD_SIZE", "4")
    generate_shapes(tmp_path / "pics", 12, seed=4)
    code, out, err = run_cli(["index", str(tmp_path / "pics"), "--json"], capsys, monkeypatch)
    assert code == 0, err
    shards = json.loads(out)["shards_written"]
    assert len(shards) == 3
    return list(shards)


def _break_header(settings: Settings, shard_id: str) -> None:
    """The issue's case: a byte of embeddings.npy's header, which numpy's parser chokes on."""
    path = settings.resolved_index_dir / "shards" / shard_id / EMBEDDINGS_FILE
    raw = bytearray(path.read_bytes())
    raw[45] = ord("(")  # an unclosed bracket in the header dict: tokenize.TokenError
    path.write_bytes(bytes(raw))


def test_verify_exits_0_when_sound_and_6_naming_the_shard_when_not(
    indexed: list[str],
    env: Settings,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, out, err = run_cli(["verify"], capsys, monkeypatch)
    assert code == 0, err
    assert "checked 3 shards" in out and "all sound" in out

    _break_header(env, indexed[1])
    code, out, err = run_cli(["verify"], capsys, monkeypatch)
    assert code == CORRUPT_EXIT
    assert f"corrupt shard {indexed[1]}" in out and "embeddings.npy" in out
    assert "clipsearch repair" in out and "Traceback" not in out + err

    code, out, _ = run_cli(["verify", "--json"], capsys, monkeypatch)
    assert code == CORRUPT_EXIT
    report = json.loads(out)
    assert report["ok"] is False and list(report["corrupt"]) == [indexed[1]]
    assert report["repair"] == "clipsearch repair"


def test_every_command_names_the_corrupt_shard_and_keeps_working(
    indexed: list[str],
    env: Settings,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bad = indexed[0]
    _break_header(env, bad)

    code, out, err = run_cli(["search", "a red circle", "-k", "12", "--json"], capsys, monkeypatch)
    assert code == 0 and "Traceback" not in err
    assert len(json.loads(out)["results"]) == 8  # the other two shards
    assert bad in err and "clipsearch repair" in err

    code, out, err = run_cli(["status"], capsys, monkeypatch)
    assert code == 0 and "DEGRADED" in out and bad in out and "clipsearch repair" in out
    code, out, _ = run_cli(["status", "--json"], capsys, monkeypatch)
    status = json.loads(out)
    assert status["degraded"] is True and list(status["corrupt_shards"]) == [bad]
    assert status["repair"] == "clipsearch repair"

    generate_shapes(tmp_path / "more", 2, seed=9)
    code, out, err = run_cli(["index", str(tmp_path / "more")], capsys, monkeypatch)
    assert code == 0 and bad in err and "clipsearch repair" in err

    code, out, err = run_cli(["compact", "--all"], capsys, monkeypatch)
    assert code == 0, err
    assert bad in err and "never rewritten" in err

    # Measuring ANN quality on part of the index would mislead: it refuses, naming the shard.
    code, _, err = run_cli(["eval", "--ann", "--ann-queries", "4"], capsys, monkeypatch)
    assert code == CORRUPT_EXIT and bad in err and "Traceback" not in err

    code, out, err = run_cli(["repair", "--dry-run", "--json"], capsys, monkeypatch)
    assert code == 0, err
    dry = json.loads(out)
    assert dry["dry_run"] is True and [r["shard_id"] for r in dry["repaired"]] == [bad]

    code, out, err = run_cli(["repair"], capsys, monkeypatch)
    assert code == 0, err
    assert f"shard {bad}" in out and "replaced by shard" in out and "0 unrecoverable" in out

    code, out, err = run_cli(["verify"], capsys, monkeypatch)
    assert code == 0, out
    code, out, _ = run_cli(["search", "a red circle", "-k", "14", "--json"], capsys, monkeypatch)
    assert len(json.loads(out)["results"]) == 14
    code, out, _ = run_cli(["repair"], capsys, monkeypatch)
    assert code == 0 and "nothing to repair" in out


def test_repair_encodes_with_the_index_s_model_not_the_environment_s(
    indexed: list[str],
    env: Settings,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Both vector files of a shard broken: its images must be encoded again. No model is
    # named (the default would be ViT-B-32 with weights that are not here): repair takes the
    # index's recorded model, as search does.
    bad = indexed[2]
    shard_dir = env.resolved_index_dir / "shards" / bad
    for name in (EMBEDDINGS_FILE, INDEX_FILE):
        raw = bytearray((shard_dir / name).read_bytes())
        raw[-9] ^= 0xFF
        (shard_dir / name).write_bytes(bytes(raw))
    monkeypatch.delenv("CLIPSEARCH_MODEL")
    monkeypatch.delenv("CLIPSEARCH_PRETRAINED")
    code, out, err = run_cli(["repair"], capsys, monkeypatch)
    assert code == 0, err
    assert f"shard {bad}" in out and "4 from reencoded" in out and "0 unrecoverable" in out
    code, out, err = run_cli(["verify"], capsys, monkeypatch)
    assert code == 0, out

    # A model named explicitly that is not the index's is refused before any load (exit 4).
    code, _, err = run_cli(["repair", "--model", "ViT-B-16"], capsys, monkeypatch)
    assert code == 4 and "ViT-B-16" in err and "Traceback" not in err


def test_repair_of_an_unknown_shard_exits_7(
    env: Settings,  # noqa: F811
    catalog: Catalog,  # an empty one (with none at all, repair exits 9)
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, _, err = run_cli(["repair", "--shard", "nope"], capsys, monkeypatch)
    assert code == 7 and "nope" in err and "Traceback" not in err


def test_verify_reports_catalog_rows_that_disagree_with_ids(
    indexed: list[str],
    env: Settings,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    catalog = Catalog(env.resolved_database_url)
    try:
        first = catalog.shard_members(indexed[0])[0]
        from sqlalchemy import update

        from retrieval.catalog.tables import ImageRow

        with catalog.session() as session:  # one image moved to another shard by hand
            session.execute(
                update(ImageRow).where(ImageRow.id == first.id).values(shard_id=indexed[1])
            )
    finally:
        catalog.dispose()
    code, out, _ = run_cli(["verify", "--json"], capsys, monkeypatch)
    assert code == CORRUPT_EXIT
    report = json.loads(out)
    assert set(report["corrupt"]) == {indexed[0], indexed[1]}
    assert f"ids only in ids.npy: {first.id}" in report["corrupt"][indexed[0]]["catalog"]


def test_verify_and_repair_refuse_a_catalog_that_is_not_the_index_dirs(
    indexed: list[str],
    env: Settings,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new, empty catalog beside the index would verify as a sound, empty index: exit 8."""
    monkeypatch.setenv("CLIPSEARCH_DATABASE_URL", f"sqlite:///{tmp_path / 'new-catalog.db'}")
    for args in (["verify"], ["repair", "--dry-run"], ["repair"]):
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 8 and "Traceback" not in err, (args, err)
    assert set(list_shard_dirs(env.resolved_index_dir)) == set(indexed)  # nothing deleted
