"""Fault injection, the short run: index, compact, label and repair killed at their commit points
while a reader searches, a byte flip in every shard file type, and a deleted catalog; nothing is
lost, duplicated, orphaned or laundered, and the end state is a clean run's.

bench/chaos.py runs the same machinery (tests/chaos.py) for hundreds of random kills.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from retrieval.models.encoder import Encoder
from tests.chaos import FLIP_TARGETS, Chaos, ChaosConfig, ChaosReport, Commands, Databases
from tests.conftest import PG_URL, fresh_database

database_of = contextlib.contextmanager(fresh_database)

# Each command killed at least twice (once exactly before or after its commit), a byte flip of
# every file type with compaction and repair (killed too) in between, and the catalog deleted
# while shards exist. Steps without a kill finish what a killed one left.
PLAN = [
    "index:during_encode",
    "flip",  # index.faiss
    "compact:compact_before_commit",
    "repair:repair_before_commit",
    "label:during_labels",
    "repair",
    "index:after_shard_write",
    "flip",  # embeddings.npy data
    "compact",
    "repair:repair_after_commit",
    "label:before_label_publish",
    "flip",  # embeddings.npy header (the repair above left nothing degraded)
    "compact:compact_after_commit",
    "repair",
    "catalog",
    "index:before_commit",
    "flip",  # ids.npy
    "repair:timed",
    "repair",
    "flip",  # shard.json
    "index:after_commit",
    "repair",
]

# On Postgres, one kill of each command at its commit, one flip, and the catalog "deleted" (the
# writers pointed at an empty database): the same code paths, with Postgres's transactions.
PG_PLAN = [
    "index:before_commit",
    "compact:compact_after_commit",
    "flip",  # index.faiss
    "repair:repair_after_commit",
    "label:during_labels",
    "catalog",
]
PG = [
    pytest.mark.postgres,
    pytest.mark.skipif(PG_URL is None, reason="set CLIPSEARCH_TEST_DATABASE_URL to test Postgres"),
]
CASES = [
    pytest.param("sqlite", PLAN, id="sqlite"),
    pytest.param("postgres", PG_PLAN, id="postgres", marks=PG),
]


@pytest.fixture(scope="module")
def commands(tmp_path_factory: pytest.TempPathFactory) -> Commands:
    return Commands(tmp_path_factory.mktemp("chaos-logs"))


def _chaos(
    database: str,
    plan: list[str],
    tmp_path: Path,
    checkpoint: Path,
    encoder: Encoder,
    commands: Commands,
) -> Iterator[ChaosReport]:
    (tmp_path / "twin").mkdir()
    blanks = iter(range(100))

    def blank() -> AbstractContextManager[str]:
        return database_of(database, tmp_path / f"blank-{next(blanks)}")

    with database_of(database, tmp_path) as url, database_of(database, tmp_path / "twin") as twin:
        databases = Databases(database, url, twin, blank if database == "postgres" else None)
        config = ChaosConfig(
            base=tmp_path, checkpoint=checkpoint, databases=databases, kills=0, plan=plan
        )
        yield Chaos(config, encoder, commands).run()


@pytest.mark.slow
@pytest.mark.parametrize(("database", "plan"), CASES)
def test_kills_byte_flips_and_a_deleted_catalog_lose_nothing(
    database: str,
    plan: list[str],
    tmp_path: Path,
    tiny_checkpoint: Path,
    encoder: Encoder,
    commands: Commands,
) -> None:
    for report in _chaos(database, plan, tmp_path, tiny_checkpoint, encoder, commands):
        found = report.to_dict()
        shown = "\n".join(report.problems + report.steps)
        # The faults happened: every command killed, every file type flipped, catalog gone.
        assert set(found["kills_by_command"]) == {"index", "compact", "label", "repair"}, found
        assert found["kills_at_crash_points"] == sum(
            1 for step in plan if ":" in step and not step.endswith(":timed")
        ), shown
        flipped = FLIP_TARGETS[: plan.count("flip")]
        assert found["flips"] == dict.fromkeys(sorted(flipped), 1)
        assert found["catalog_deletions"] == 1
        assert found["queries"] > 0
        # ... and nothing went wrong.
        for count in (
            "failed_queries",
            "lost",
            "duplicated",
            "orphaned",
            "laundered",
            "undetected_flips",
            "unrepaired",
            "catalog_damage",
            "lock_held",
            "unexpected_exits",
            "tracebacks",
        ):
            assert found[count] == 0, f"{count}: {found[count]}\n{shown}"
        assert found["final_identical"], found["final_differences"]
