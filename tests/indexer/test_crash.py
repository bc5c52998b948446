"""Crash safety: SIGKILL the indexer at several points; the previous generation must survive
and a re-run must end exactly where a clean run ends. Also: a second indexer refuses."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from indexer.crash import CRASH_ENV
from indexer.lock import IndexLock
from indexer.pipeline import IndexJob
from retrieval.catalog.database import Catalog
from retrieval.config import Settings
from retrieval.index.shard import list_shard_dirs
from retrieval.models.encoder import Encoder, load_encoder
from retrieval.search import Searcher
from retrieval.training.shapes import generate_shapes
from tests.conftest import FamilyModel
from tests.serving import run_cli

QUERIES = ["a red circle", "a blue square", "a green star"]


def _cli(
    settings: Settings, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    small = {
        "CLIPSEARCH_BATCH_SIZE": "8",
        "CLIPSEARCH_SHARD_SIZE": "16",
        "CLIPSEARCH_RETIRE_GRACE_SECONDS": "0",
    }
    return run_cli(settings, *args, env={**small, **(env or {})})


def _state(settings: Settings, catalog: Catalog, encoder: Encoder) -> dict[str, object]:
    """Everything a user can observe: live ids and paths, and top-k for fixed queries."""
    live = sorted(
        (rec.id, os.path.relpath(rec.path, settings.data_dir.parent))
        for rec in catalog.records_under([str(settings.data_dir.parent)]).values()
        if rec.status == "active"
    )
    searcher = Searcher(catalog, settings.resolved_index_dir, encoder)
    try:
        tops = {q: [h.id for h in searcher.search_text(q, 5).hits] for q in QUERIES}
    finally:
        searcher.close()
    return {"live": live, "tops": tops}


def _layout(base: Path) -> tuple[Path, Path]:
    first, second = base / "pics" / "a", base / "pics" / "b"
    generate_shapes(first, 20, seed=1)
    generate_shapes(second, 20, seed=2)
    return first, second


def _clean_run(base: Path, settings: Settings, encoder: Encoder) -> dict[str, object]:
    """A clean two-step run (folder a, then a+b) in its own place, never killed."""
    first, _ = _layout(base)
    clean = settings.model_copy(
        update={
            "data_dir": base / "data",
            "database_url": f"sqlite:///{base / 'c.db'}",
            "shard_size": 16,
            "batch_size": 8,
        }
    )
    catalog = Catalog(clean.resolved_database_url)
    IndexJob(clean, catalog, lambda: encoder, progress=False).run([first])
    IndexJob(clean, catalog, lambda: encoder, progress=False).run([first.parent])
    state = _state(clean, catalog, encoder)
    catalog.dispose()
    return state


@pytest.fixture
def reference(
    tmp_path_factory: pytest.TempPathFactory, settings: Settings, encoder: Encoder
) -> dict[str, object]:
    return _clean_run(tmp_path_factory.mktemp("clean"), settings, encoder)


@pytest.mark.slow
@pytest.mark.parametrize(
    "point",
    ["during_encode", "before_shard_write", "after_shard_write", "before_commit", "after_commit"],
)
def test_killed_job_leaves_previous_generation_and_rerun_converges(
    point: str,
    tmp_path: Path,
    settings: Settings,
    catalog: Catalog,
    encoder: Encoder,
    reference: dict[str, object],
    db_url: str,
) -> None:
    if not db_url.startswith("sqlite") and point not in ("after_shard_write", "before_commit"):
        pytest.skip("Postgres runs the two points around the commit; SQLite runs all")
    _kill_and_rerun(point, tmp_path, settings, catalog, encoder, reference)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after_shard_write", "before_commit"])
def test_a_killed_job_of_another_family_converges_too(
    point: str,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    settings: Settings,
    family_models: dict[str, FamilyModel],
    db_url: str,
) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("the open_clip runs cover Postgres; the family's code path is the same")
    chinese = family_models["cn_clip"]
    settings = settings.model_copy(
        update={"model": chinese.model, "pretrained": chinese.pretrained}
    )
    encoder = load_encoder(chinese.spec())
    reference = _clean_run(tmp_path_factory.mktemp("clean-zh"), settings, encoder)
    catalog = Catalog(db_url)
    catalog.upgrade()
    try:
        _kill_and_rerun(point, tmp_path, settings, catalog, encoder, reference)
    finally:
        catalog.dispose()


def _kill_and_rerun(
    point: str,
    tmp_path: Path,
    settings: Settings,
    catalog: Catalog,
    encoder: Encoder,
    reference: dict[str, object],
) -> None:
    settings = settings.model_copy(
        update={"data_dir": tmp_path / "data", "shard_size": 16, "batch_size": 8}
    )
    first, _ = _layout(tmp_path)
    # Only the killed run needs its own process (each start costs seconds of imports).
    IndexJob(settings, catalog, lambda: encoder, progress=False).run([first])
    before = catalog.state().generation
    before_ids = sorted(r.id for r in catalog.records_under([str(first)]).values())

    killed = _cli(
        settings,
        "index",
        str(first.parent),
        "--no-progress",
        "--workers",
        "2",
        env={CRASH_ENV: point},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    # The previous generation still serves: only folder a's images, all searchable.
    if point != "after_commit":
        assert catalog.state().generation == before
    searcher = Searcher(catalog, settings.resolved_index_dir, encoder)
    try:
        hits = searcher.search_text("a red circle", 60).hits
        returned = sorted(h.id for h in hits)
        if point in ("during_encode", "before_shard_write", "after_shard_write", "before_commit"):
            assert returned == before_ids
        assert all(Path(h.path).exists() for h in hits)
    finally:
        searcher.close()

    rerun = IndexJob(
        settings.model_copy(update={"workers": 2}), catalog, lambda: encoder, progress=False
    )
    rerun.run([first.parent])
    known = {s.id for s in catalog.shards()}
    assert set(list_shard_dirs(settings.resolved_index_dir)) == known, "orphan shard left behind"
    assert _state(settings, catalog, encoder) == reference


def test_second_indexer_refuses_clearly(settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "pics"
    generate_shapes(root, 4, seed=0)
    settings.resolved_index_dir.mkdir(parents=True)
    with IndexLock(settings.resolved_index_dir):
        second = _cli(settings, "index", str(root), "--no-progress")
    assert second.returncode == 3
    assert "Another indexer is already running" in second.stderr
    assert f"pid {os.getpid()}" in second.stderr
    assert "Traceback" not in second.stderr
    # and once the first one is gone, the lock is free again
    with IndexLock(settings.resolved_index_dir):
        pass
