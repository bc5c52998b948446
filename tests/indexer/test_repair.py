"""A corrupt shard end to end: verify finds it, search serves around it, compaction refuses to
launder it, repair replaces it, and the results are those of the clean index again."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from indexer.compact import compact_index
from indexer.crash import CRASH_ENV
from indexer.pipeline import IndexJob
from indexer.repair import (
    FROM_AGREEMENT,
    FROM_EMBEDDINGS,
    FROM_INDEX,
    LOST,
    REENCODED,
    RepairJob,
    RepairReport,
)
from indexer.verify import SERVING, corrupt_shards, verify_index
from retrieval.catalog.database import Catalog
from retrieval.catalog.tables import ACTIVE, DELETED, ERROR
from retrieval.config import Settings, load_settings
from retrieval.errors import CorruptShard
from retrieval.index.integrity import quarantine
from retrieval.index.marks import VerifiedMarks
from retrieval.index.shard import (
    EMBEDDINGS_FILE,
    IDS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    list_shard_dirs,
)
from retrieval.labels.definitions import LabelSet
from retrieval.labels.store import LabelStore
from retrieval.models.encoder import Encoder
from retrieval.search import Searcher
from retrieval.training.shapes import COLOURS, SHAPES, generate_shapes
from tests.conftest import PG_URL, TINY, fresh_database
from tests.serving import run_cli

QUERIES = ["a red circle", "a blue square", "a green triangle", "a shape"]
CORPUS = 24
SHARD_SIZE = 8


@dataclass
class Corpus:
    settings: Settings
    catalog: Catalog
    encoder: Encoder
    root: Path
    shards: list[str]
    baseline: dict[str, list[tuple[int, float]]]

    def shard_dir(self, shard_id: str) -> Path:
        return self.settings.resolved_index_dir / "shards" / shard_id

    def members(self, shard_id: str) -> list[int]:
        return [r.id for r in self.catalog.shard_members(shard_id) if r.status == ACTIVE]

    def results(self) -> tuple[dict[str, list[tuple[int, float]]], dict[str, str]]:
        searcher = Searcher.from_settings(self.catalog, self.settings, self.encoder)
        try:
            found = {
                q: [(hit.id, hit.score) for hit in searcher.search_text(q, CORPUS).hits]
                for q in QUERIES
            }
            return found, searcher.snapshot().shards.corrupt_shards
        finally:
            searcher.close()

    def repair(self, *, dry_run: bool = False) -> RepairReport:
        job = RepairJob(self.settings, self.catalog, lambda: self.encoder, progress=False)
        return job.run(dry_run=dry_run)


def build_corpus(
    database: str, tmp_path: Path, checkpoint: Path, encoder: Encoder
) -> Iterator[Corpus]:
    for url in fresh_database(database, tmp_path):
        settings = load_settings(
            data_dir=tmp_path / "data",
            database_url=url,
            model=TINY,
            pretrained=str(checkpoint),
            device="cpu",
            workers=0,
            batch_size=16,
            retire_grace_seconds=0,
            shard_size=SHARD_SIZE,
        )
        catalog = Catalog(url)
        catalog.upgrade()
        root = tmp_path / "photos"
        generate_shapes(root, CORPUS, seed=11)
        (root / "captions.csv").unlink()
        report = IndexJob(settings, catalog, lambda: encoder, progress=False).run([root])
        assert len(report.shards_written) == CORPUS // SHARD_SIZE
        corpus = Corpus(settings, catalog, encoder, root, report.shards_written, {})
        corpus.baseline, corrupt = corpus.results()
        assert corrupt == {}
        try:
            yield corpus
        finally:
            catalog.dispose()


def flip(path: Path, offset: int, count: int = 1, mask: int = 0xFF) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        raw = bytearray(handle.read(count))
        handle.seek(offset)
        handle.write(bytes(b ^ mask for b in raw))


def damage(shard_dir: Path, kind: str) -> None:
    """Damage one shard the way a failing disk (or a careless hand) would."""
    if kind == "index.faiss":
        path = shard_dir / INDEX_FILE
        flip(path, path.stat().st_size // 2, 16)
    elif kind == "embeddings.npy data":
        path = shard_dir / EMBEDDINGS_FILE
        flip(path, path.stat().st_size - 64, 16)
    elif kind == "embeddings.npy header":
        flip(shard_dir / EMBEDDINGS_FILE, 40, 4)
    elif kind == "ids.npy":
        path = shard_dir / IDS_FILE
        flip(path, path.stat().st_size - 8)
    elif kind == "shard.json":
        path = shard_dir / MANIFEST_FILE
        text = path.read_text()
        at = text.index('"created_at": "') + len('"created_at": "') + 3  # a digit of the year
        flip(path, len(text[:at].encode()), mask=0x01)  # still valid JSON, only the date differs
    elif kind == "shard.json unreadable":
        path = shard_dir / MANIFEST_FILE
        flip(path, 0)  # '{' becomes a byte that is not UTF-8
    elif kind == "embeddings and index":
        damage(shard_dir, "embeddings.npy data")
        damage(shard_dir, "index.faiss")
    elif kind == "directory gone":
        shutil.rmtree(shard_dir)
    else:
        raise AssertionError(kind)


# The file the damage lands in (as verify names it), and where repair recovers vectors from.
DAMAGE = {
    "index.faiss": (INDEX_FILE, FROM_EMBEDDINGS),
    "embeddings.npy data": (EMBEDDINGS_FILE, FROM_INDEX),
    "embeddings.npy header": (EMBEDDINGS_FILE, FROM_INDEX),
    "ids.npy": (IDS_FILE, FROM_EMBEDDINGS),
    "shard.json": (MANIFEST_FILE, FROM_EMBEDDINGS),
    "shard.json unreadable": (MANIFEST_FILE, FROM_AGREEMENT),
    "embeddings and index": (EMBEDDINGS_FILE, REENCODED),
    "directory gone": ("shard", REENCODED),
}
PG = pytest.mark.skipif(PG_URL is None, reason="set CLIPSEARCH_TEST_DATABASE_URL to test Postgres")
# Every damage on SQLite; on Postgres the ones whose repair commits the most kinds of change.
CASES = [pytest.param("sqlite", kind, id=f"sqlite-{kind}") for kind in DAMAGE] + [
    pytest.param("postgres", kind, id=f"postgres-{kind}", marks=[pytest.mark.postgres, PG])
    for kind in ("shard.json", "embeddings and index")
]


@pytest.mark.parametrize(("database", "kind"), CASES)
def test_corrupt_shard_found_served_around_never_laundered_and_repaired(
    database: str, kind: str, tmp_path: Path, tiny_checkpoint: Path, encoder: Encoder
) -> None:
    for corpus in build_corpus(database, tmp_path, tiny_checkpoint, encoder):
        bad = corpus.shards[1]
        bad_ids = set(corpus.members(bad))
        damage(corpus.shard_dir(bad), kind)
        damaged_file, source = DAMAGE[kind]

        # verify names the shard and the file.
        report = verify_index(corpus.catalog, corpus.settings.resolved_index_dir)
        assert not report.ok and list(report.corrupt) == [bad]
        assert damaged_file in report.corrupt[bad], report.corrupt

        # Search serves the other shards and never the corrupt one's vectors.
        found, corrupt = corpus.results()
        assert list(corrupt) == [bad]
        for query, hits in found.items():
            assert len(hits) == CORPUS - len(bad_ids), query
            assert not bad_ids & {i for i, _ in hits}
            assert max(score for _, score in hits) < 1.01
            # The healthy shards' hits keep their scores and order.
            expected = [(i, s) for i, s in corpus.baseline[query] if i not in bad_ids]
            assert [i for i, _ in hits] == [i for i, _ in expected]

        # Compaction rewrites the healthy shards only; the corrupt one stays as it was.
        compacted = compact_index(
            corpus.catalog, corpus.settings.resolved_index_dir, merge_all=True, grace_seconds=0
        )
        assert list(compacted.corrupt) == [bad] and bad not in compacted.merged
        assert set(corpus.members(bad)) == bad_ids
        assert bad in {row.id for row in corpus.catalog.shards()}
        after = verify_index(corpus.catalog, corpus.settings.resolved_index_dir)
        assert list(after.corrupt) == [bad]  # the compacted shard is sound, nothing laundered

        # Repair replaces it through the commit point, from what can be trusted.
        repaired = corpus.repair()
        assert [r.shard_id for r in repaired.repaired] == [bad]
        result = repaired.repaired[0]
        assert result.lost == [] and result.recovered == {source: len(bad_ids)}
        assert bad not in {row.id for row in corpus.catalog.shards()}
        assert result.new_shard is not None and set(corpus.members(result.new_shard)) == bad_ids
        assert verify_index(corpus.catalog, corpus.settings.resolved_index_dir).ok

        found, corrupt = corpus.results()
        assert corrupt == {}
        for query, hits in found.items():
            want = corpus.baseline[query]
            assert [i for i, _ in hits] == [i for i, _ in want], query
            if source == REENCODED:  # encoded again: equal up to float16 rounding
                np.testing.assert_allclose([s for _, s in hits], [s for _, s in want], atol=2e-3)
            else:  # the very same vectors
                assert hits == want


def test_repair_reports_the_unrecoverable_and_index_retries_them(
    settings: Settings, tmp_path: Path, tiny_checkpoint: Path, encoder: Encoder
) -> None:
    database = "postgres" if settings.resolved_database_url.startswith("postgres") else "sqlite"
    for corpus in build_corpus(database, tmp_path / "c", tiny_checkpoint, encoder):
        bad = corpus.shards[0]
        members = corpus.catalog.shard_members(bad)
        gone, changed, kept = members[0], members[1], members[2:]
        Path(gone.path).unlink()
        with open(changed.path, "ab") as handle:
            handle.write(b"\0")  # other bytes than the ones indexed
        damage(corpus.shard_dir(bad), "embeddings and index")

        dry = corpus.repair(dry_run=True)
        assert dry.repaired[0].new_shard is None
        assert bad in {row.id for row in corpus.catalog.shards()}  # nothing written

        report = corpus.repair()
        result = report.repaired[0]
        lost = {image.id: image.reason for image in result.lost}
        assert lost == {
            gone.id: "the image file is gone",
            changed.id: "the image file changed since it was indexed",
        }
        assert result.recovered == {REENCODED: len(kept)}
        rows = corpus.catalog.records([gone.id, changed.id])
        assert {r.status for r in rows.values()} == {ERROR}
        assert {r.error_reason for r in rows.values()} == {LOST}
        found, _ = corpus.results()
        assert all({gone.id, changed.id}.isdisjoint(i for i, _ in hits) for hits in found.values())

        # The next index run encodes the changed file again and drops the one that is gone.
        IndexJob(corpus.settings, corpus.catalog, lambda: encoder, progress=False).run(
            [corpus.root]
        )
        rows = corpus.catalog.records([gone.id, changed.id])
        assert rows[changed.id].status == ACTIVE and rows[gone.id].status == DELETED
        assert verify_index(corpus.catalog, corpus.settings.resolved_index_dir).ok


def test_repair_keeps_labels_in_step_with_the_vectors(
    settings: Settings, tmp_path: Path, tiny_checkpoint: Path, encoder: Encoder
) -> None:
    database = "postgres" if settings.resolved_database_url.startswith("postgres") else "sqlite"
    names = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
    for corpus in build_corpus(database, tmp_path / "c", tiny_checkpoint, encoder):
        store = LabelStore(corpus.catalog)
        store.put(
            LabelSet.from_dict(
                {"name": "shapes", "labels": names, "templates": ["a {}"], "top_k": 2}
            )
        )
        from indexer.labelling import LabelJob

        LabelJob(corpus.settings, corpus.catalog, lambda: encoder, progress=False).run()
        ids = [i for shard in corpus.shards for i in corpus.members(shard)]
        before = store.labels_for(ids)
        assert set(before) == set(ids)

        damage(corpus.shard_dir(corpus.shards[0]), "index.faiss")  # labels carried
        damage(corpus.shard_dir(corpus.shards[1]), "embeddings and index")  # labelled again
        report = corpus.repair()
        assert len(report.repaired) == 2
        after = LabelStore(corpus.catalog).labels_for(ids)
        assert set(after) == set(ids)
        for image_id in ids:
            assert [x.label for x in after[image_id]] == [x.label for x in before[image_id]]
            np.testing.assert_allclose(
                [x.score for x in after[image_id]], [x.score for x in before[image_id]], atol=1e-3
            )
        labelled = store.labelled_shards(store.all()[0].version_id)
        assert {r.new_shard for r in report.repaired} <= labelled


def test_bytes_changed_under_a_running_searcher_stop_that_shard(
    settings: Settings, tmp_path: Path, tiny_checkpoint: Path, encoder: Encoder
) -> None:
    """Bytes changed under a running service (its index is memory-mapped): the bound stops
    serving the shard at the next query; status, verify and repair then see it too."""
    for corpus in build_corpus("sqlite", tmp_path / "c", tiny_checkpoint, encoder):
        bad = corpus.shards[2]
        searcher = Searcher.from_settings(corpus.catalog, corpus.settings, encoder)
        try:
            searcher.search_text("a shape", 5)  # first served: hashed, marked verified
            # Scale the stored vectors of the index in place: the mapped file changes under it.
            path = corpus.shard_dir(bad) / INDEX_FILE
            (shard,) = [s for s in searcher.snapshot().shards.shards if s.shard_id == bad]
            stored = shard.rows_f32(np.arange(SHARD_SIZE))
            _scale_floats(path, stored)
            hits = searcher.search_text("a shape", CORPUS).hits
            assert set(searcher.snapshot().shards.corrupt_shards) == {bad}
            assert not set(corpus.members(bad)) & {h.id for h in hits}
            with pytest.raises(CorruptShard, match=bad):
                searcher.similar(corpus.members(bad)[0])
        finally:
            searcher.close()
        assert set(corrupt_shards(corpus.catalog, corpus.settings.resolved_index_dir)) == {bad}
        report = verify_index(corpus.catalog, corpus.settings.resolved_index_dir)
        assert list(report.corrupt) == [bad]
        assert corpus.repair().repaired[0].recovered == {FROM_EMBEDDINGS: 8}
        assert verify_index(corpus.catalog, corpus.settings.resolved_index_dir).ok


def _scale_floats(path: Path, vectors: np.ndarray) -> None:
    """Multiply the copy of `vectors` that index.faiss keeps (a flat index) by 25.7, in place."""
    block = np.ascontiguousarray(vectors, dtype=np.float32).tobytes()
    offset = path.read_bytes().find(block)
    assert offset > 0
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write((vectors * 25.7).astype(np.float32).tobytes())


def test_index_and_status_name_a_corrupt_shard(
    settings: Settings, tmp_path: Path, tiny_checkpoint: Path, encoder: Encoder
) -> None:
    for corpus in build_corpus("sqlite", tmp_path / "c", tiny_checkpoint, encoder):
        damage(corpus.shard_dir(corpus.shards[0]), "ids.npy")
        report = IndexJob(corpus.settings, corpus.catalog, lambda: encoder, progress=False).run(
            [corpus.root]
        )
        assert list(report.corrupt_shards) == [corpus.shards[0]]
        assert "ids.npy" in report.corrupt_shards[corpus.shards[0]]


def test_a_shard_the_service_stopped_serving_is_reported_and_rebuilt_from_its_embeddings(
    tmp_path: Path, tiny_checkpoint: Path, encoder: Encoder
) -> None:
    """Checksums that pass do not clear it: verify reports the service's verdict, and repair
    rebuilds the index from the embeddings instead of trusting the index that lied."""
    for corpus in build_corpus("sqlite", tmp_path / "c", tiny_checkpoint, encoder):
        bad = corpus.shards[1]
        index_dir = corpus.settings.resolved_index_dir
        marks = VerifiedMarks(index_dir)
        quarantine(marks, index_dir, bad, "index.faiss scored id 9 with a cosine of 25.7")
        marks.save()

        assert corrupt_shards(corpus.catalog, index_dir) == {
            bad: "index.faiss scored id 9 with a cosine of 25.7"
        }
        report = verify_index(corpus.catalog, index_dir)
        assert list(report.corrupt) == [bad] and list(report.corrupt[bad]) == [SERVING]
        found, corrupt = corpus.results()
        assert list(corrupt) == [bad]

        result = corpus.repair().repaired[0]
        assert result.recovered == {FROM_EMBEDDINGS: SHARD_SIZE}
        assert verify_index(corpus.catalog, index_dir).ok
        found, corrupt = corpus.results()
        assert corrupt == {} and found == corpus.baseline


def test_labelling_skips_a_corrupt_shard_and_repair_labels_its_replacement(
    tmp_path: Path, tiny_checkpoint: Path, encoder: Encoder
) -> None:
    from indexer.labelling import LabelJob

    names = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
    for corpus in build_corpus("sqlite", tmp_path / "c", tiny_checkpoint, encoder):
        bad = corpus.shards[2]
        damage(corpus.shard_dir(bad), "ids.npy")
        store = LabelStore(corpus.catalog)
        store.put(LabelSet.from_dict({"name": "shapes", "labels": names, "templates": ["a {}"]}))
        labels = LabelJob(corpus.settings, corpus.catalog, lambda: encoder, progress=False).run()
        assert labels.sets[0].corrupt_shards == [bad]  # rolled back, not labelled from it
        bad_ids = corpus.members(bad)
        assert store.labels_for(bad_ids) == {}

        corpus.repair()
        assert set(LabelStore(corpus.catalog).labels_for(bad_ids)) == set(bad_ids)


def test_a_repair_killed_before_its_commit_loses_nothing_and_a_rerun_finishes_it(
    tmp_path: Path, tiny_checkpoint: Path, encoder: Encoder
) -> None:
    for corpus in build_corpus("sqlite", tmp_path / "c", tiny_checkpoint, encoder):
        bad = corpus.shards[0]
        damage(corpus.shard_dir(bad), "index.faiss")
        killed = run_cli(corpus.settings, "repair", env={CRASH_ENV: "repair_before_commit"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        index_dir = corpus.settings.resolved_index_dir
        orphans = set(list_shard_dirs(index_dir)) - corpus.catalog.known_shard_ids()
        assert len(orphans) == 1  # the new shard, written but never committed
        found, corrupt = corpus.results()
        assert list(corrupt) == [bad]  # the previous generation, still degraded and served

        corpus.repair()
        assert verify_index(corpus.catalog, index_dir).ok
        assert not orphans & set(list_shard_dirs(index_dir))
        found, corrupt = corpus.results()
        assert corrupt == {} and found == corpus.baseline
