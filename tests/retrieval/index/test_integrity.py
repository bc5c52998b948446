"""retrieval.index.integrity: byte flips in every shard file, checked opens, the runtime bound."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import faiss
import numpy as np
import pytest

from retrieval.errors import CorruptShard
from retrieval.index.integrity import (
    COSINE_BOUND,
    ShardExpectation,
    check_shard,
    manifest_digest,
    open_checked,
    quarantine,
)
from retrieval.index.kinds import choose_params, stored_vectors
from retrieval.index.marks import VerifiedMarks
from retrieval.index.shard import (
    EMBEDDINGS_FILE,
    IDS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    Shard,
    ShardManifest,
    iter_embedding_blocks,
    read_index_file,
    write_shard,
)
from retrieval.index.shard_set import ShardSet

DIM = 16
MODEL = {"name": "tiny", "key": "k" * 16}


def unit_vectors(n: int, *, seed: int, dim: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write(index_dir: Path, shard_id: str, n: int, *, seed: int, kind: str = "flat", first: int = 1):
    ids = np.arange(first, first + n, dtype=np.int64)
    x = unit_vectors(n, seed=seed)
    manifest = write_shard(
        index_dir, shard_id, ids=ids, embeddings=x, params=choose_params(kind, n, DIM), model=MODEL
    )
    return ids, x, expectation(index_dir, manifest)


def expectation(index_dir: Path, manifest: ShardManifest) -> ShardExpectation:
    """What the catalog row of a freshly committed shard holds."""
    return ShardExpectation(
        shard_id=manifest.shard_id,
        kind=manifest.kind,
        count=manifest.count,
        dim=manifest.dim,
        params=manifest.params,
        model_key=MODEL["key"],
        bytes=sum(int(entry["bytes"]) for entry in manifest.files.values()),
        manifest_sha256=manifest_digest(index_dir / "shards" / manifest.shard_id),
    )


def flip(path: Path, offset: int, count: int = 1) -> None:
    """Invert `count` bytes from `offset` in place (same inode, as a failing disk would)."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        raw = bytearray(handle.read(count))
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in raw))


def npy_header_length(path: Path) -> int:
    raw = path.read_bytes()
    return 10 + int.from_bytes(raw[8:10], "little")


