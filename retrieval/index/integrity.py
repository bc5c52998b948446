"""Checking a shard against its shard.json and the catalog: checksums, headers and contents.

Where each depth is used:
- `Shard.open` checks sizes and parses the array and FAISS headers; it hashes nothing.
- `open_checked` (serving) hashes every file before a shard is first served, unless a verified
  mark (retrieval/index/marks.py) says its files are unchanged since they were hashed.
- `check_shard(..., content=True)` (compaction, repair, `clipsearch verify`) always hashes, and
  also checks that the ids ascend and that every stored vector is finite and of unit length.

Files are hashed before FAISS or numpy parse them: a flipped byte in a FAISS header can make it
allocate absurd sizes or read out of bounds, so only bytes that match their sha256 get parsed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from retrieval.errors import CorruptShard
from retrieval.index.marks import SERVED, VerifiedMarks, file_identities
from retrieval.index.shard import (
    EMBEDDINGS_FILE,
    IDS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    F16Array,
    IdArray,
    Shard,
    ShardManifest,
    read_manifest,
    read_npy_header,
    shard_path,
)

# Stored vectors are L2-normalised and then rounded to float16, which moves a norm by at most
# about 5e-4. A norm further from 1 than this is not rounding.
UNIT_NORM_TOLERANCE = 1e-2
# No cosine of two vectors lies outside [-1, 1]; float32 rounding stays far inside this bound.
COSINE_BOUND = 1.0001
# The key of a problem that is not one file's: the shard directory itself.
SHARD = "shard"

_READ_BLOCK_BYTES = 8 * 2**20

BytesCallback = Callable[[int], object]


class ShardRowLike(Protocol):
    """The catalog row of a shard, as `ShardExpectation.of` reads it."""

    @property
    def id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def count(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def params(self) -> dict[str, Any]: ...
    @property
    def model_key(self) -> str: ...
    @property
    def bytes(self) -> int: ...
    @property
    def manifest_sha256(self) -> str | None: ...


@dataclass(frozen=True)
class ShardExpectation:
    """What the catalog's row says one shard is; its shard.json must agree."""

    shard_id: str
    kind: str
    count: int
    dim: int
    params: dict[str, Any]
    model_key: str
    bytes: int
    manifest_sha256: str | None = None  # None for shards committed before digests were kept

    @classmethod
    def of(cls, row: ShardRowLike) -> ShardExpectation:
        return cls(
            shard_id=row.id,
            kind=row.kind,
            count=row.count,
            dim=row.dim,
            params=dict(row.params or {}),
            model_key=row.model_key,
            bytes=int(row.bytes or 0),
            manifest_sha256=row.manifest_sha256,
        )

    def disagreements(self, manifest: ShardManifest) -> list[str]:
        """How shard.json differs from the catalog row (empty when it agrees)."""
        found = {
            "shard_id": manifest.shard_id,
            "kind": manifest.kind,
            "count": manifest.count,
            "dim": manifest.dim,
            "params": manifest.params,
            "model key": manifest.model.get("key"),
            "bytes": sum(int(entry["bytes"]) for entry in manifest.files.values()),
        }
        wanted = {
            "shard_id": self.shard_id,
            "kind": self.kind,
            "count": self.count,
            "dim": self.dim,
            "params": self.params,
            "model key": self.model_key,
            "bytes": self.bytes,
        }
        return [
            f"shard.json says {name} {found[name]!r}, the catalog {wanted[name]!r}"
            for name in found
            if found[name] != wanted[name]
        ]


@dataclass
class ShardCheck:
    """The outcome of checking one shard: what is wrong with which file (nothing: healthy)."""

    shard_id: str
    shard_dir: Path
    manifest: ShardManifest | None = None
    problems: dict[str, str] = field(default_factory=dict)  # file name (or SHARD) -> problem
    ids: IdArray | None = None  # ids.npy, when it verified
    embeddings: F16Array | None = None  # embeddings.npy, when it verified and was asked for

    @property
    def ok(self) -> bool:
        return not self.problems

    def file_ok(self, name: str) -> bool:
        """Whether one data file verified (which needs a valid shard.json)."""
        return self.manifest is not None and name not in self.problems

    def describe(self) -> str:
        return "; ".join(f"{name}: {problem}" for name, problem in self.problems.items())

    def error(self) -> CorruptShard:
        return corrupt_shard(self.shard_id, self.shard_dir, self.describe())


def manifest_digest(shard_dir: Path) -> str:
    """The sha256 of a shard's shard.json, as the catalog records it at commit."""
    return hashlib.sha256((Path(shard_dir) / MANIFEST_FILE).read_bytes()).hexdigest()


