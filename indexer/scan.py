"""Walk image roots and diff what is on disk against the catalog (stat only, hash when needed)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.catalog.records import ImageRecord
from retrieval.catalog.tables import ERROR
from retrieval.images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class FileStat:
    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Unreadable:
    path: str
    detail: str


@dataclass
class ScanResult:
    files: list[FileStat] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)


def normalise_root(root: str | Path) -> str:
    """Absolute, normalised, no trailing slash; symlinks are kept as the user wrote them."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(str(root))))


def _walk(root: str, result: ScanResult) -> Iterator[FileStat]:
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            result.unreadable.append(Unreadable(directory, f"cannot list directory: {exc}"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue  # .thumbnails, .git, editor temp files
            try:
                # Directory symlinks are not followed: they can loop or leave the root.
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                    continue
                if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                if not entry.is_file(follow_symlinks=True):
                    continue
                info = entry.stat(follow_symlinks=True)
            except OSError as exc:
                result.unreadable.append(Unreadable(entry.path, f"cannot stat: {exc}"))
                continue
            yield FileStat(entry.path, info.st_size, info.st_mtime_ns)


def scan_roots(roots: Sequence[str], on_file: Callable[[], None] | None = None) -> ScanResult:
    """Stat every image-like file under the roots. Costs one stat per file, no reads."""
    result = ScanResult()
    seen: set[str] = set()
    for root in roots:
        for stat in _walk(root, result):
            if stat.path in seen:
                continue  # overlapping roots
            seen.add(stat.path)
            result.files.append(stat)
            if on_file:
                on_file()
    result.files.sort(key=lambda f: f.path)
    return result


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def hash_files(
    paths: Sequence[str], threads: int = 4, on_done: Callable[[], None] | None = None
) -> dict[str, str | None]:
    """sha256 of each file (None if it cannot be read); hashlib releases the GIL."""

    def one(path: str) -> tuple[str, str | None]:
        try:
            return path, sha256_of(path)
        except OSError:
            return path, None
        finally:
            if on_done:
                on_done()

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return dict(pool.map(one, paths))


@dataclass
class ScanDiff:
    """What changed since the catalog was last committed, for the roots that were scanned."""

    unchanged: int = 0
    new: list[tuple[FileStat, str]] = field(default_factory=list)  # (file, sha256)
    # (file, sha256, old row, row whose stored vector has these bytes or None)
    changed: list[tuple[FileStat, str, ImageRecord, ImageRecord | None]] = field(
        default_factory=list
    )
    retry: list[tuple[FileStat, str | None, ImageRecord]] = field(default_factory=list)
    touched: list[tuple[FileStat, ImageRecord]] = field(default_factory=list)
    moved: list[tuple[FileStat, ImageRecord]] = field(default_factory=list)
    copied: list[tuple[FileStat, str, ImageRecord]] = field(default_factory=list)
    deleted: list[ImageRecord] = field(default_factory=list)
    unhashable: list[tuple[FileStat, ImageRecord | None]] = field(default_factory=list)

    @property
    def has_changes(self) -> bool:
        return bool(
            self.new
            or self.changed
            or self.retry
            or self.touched
            or self.moved
            or self.copied
            or self.deleted
            or self.unhashable
        )


def diff_scan(
    files: Iterable[FileStat],
    known: dict[str, ImageRecord],
    hasher: Callable[[Sequence[str]], dict[str, str | None]],
    vectors_by_sha: Callable[[Iterable[str]], dict[str, list[ImageRecord]]],
) -> ScanDiff:
    """Classify every file. Only files whose size or mtime differ, or that are new, are read."""
    diff = ScanDiff()
    on_disk: set[str] = set()
    suspects: list[FileStat] = []
    for stat in files:
        on_disk.add(stat.path)
        record = known.get(stat.path)
        if record is not None and record.size == stat.size and record.mtime_ns == stat.mtime_ns:
            diff.unchanged += 1
        else:
            suspects.append(stat)
    missing = {path: rec for path, rec in known.items() if path not in on_disk}
    digests = hasher([s.path for s in suspects]) if suspects else {}

    fresh: list[tuple[FileStat, str]] = []
    changed: list[tuple[FileStat, str, ImageRecord]] = []
    for stat in suspects:
        digest = digests.get(stat.path)
        record = known.get(stat.path)
        if digest is None:
            diff.unhashable.append((stat, record))
        elif record is None:
            fresh.append((stat, digest))
        elif record.status == ERROR:
            diff.retry.append((stat, digest, record))
        elif record.sha256 == digest:
            diff.touched.append((stat, record))  # same bytes, new mtime: nothing to encode
        else:
            changed.append((stat, digest, record))

    # A file missing from its old path whose bytes now appear at a new path was moved:
    # keep its row (and so its vector and labels) and just change the path.
    missing_by_sha: dict[str, list[ImageRecord]] = {}
    for record in missing.values():
        if record.sha256 and record.status != ERROR:
            missing_by_sha.setdefault(record.sha256, []).append(record)
    for recs in missing_by_sha.values():
        recs.sort(key=lambda r: r.path)
    unmatched: list[tuple[FileStat, str]] = []
    for stat, digest in fresh:
        candidates = missing_by_sha.get(digest)
        if candidates:
            record = candidates.pop(0)
            diff.moved.append((stat, record))
            del missing[record.path]
        else:
            unmatched.append((stat, digest))

    # Same bytes as a vector we already store (a copy, or a file deleted earlier that came
    # back): reuse that vector instead of decoding and encoding again.
    wanted = {digest for _, digest in unmatched} | {digest for _, digest, _ in changed}
    stored = vectors_by_sha(wanted) if wanted else {}
    for stat, digest, record in changed:
        source = stored.get(digest, [None])[0]
        diff.changed.append((stat, digest, record, source))
    for stat, digest in unmatched:
        if digest in stored:
            diff.copied.append((stat, digest, stored[digest][0]))
        else:
            diff.new.append((stat, digest))
    diff.deleted = sorted(missing.values(), key=lambda r: r.path)
    return diff