# Each file type, and where in it a flip lands: the .npy headers and data separately.
FLIPS = {
    "index.faiss middle": (INDEX_FILE, lambda p: p.stat().st_size // 2),
    "index.faiss header": (INDEX_FILE, lambda p: 20),
    "embeddings.npy data": (EMBEDDINGS_FILE, lambda p: p.stat().st_size - 100),
    "embeddings.npy header": (EMBEDDINGS_FILE, lambda p: 30),
    "ids.npy data": (IDS_FILE, lambda p: p.stat().st_size - 20),
    "ids.npy header": (IDS_FILE, lambda p: 30),
    "shard.json": (MANIFEST_FILE, lambda p: p.stat().st_size // 2),
}


@pytest.mark.parametrize("where", list(FLIPS))
def test_a_flip_anywhere_is_reported_and_never_served(tmp_path: Path, where: str) -> None:
    _, _, good = write(tmp_path, "good", 300, seed=1)
    bad_ids, x, bad = write(tmp_path, "bad", 300, seed=2, first=1000)
    name, offset = FLIPS[where]
    path = tmp_path / "shards" / "bad" / name
    flip(path, offset(path), 16 if name == INDEX_FILE else 1)

    check = check_shard(tmp_path, "bad", bad, content=True)
    assert not check.ok and name in check.problems, check.problems
    assert check_shard(tmp_path, "good", good, content=True).ok

    with pytest.raises(CorruptShard) as caught:
        open_checked(tmp_path, bad)
    assert caught.value.shard_id == "bad" and name in str(caught.value)
    with ShardSet.open_checked(tmp_path, [good, bad]) as shards:
        assert list(shards.corrupt_shards) == ["bad"]
        assert shards.unserved_count == 300
        scores, labels = shards.search(x[:20], 10)  # the corrupt shard's own vectors
    assert not np.isin(labels, bad_ids).any()
    assert scores.max() < 1.01


@pytest.mark.parametrize("name", [EMBEDDINGS_FILE, IDS_FILE])
def test_every_npy_header_byte_flipped_is_corrupt_shard_never_another_error(
    tmp_path: Path, name: str
) -> None:
    """numpy parses headers with Python's tokenizer: any exception must become CorruptShard."""
    _, _, expected = write(tmp_path, "s", 50, seed=3)
    path = tmp_path / "shards" / "s" / name
    original = path.read_bytes()
    outcomes: dict[str, int] = {}
    for offset in range(npy_header_length(path)):
        for mask in (0xFF, 0x01, 0x20):
            raw = bytearray(original)
            raw[offset] ^= mask
            path.write_bytes(bytes(raw))
            assert not check_shard(tmp_path, "s", expected).ok  # the checksum catches it
            try:
                Shard.open(tmp_path, "s")  # no hashing: the parser alone
                outcome = "opened"
            except CorruptShard:
                outcome = "corrupt"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes["corrupt"] > 0


def test_every_shard_json_byte_flipped_is_caught_by_the_catalog_digest(tmp_path: Path) -> None:
    _, _, expected = write(tmp_path, "s", 20, seed=4)
    path = tmp_path / "shards" / "s" / MANIFEST_FILE
    original = path.read_bytes()
    for offset in range(len(original)):
        raw = bytearray(original)
        raw[offset] ^= 0x01
        path.write_bytes(bytes(raw))
        check = check_shard(tmp_path, "s", expected)
        assert MANIFEST_FILE in check.problems, offset
    path.write_bytes(original)
    assert check_shard(tmp_path, "s", expected).ok


def test_a_row_without_a_digest_still_compares_shard_json_with_the_catalog(
    tmp_path: Path,
) -> None:
    _, _, expected = write(tmp_path, "s", 20, seed=5)
    old_row = ShardExpectation(**{**expected.__dict__, "manifest_sha256": None, "count": 21})
    check = check_shard(tmp_path, "s", old_row)
    assert "count 20" in check.problems[MANIFEST_FILE]


def test_content_check_refuses_vectors_that_are_not_unit_length(tmp_path: Path) -> None:
    """A shard written from corrupt vectors has valid checksums; compaction must still refuse it."""
    ids = np.arange(1, 101, dtype=np.int64)
    x = unit_vectors(100, seed=6)
    x[37] *= 25.7
    manifest = write_shard(
        tmp_path, "s", ids=ids, embeddings=x, params=choose_params("flat", 100, DIM), model=MODEL
    )
    expected = expectation(tmp_path, manifest)
    assert check_shard(tmp_path, "s", expected).ok  # the checksums pass
    problem = check_shard(tmp_path, "s", expected, content=True).problems[EMBEDDINGS_FILE]
    assert "row 37" in problem


def test_check_keeps_the_verified_vectors_in_one_pass(tmp_path: Path) -> None:
    ids, x, expected = write(tmp_path, "s", 100, seed=7)
    read = 0

    def count(n: int) -> None:
        nonlocal read
        read += n

    check = check_shard(tmp_path, "s", expected, content=True, keep_embeddings=True, on_bytes=count)
    assert check.ok and check.ids is not None and check.embeddings is not None
    np.testing.assert_array_equal(check.ids, ids)
    np.testing.assert_array_equal(check.embeddings, x.astype(np.float16))
    data_files = [tmp_path / "shards" / "s" / n for n in (INDEX_FILE, IDS_FILE, EMBEDDINGS_FILE)]
    assert read == sum(p.stat().st_size for p in data_files)


def test_a_missing_directory_or_file_is_reported(tmp_path: Path) -> None:
    _, _, expected = write(tmp_path, "s", 10, seed=8)
    (tmp_path / "shards" / "s" / IDS_FILE).unlink()
    assert check_shard(tmp_path, "s", expected).problems[IDS_FILE] == "missing"
    missing = ShardExpectation(**{**expected.__dict__, "shard_id": "gone"})
    assert "missing" in check_shard(tmp_path, "gone", missing).problems["shard"]


def test_label_blocks_never_yield_the_last_block_of_a_corrupt_file(tmp_path: Path) -> None:
    write(tmp_path, "s", 100, seed=9)
    path = tmp_path / "shards" / "s" / EMBEDDINGS_FILE
    flip(path, path.stat().st_size - 10)
    blocks = iter_embedding_blocks(tmp_path, "s", 30)
    got = []
    with pytest.raises(CorruptShard, match="sha256"):
        for ids, _ in blocks:
            got.append(ids)
    assert sum(len(ids) for ids in got) < 100


# ------------------------------------------------------------------------------------------
# Verified marks


def test_a_verified_mark_spares_the_hashing_until_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, expected = write(tmp_path, "s", 50, seed=10)
    marks = VerifiedMarks(tmp_path)
    open_checked(tmp_path, expected, marks)
    assert marks.save()

    import retrieval.index.integrity as integrity

    def no_hashing(*args: object, **kwargs: object) -> object:
        raise AssertionError("hashed a shard that a verified mark vouches for")

    with monkeypatch.context() as patched:
        patched.setattr(integrity, "check_shard", no_hashing)
        open_checked(tmp_path, expected, VerifiedMarks(tmp_path))  # as a restart reads it

    # Bytes changed in place, even with the mtime put back, change ctime: hashed again.
    path = tmp_path / "shards" / "s" / EMBEDDINGS_FILE
    before = path.stat()
    flip(path, before.st_size - 4)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(CorruptShard, match="sha256"):
        open_checked(tmp_path, expected, VerifiedMarks(tmp_path))


def test_a_corrupt_mark_refuses_without_hashing_and_survives_a_restart(tmp_path: Path) -> None:
    _, _, expected = write(tmp_path, "s", 50, seed=11)
    path = tmp_path / "shards" / "s" / INDEX_FILE
    flip(path, path.stat().st_size // 2, 16)
    marks = VerifiedMarks(tmp_path)
    with pytest.raises(CorruptShard):
        open_checked(tmp_path, expected, marks)
    marks.save()
    again = VerifiedMarks(tmp_path)
    mark = again.lookup("s", _identity(tmp_path, "s"))
    assert mark is not None and mark.corrupt and "sha256" in mark.corrupt


def test_a_shard_stopped_while_serving_stays_out_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its checksums may pass (the bytes were wrong before they were hashed): the mark, not a
    new hashing, keeps it out until its files change or a repair replaces it."""
    _, _, expected = write(tmp_path, "s", 50, seed=19)
    marks = VerifiedMarks(tmp_path)
    open_checked(tmp_path, expected, marks)
    quarantine(marks, tmp_path, "s", "index.faiss scored id 3 with a cosine of 25.7")
    assert marks.save()

    import retrieval.index.integrity as integrity

    with monkeypatch.context() as patched:
        patched.setattr(integrity, "check_shard", lambda *a, **k: pytest.fail("hashed"))
        with pytest.raises(CorruptShard, match="cosine of 25.7") as caught:
            open_checked(tmp_path, expected, VerifiedMarks(tmp_path))
    assert caught.value.problem == "index.faiss scored id 3 with a cosine of 25.7"
    mark = VerifiedMarks(tmp_path).lookup("s", _identity(tmp_path, "s"))
    assert mark is not None and mark.source == "served"  # not overwritten by the refusal


def test_an_unwritable_or_damaged_marks_file_costs_only_time(tmp_path: Path) -> None:
    _, _, expected = write(tmp_path, "s", 50, seed=12)
    for damaged in ("{torn", "[1, 2]", '{"format_version": 1, "shards": {"s": {"files": 3}}}'):
        (tmp_path / "verified-shards.json").write_text(damaged)
        open_checked(tmp_path, expected, VerifiedMarks(tmp_path))  # ignored: hashed again
    marks = VerifiedMarks(tmp_path)
    open_checked(tmp_path, expected, marks)
    assert marks.save()
    os.chmod(tmp_path, 0o500)
    try:
        marks.record("s", _identity(tmp_path, "s"), corrupt=None)
        assert marks.save() is False or os.geteuid() == 0  # root writes anyway
    finally:
        os.chmod(tmp_path, 0o700)


def _identity(index_dir: Path, shard_id: str) -> dict[str, list[int]]:
    from retrieval.index.marks import file_identities

    found = file_identities(index_dir / "shards" / shard_id)
    assert found is not None
    return found


# ------------------------------------------------------------------------------------------
# The runtime bound: a shard whose checksums pass but whose index lies


def _lying_shard(tmp_path: Path, *, scale: float = 25.7, shift_ids: int = 0) -> Shard:
    """A sound shard whose FAISS index is swapped in memory for one of other vectors/ids."""
    ids, x, _ = write(tmp_path, "liar", 200, seed=13)
    shard = Shard.open(tmp_path, "liar")
    index = faiss.IndexIDMap(faiss.IndexFlatIP(DIM))
    index.add_with_ids(x * scale, ids + shift_ids)
    return Shard(shard.manifest, shard.ids, shard.embeddings, index)


@pytest.mark.parametrize("lie", ["scores", "ids"])
def test_an_impossible_result_stops_the_shard_being_served(tmp_path: Path, lie: str) -> None:
    liar = (
        _lying_shard(tmp_path, scale=25.7)
        if lie == "scores"
        else _lying_shard(tmp_path, scale=1.0, shift_ids=10_000)
    )
    honest_ids, honest_x, _ = write(tmp_path, "honest", 200, seed=14, first=5000)
    honest = Shard.open(tmp_path, "honest")
    reported: list[tuple[str, str]] = []
    with ShardSet([liar, honest], on_corrupt=lambda *a: reported.append(a)) as shards:
        scores, labels = shards.search(honest_x[:5], 10)
        assert np.isin(labels[labels >= 0], honest_ids).all()
        assert scores.max() < 1.01  # nothing of the liar's 25.7 (float16 rounding aside)
        assert list(shards.corrupt_shards) == ["liar"]
        assert shards.live_count == 200 and shards.unserved_count == 200
        shards.search(honest_x[:5], 10)  # no second report
        found, _ = shards.vectors(liar.ids[:3])
        assert found.size == 0  # not served for "more like this" either
    assert [shard_id for shard_id, _ in reported] == ["liar"]
    expected = "outside [-1.0001, 1.0001]" if lie == "scores" else "which the shard does not hold"
    assert expected in reported[0][1]


def test_a_shard_written_with_vectors_off_the_unit_sphere_is_stopped(tmp_path: Path) -> None:
    # Files that agree with each other (checksums pass) on a vector of norm 50: its raw scores
    # divided by its own norm would look like a cosine, so the stored norm is checked too.
    ids = np.arange(1, 21, dtype=np.int64)
    x = unit_vectors(20, seed=21)
    x[3] *= 50
    manifest = write_shard(
        tmp_path, "s1", ids=ids, embeddings=x, params=choose_params("flat", 20, DIM), model=MODEL
    )
    with ShardSet.open_checked(tmp_path, [expectation(tmp_path, manifest)]) as shards:
        scores, labels = shards.search(x[3:4] / 50, 5)
        assert (labels < 0).all() and list(shards.corrupt_shards) == ["s1"]
        assert "embeddings.npy holds a vector of norm" in shards.corrupt_shards["s1"]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
def test_a_sound_index_never_trips_the_bound(tmp_path: Path, kind: str) -> None:
    """Float16 storage moves a norm by up to 5e-4, so two copies of one image score above
    1.0001 against each other: the bound divides the norms out and must not mistake that."""
    n = 10_000 if kind == "ivfpq" else 1500
    x = unit_vectors(n // 2, seed=15)
    copies = np.concatenate([x, x])  # every vector twice, as copied files are stored
    ids = np.arange(1, n + 1, dtype=np.int64)
    write_shard(
        tmp_path, kind, ids=ids, embeddings=copies, params=choose_params(kind, n, DIM), model=MODEL
    )
    with ShardSet.open(tmp_path, [kind], threads=1) as shards:
        stored = shards.shards[0].rows_f32(np.arange(n))
        scores, _ = shards.search(stored, 2)
        assert scores.max() > COSINE_BOUND  # raw inner products do exceed the bound
        shards.search(stored * 3.0, 5)  # and unnormalised queries are not the shard's fault
        assert shards.corrupt_shards == {}


def test_stored_vectors_are_exactly_the_embeddings(tmp_path: Path) -> None:
    for kind in ("flat", "hnsw", "ivf"):
        ids, x, _ = write(tmp_path, kind, 1500, seed=16, kind=kind)
        found = stored_vectors(read_index_file(tmp_path / "shards" / kind / INDEX_FILE))
        assert found is not None
        np.testing.assert_array_equal(found[0], ids)
        np.testing.assert_array_equal(found[1], x.astype(np.float16).astype(np.float32))
    write(tmp_path, "pq", 10_000, seed=17, kind="ivfpq")
    assert stored_vectors(read_index_file(tmp_path / "shards" / "pq" / INDEX_FILE)) is None


def test_manifest_digest_is_the_files_sha256(tmp_path: Path) -> None:
    write(tmp_path, "s", 5, seed=18)
    path = tmp_path / "shards" / "s" / MANIFEST_FILE
    assert manifest_digest(path.parent) == hashlib.sha256(path.read_bytes()).hexdigest()