def _checked_manifest(
    shard_dir: Path, shard_id: str, expected: ShardExpectation | None
) -> tuple[ShardManifest | None, str | None]:
    """shard.json parsed and compared with the catalog row: (manifest, None) or (None, problem)."""
    path = shard_dir / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, "missing: the shard was never completely written"
    except OSError as exc:
        return None, f"unreadable: {exc}"
    if expected is not None and expected.manifest_sha256 is not None:
        if hashlib.sha256(raw).hexdigest() != expected.manifest_sha256:
            return None, "sha256 differs from the one the catalog recorded at commit"
    try:
        manifest = ShardManifest.from_json(raw.decode("utf-8"))
    except (ValueError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        return None, f"invalid: {exc}"
    if manifest.shard_id != shard_id:
        return None, f"names shard {manifest.shard_id!r}"
    if expected is not None:
        differs = expected.disagreements(manifest)
        if differs:
            return None, "; ".join(differs)
    return manifest, None


def check_shard(
    index_dir: Path,
    shard_id: str,
    expected: ShardExpectation | None = None,
    *,
    content: bool = False,
    keep_embeddings: bool = False,
    on_bytes: BytesCallback | None = None,
) -> ShardCheck:
    """Check one shard's files against its shard.json (and shard.json against the catalog row).

    Every data file is hashed. With `content`, the ids must also ascend and every stored vector
    must be finite and of unit length. With `keep_embeddings`, a verified embeddings.npy is
    returned in memory (read in the same pass as its hash, for compaction and repair).
    """
    shard_dir = shard_path(index_dir, shard_id)
    check = ShardCheck(shard_id, shard_dir)
    if not shard_dir.is_dir():
        check.problems[SHARD] = "the shard directory is missing"
        return check
    manifest, problem = _checked_manifest(shard_dir, shard_id, expected)
    if manifest is None:
        check.problems[MANIFEST_FILE] = problem or "invalid"
        return check
    check.manifest = manifest
    n, dim = manifest.count, manifest.dim

    problem = _check_plain_file(shard_dir / INDEX_FILE, manifest.files[INDEX_FILE], on_bytes)
    if problem:
        check.problems[INDEX_FILE] = problem

    problem, ids = _check_array_file(
        shard_dir / IDS_FILE, manifest.files[IDS_FILE], np.dtype(np.int64), (n,), on_bytes, True
    )
    if problem is None and ids is not None and n > 1 and not bool(np.all(ids[1:] > ids[:-1])):
        problem = "ids are not strictly ascending"
    if problem:
        check.problems[IDS_FILE] = problem
    else:
        check.ids = ids

    problem, embeddings = _check_array_file(
        shard_dir / EMBEDDINGS_FILE,
        manifest.files[EMBEDDINGS_FILE],
        np.dtype(np.float16),
        (n, dim),
        on_bytes,
        keep_embeddings,
        _not_unit_rows if content else None,
    )
    if problem:
        check.problems[EMBEDDINGS_FILE] = problem
    else:
        check.embeddings = embeddings
    return check


def unit_norm_misses(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The norms of a block of stored vectors (any float type), and which of them are not
    finite or not of unit length (beyond float16 rounding)."""
    x = block.astype(np.float32, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    return norms, ~np.isfinite(norms) | (np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)


def _not_unit_rows(block: np.ndarray, first_row: int) -> str | None:
    """A problem when a stored vector is not finite or not of unit length."""
    norms, bad = unit_norm_misses(block)
    if not bad.any():
        return None
    row = int(np.flatnonzero(bad)[0])
    return (
        f"row {first_row + row} has norm {float(norms[row]):.6g} ({int(bad.sum())} such rows); "
        "stored vectors have norm 1"
    )


def _size_problem(path: Path, entry: dict[str, Any]) -> str | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable: {exc}"
    if size != entry["bytes"]:
        return f"{size} bytes, shard.json says {entry['bytes']}"
    return None


def _check_plain_file(
    path: Path, entry: dict[str, Any], on_bytes: BytesCallback | None
) -> str | None:
    problem = _size_problem(path, entry)
    if problem:
        return problem
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_READ_BLOCK_BYTES):
                digest.update(chunk)
                if on_bytes:
                    on_bytes(len(chunk))
    except OSError as exc:
        return f"unreadable: {exc}"
    if digest.hexdigest() != entry["sha256"]:
        return "sha256 differs from shard.json"
    return None


def _check_array_file(
    path: Path,
    entry: dict[str, Any],
    dtype: np.dtype,
    shape: tuple[int, ...],
    on_bytes: BytesCallback | None,
    keep: bool,
    row_check: Callable[[np.ndarray, int], str | None] | None = None,
) -> tuple[str | None, np.ndarray | None]:
    """Hash a .npy file in one pass, checking its header and (optionally) its rows on the way.

    Returns (problem, array): the array only when `keep` and the file verified.
    """
    problem = _size_problem(path, entry)
    if problem:
        return problem, None
    digest = hashlib.sha256()
    header_problem: str | None = None
    content_problem: str | None = None
    array: np.ndarray | None = None
    try:
        with open(path, "rb") as handle:
            try:
                found_shape, fortran, found_dtype = read_npy_header(handle, path)
                if found_dtype != dtype or found_shape != shape or fortran:
                    header_problem = (
                        f"header says {found_dtype}{found_shape}, expected {dtype}{shape}"
                    )
            except CorruptShard as exc:
                header_problem = str(exc).removeprefix(f"{path}: ")
            offset = handle.tell() if header_problem is None else 0
            handle.seek(0)
            digest.update(handle.read(offset))
            if on_bytes:
                on_bytes(offset)
            if header_problem is None:
                array, content_problem = _read_rows(
                    handle, dtype, shape, digest, on_bytes, keep, row_check
                )
            while chunk := handle.read(_READ_BLOCK_BYTES):  # trailing bytes, or a bad header's file
                digest.update(chunk)
                if on_bytes:
                    on_bytes(len(chunk))
    except OSError as exc:
        return f"unreadable: {exc}", None
    if digest.hexdigest() != entry["sha256"]:
        detail = header_problem or content_problem
        return "sha256 differs from shard.json" + (f" ({detail})" if detail else ""), None
    if header_problem or content_problem:
        return header_problem or content_problem, None
    return None, array


def _read_rows(
    handle: Any,
    dtype: np.dtype,
    shape: tuple[int, ...],
    digest: Any,
    on_bytes: BytesCallback | None,
    keep: bool,
    row_check: Callable[[np.ndarray, int], str | None] | None,
) -> tuple[np.ndarray | None, str | None]:
    rows = shape[0]
    row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    block_rows = max(1, _READ_BLOCK_BYTES // max(row_bytes, 1))
    array = np.empty(shape, dtype=dtype) if keep else None
    problem: str | None = None
    for start in range(0, rows, block_rows):
        stop = min(start + block_rows, rows)
        block = (
            array[start:stop] if array is not None else np.empty((stop - start, *shape[1:]), dtype)
        )
        view = block.data.cast("B")
        if handle.readinto(view) != block.nbytes:
            return None, f"ends before row {stop}"
        digest.update(view)
        if on_bytes:
            on_bytes(block.nbytes)
        if row_check is not None and problem is None:
            problem = row_check(block, start)
    return array, problem


def open_checked(
    index_dir: Path, expected: ShardExpectation, marks: VerifiedMarks | None = None
) -> Shard:
    """Open a shard to serve it: its files hashed first, unless a verified mark vouches for them.

    A shard marked corrupt whose files have not changed since is refused without hashing.
    Every outcome is recorded in `marks` (the caller saves them).
    """
    shard_id = expected.shard_id
    shard_dir = shard_path(index_dir, shard_id)
    identity = file_identities(shard_dir)
    if marks is not None and identity is not None:
        mark = marks.lookup(shard_id, identity)
        if mark is not None and mark.corrupt is not None:
            raise corrupt_shard(shard_id, shard_dir, mark.corrupt)
    try:
        if marks is not None and identity is not None:
            if mark is not None:
                shard = Shard.open(index_dir, shard_id)  # sizes and headers, no hashing
                if not expected.disagreements(shard.manifest):
                    return shard
        check = check_shard(index_dir, shard_id, expected)
        if not check.ok:
            raise check.error()
        shard = Shard.open(index_dir, shard_id)
    except CorruptShard as exc:
        if marks is not None and identity is not None:
            marks.record(shard_id, identity, corrupt=exc.problem or str(exc))
        raise
    if marks is not None and identity is not None:
        marks.record(shard_id, identity, corrupt=None)
    return shard


def check_marked(index_dir: Path, expected: ShardExpectation, marks: VerifiedMarks) -> str | None:
    """What is wrong with a shard (None: nothing), hashing only files no verified mark vouches for.

    The quick check of `clipsearch status` and `index`: the same verdict as `open_checked`,
    without opening the FAISS index. Outcomes are recorded in `marks` (the caller saves them).
    """
    shard_id = expected.shard_id
    shard_dir = shard_path(index_dir, shard_id)
    identity = file_identities(shard_dir)
    if identity is not None:
        mark = marks.lookup(shard_id, identity)
        if mark is not None and mark.corrupt is not None:
            return mark.corrupt
        if mark is not None:
            try:
                differs = expected.disagreements(read_manifest(shard_dir))
            except CorruptShard as exc:
                differs = [str(exc)]
            if not differs:
                return None
    check = check_shard(index_dir, shard_id, expected)
    if identity is not None:
        marks.record(shard_id, identity, corrupt=None if check.ok else check.describe())
    return None if check.ok else check.describe()


def quarantine(marks: VerifiedMarks, index_dir: Path, shard_id: str, reason: str) -> None:
    """Mark a shard corrupt because serving it gave an impossible result (see ShardSet)."""
    identity = file_identities(shard_path(index_dir, shard_id))
    if identity is not None:
        marks.record(shard_id, identity, corrupt=reason, source=SERVED)


def corrupt_shard(shard_id: str, shard_dir: Path, problem: str) -> CorruptShard:
    """The error for a shard found corrupt, naming it, where it is and what is wrong."""
    return CorruptShard(
        f"shard {shard_id} ({shard_dir}) is corrupt: {problem}", shard_id=shard_id, problem=problem
    )
