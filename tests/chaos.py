"""Fault injection end to end: `clipsearch index`, `compact`, `label` and `repair` killed with
SIGKILL at random moments while a reader searches, byte flips in every shard file type, and a
deleted catalog; after every step, the invariants an operator relies on are checked.

Used by tests/indexer/test_chaos.py (a few kills) and bench/chaos.py (hundreds).

Each command runs in a process of its own, forked from a server that has already imported
torch, FAISS and the CLI (multiprocessing's forkserver): the command's code, its DataLoader
workers, its locks and its commits are those of `clipsearch`, and it dies by a real SIGKILL, but
a kill does not cost the ten seconds a fresh interpreter spends importing torch
(`Commands(fresh_processes=True)`, bench/chaos.py --fresh-processes, pays them instead).

The world: a folder of generated pictures that changes between index runs (new, deleted,
changed, moved and copied files), a label set whose definition alternates (so `label` always has
work), and a clean twin: the same folder indexed by an in-process job that is never killed. At
the end the two must show the same images, rank every query alike and give the same labels.

What is counted (every count must stay 0):
- failed_queries: the reader's searches that raised, returned an id twice, an impossible score,
  or missed an image that was committed before and not changed since (unless its shard was
  found corrupt and left out);
- lost: such images missing from the catalog's active rows or from a search after a step;
- duplicated: an active path twice, or an image id in two active shards;
- orphaned: shard directories without a catalog row after a successful index, compact or repair;
- laundered: vectors in a shard that passes its checksums but differ from a fresh encoding of
  their image (a shard written from corrupt input);
- undetected_flips, unrepaired, unexpected_exits (an exit code that is neither SIGKILL nor the
  command's expected one), lock_held (exit 3 after a kill), catalog_damage (a deleted catalog
  not refused with exit 8, or a shard file changed by the refused command), tracebacks.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from indexer.crash import CRASH_ENV
from indexer.labelling import LabelJob
from indexer.pipeline import IndexJob
from indexer.verify import verify_index
from retrieval.catalog.database import Catalog
from retrieval.catalog.tables import ACTIVE, ImageRow
from retrieval.config import Settings, load_settings
from retrieval.errors import CatalogMismatch
from retrieval.images import decode_image
from retrieval.index.integrity import ShardExpectation, check_shard
from retrieval.index.kinds import stored_vectors
from retrieval.index.shard import (
    EMBEDDINGS_FILE,
    IDS_FILE,
    INDEX_FILE,
    SHARDS_DIR,
    list_shard_dirs,
    read_index_file,
    read_npy_header,
    shard_path,
)
from retrieval.labels.definitions import LabelSet
from retrieval.labels.store import LabelStore
from retrieval.models.encoder import Encoder
from retrieval.search import Searcher
from retrieval.training.shapes import COLOURS, SHAPES, draw_shape

MODEL = "clipsearch-tiny"
KILLED = -signal.SIGKILL
# Imported once by the fork server, so that no command pays for them.
PRELOAD = [
    "torch",
    "faiss",
    "open_clip",
    "sqlalchemy",
    "sqlite3",
    "psycopg",
    "alembic",
    "typer",
    "indexer.cli.app",
    "indexer.pipeline",
    "indexer.compact",
    "indexer.labelling",
    "indexer.repair",
    "indexer.verify",
    "retrieval.models.encoder",
    "retrieval.catalog.migrate",
    "tests.chaos",
]
# Where each command can be stopped exactly (CLIPSEARCH_CRASH_AT); other kills are timed.
CRASH_POINTS = {
    "index": [
        "during_encode",
        "before_shard_write",
        "after_shard_write",
        "before_commit",
        "after_commit",
        "during_labels",
        "before_label_publish",
    ],
    "compact": ["compact_before_commit", "compact_after_commit"],
    "label": ["during_labels", "before_label_publish"],
    "repair": ["repair_before_commit", "repair_after_commit", "during_labels"],
}
COMMANDS = tuple(CRASH_POINTS)
TIMED = "timed"  # a kill at a random moment of the command's usual run time
# The damage a byte flip does, one kind after another: every shard file type, both parts of
# embeddings.npy.
FLIP_TARGETS = (
    "index.faiss",
    "embeddings.npy data",
    "embeddings.npy header",
    "ids.npy",
    "shard.json",
)
QUERIES = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a shape"]
SHARD_SIZE = 6
K_ALL = 1000  # more than the corpus ever holds: a search returns every image it serves
# A stored vector is the float16 of a fresh encoding (a batch of another size may differ in the
# last float32 bits): equal within float16 rounding.
SAME_VECTOR_TOLERANCE = 2e-3
SCORE_TOLERANCE = 2e-3
LABELS_A = {"name": "chaos", "labels": list(COLOURS), "templates": "simple"}
LABELS_B = {"name": "chaos", "labels": list(SHAPES), "templates": "simple"}


def run_clipsearch(argv: list[str], env: dict[str, str], log_path: str) -> None:
    """The child: `clipsearch ARGV` with exactly `env`'s CLIPSEARCH_* settings, output to a file."""
    handle = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    os.close(handle)
    for name in [name for name in os.environ if name.startswith("CLIPSEARCH_")]:
        del os.environ[name]
    os.environ.update(env)
    sys.argv = ["clipsearch", *argv]
    # As in a process of its own: the DataLoader forks its workers (the fork server's children
    # inherit "forkserver" as their start method).
    multiprocessing.set_start_method("fork", force=True)
    from indexer.cli.app import main

    main()


@dataclass
class Outcome:
    """How one command ended: its exit code (negative: the signal), time and output."""

    command: str
    code: int
    seconds: float
    output: str
    crash_point: str | None = None

    @property
    def killed(self) -> bool:
        return self.code == KILLED


class Commands:
    """Starts `clipsearch` commands and kills them: forked from the preloaded server, or with
    `fresh_processes` each a new `python -m indexer` (ten seconds of imports a command)."""

    def __init__(self, log_dir: Path, *, fresh_processes: bool = False) -> None:
        self.fresh_processes = fresh_processes
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.started = 0

    def run(
        self,
        argv: list[str],
        env: dict[str, str],
        *,
        kill_after: float | None = None,
        timeout: float = 300.0,
    ) -> Outcome:
        """Run to the end, or SIGKILL (as `kill -9` does) after `kill_after` seconds."""
        self.started += 1
        log_path = self.log_dir / f"{self.started:05d}-{argv[0]}.log"
        wait = kill_after if kill_after is not None else timeout
        started = time.monotonic()
        if self.fresh_processes:
            code = self._run_fresh(argv, env, log_path, wait, timeout)
        else:
            process = self.context.Process(
                target=run_clipsearch, args=(argv, env, str(log_path)), daemon=False
            )
            process.start()
            process.join(wait)
            if process.is_alive():
                process.kill()
                process.join(timeout)
            code = process.exitcode if process.exitcode is not None else KILLED
        seconds = time.monotonic() - started
        output = log_path.read_text(errors="replace") if log_path.exists() else ""
        crash = env.get(CRASH_ENV)
        return Outcome(argv[0], code, seconds, output, crash if code == KILLED else None)

    @staticmethod
    def _run_fresh(
        argv: list[str], env: dict[str, str], log_path: Path, wait: float, timeout: float
    ) -> int:
        outside = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_")}
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "indexer", *argv],
                env={**outside, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[1],
            )
        try:
            return process.wait(wait)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(timeout)


@dataclass
class Databases:
    """The catalogs of a run: the chaos world's, the clean twin's, and (Postgres) a way to get a
    new empty one, which stands for a reset database when the catalog is "deleted"."""

    kind: str  # sqlite or postgres
    chaos: str
    twin: str
    blank: Callable[[], AbstractContextManager[str]] | None = None


@dataclass
class ChaosConfig:
    base: Path
    checkpoint: Path
    databases: Databases
    kills: int = 10
    seed: int = 0
    # Every how many kills the catalog is deleted (0: once, half way); flips happen before
    # repairs, one file type after another.
    catalog_every: int = 0
    flips: bool = True
    initial_images: int = 16
    max_images: int = 40
    reader_pause: float = 0.05
    # Steps to take first, in order (see Chaos.scripted); then random ones up to `kills`.
    plan: list[str] = field(default_factory=list)


@dataclass
class ChaosReport:
    database: str
    kills: int = 0
    kills_by_command: Counter[str] = field(default_factory=Counter)
    kills_at_points: int = 0
    completed_runs: int = 0
    queries: int = 0
    failed_queries: int = 0
    lost: set[str] = field(default_factory=set)  # image ids, or paths never indexed
    duplicated: set[str] = field(default_factory=set)
    orphaned: set[str] = field(default_factory=set)
    laundered: set[tuple[str, int]] = field(default_factory=set)
    flips: Counter[str] = field(default_factory=Counter)
    undetected_flips: int = 0
    unrepaired: int = 0
    catalog_deletions: int = 0
    reader_refusals: int = 0  # CatalogMismatch while the catalog was gone: right
    reader_unclear_refusals: int = 0  # another error then: no answer, but no reason either
    catalog_damage: int = 0
    lock_held: int = 0
    unexpected_exits: int = 0
    tracebacks: int = 0
    final_identical: bool = False
    final_differences: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the first few, for a person to read
    steps: list[str] = field(default_factory=list)  # "command[:kill] -> exit code", in order
    seconds: float = 0.0
    command_seconds: float = 0.0  # of which the commands ran

    def note(self, problem: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(problem)

    @property
    def clean(self) -> bool:
        return (
            self.failed_queries == 0
            and not self.lost
            and not self.duplicated
            and not self.orphaned
            and not self.laundered
            and self.undetected_flips == 0
            and self.unrepaired == 0
            and self.catalog_damage == 0
            and self.lock_held == 0
            and self.unexpected_exits == 0
            and self.tracebacks == 0
            and self.final_identical
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "kills": self.kills,
            "kills_by_command": dict(sorted(self.kills_by_command.items())),
            "kills_at_crash_points": self.kills_at_points,
            "completed_runs": self.completed_runs,
            "queries": self.queries,
            "failed_queries": self.failed_queries,
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "orphaned": len(self.orphaned),
            "laundered": len(self.laundered),
            "flips": dict(sorted(self.flips.items())),
            "undetected_flips": self.undetected_flips,
            "unrepaired": self.unrepaired,
            "catalog_deletions": self.catalog_deletions,
            "reader_refusals": self.reader_refusals,
            "reader_unclear_refusals": self.reader_unclear_refusals,
            "catalog_damage": self.catalog_damage,
            "lock_held": self.lock_held,
            "unexpected_exits": self.unexpected_exits,
            "tracebacks": self.tracebacks,
            "final_identical": self.final_identical,
            "final_differences": self.final_differences[:10],
            "problems": self.problems,
            "seconds": round(self.seconds, 1),
            "command_seconds": round(self.command_seconds, 1),
        }


class Corpus:
    """The picture folder: files drawn from seeds, changed between index runs like a real one."""

    def __init__(self, root: Path, rng: random.Random, reference: Callable[[Path], str]) -> None:
        self.root = root
        self.rng = rng
        self.reference = reference  # encodes a new file, returns its sha256
        self.epoch = 0

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*.jpg") if p.is_file())

    def draw(self, path: Path) -> None:
        colour = self.rng.choice(list(COLOURS))
        shape = self.rng.choice(SHAPES)
        path.parent.mkdir(parents=True, exist_ok=True)
        image = draw_shape(colour, shape, random.Random(f"{self.rng.random()}"), 64)
        image.save(path, "JPEG", quality=90)
        self.reference(path)

    def grow(self, count: int) -> None:
        folder = self.root / f"e{self.epoch:04d}"
        for n in range(count):
            self.draw(folder / f"{n:02d}.jpg")

    def change(self, max_images: int) -> set[Path]:
        """One round of changes (new, deleted, changed, moved, copied); returns the paths whose
        image may leave the index (deleted, changed or moved away)."""
        self.epoch += 1
        files = self.files()
        touched: set[Path] = set()
        removals = 1 + max(0, len(files) - max_images + 6)
        for path in self.rng.sample(files, min(removals, len(files) - 4)):
            path.unlink()
            touched.add(path)
        files = [p for p in self.files() if p not in touched]
        changed, moved = self.rng.sample(files, 2)
        self.draw(changed)  # new bytes at the same path
        touched.add(changed)
        target = self.root / "moved" / f"e{self.epoch:04d}-{moved.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        moved.rename(target)
        touched.add(moved)
        source = self.rng.choice([p for p in self.files() if p not in touched])
        (self.root / "copies").mkdir(exist_ok=True)
        shutil.copyfile(source, self.root / "copies" / f"e{self.epoch:04d}.jpg")
        self.grow(3)
        return touched


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_bytes(shard_dir: Path, target: str, rng: random.Random) -> str:
    """Flip 1-16 bytes of one file of a shard (within `target`'s region); says where."""
    name = target.split()[0]
    path = shard_dir / name
    size = path.stat().st_size
    start, end = 0, size
    if name == EMBEDDINGS_FILE:
        with open(path, "rb") as handle:
            read_npy_header(handle, path)
            data_start = handle.tell()
        start, end = (data_start, size) if target.endswith("data") else (0, data_start)
    count = rng.randint(1, 16)
    offset = rng.randrange(start, max(start + 1, end - count))
    with open(path, "r+b") as handle:
        handle.seek(offset)
        raw = handle.read(count)
        handle.seek(offset)
        handle.write(bytes(b ^ rng.randint(1, 255) for b in raw))
    return f"{name} bytes {offset}-{offset + len(raw) - 1}"


def index_dir_files(index_dir: Path) -> dict[str, tuple[int, int, int]]:
    """Every shard file and index.json, with size, mtime and inode: what a refused job must keep."""
    found = {}
    for path in sorted(index_dir.rglob("*")):
        relative = path.relative_to(index_dir)
        if path.is_file() and (relative.parts[0] == SHARDS_DIR or relative.name == "index.json"):
            info = path.stat()
            found[str(relative)] = (info.st_size, info.st_mtime_ns, info.st_ino)
    return found


def active_rows(catalog: Catalog) -> list[tuple[int, str, str | None, str | None]]:
    """(id, path, sha256, shard id) of every active catalog row."""
    with catalog.session() as session:
        query = select(ImageRow.id, ImageRow.path, ImageRow.sha256, ImageRow.shard_id).where(
            ImageRow.status == ACTIVE
        )
        return [(int(i), str(p), s, shard) for i, p, s, shard in session.execute(query)]


def orphan_shard_dirs(index_dir: Path, known: set[str]) -> list[str]:
    """Shard directories of `index_dir` that no catalog row (of `known` shard ids) names."""
    return [name for name in list_shard_dirs(index_dir) if name not in known]


class Reader(threading.Thread):
    """Searches the index throughout, as the API would (polling for new generations)."""

    def __init__(self, chaos: Chaos) -> None:
        super().__init__(name="chaos-reader", daemon=True)
        self.chaos = chaos
        self.stop = threading.Event()
        self.queries = 0
        self.failed = 0
        self.refused = 0  # CatalogMismatch while the catalog was gone: the right answer
        self.unclear = 0  # another error then

    def run(self) -> None:
        chaos = self.chaos
        catalog = Catalog(chaos.databases.chaos)
        searcher = Searcher(catalog, chaos.index_dir, None)
        last_generation = 0
        try:
            while not self.stop.is_set():
                version, stable, away = chaos.expectation()
                vector = chaos.query_vectors[self.queries % len(chaos.query_vectors)]
                try:
                    searcher.refresh()
                    snap = searcher.snapshot()
                    result = searcher.search_vector(vector, K_ALL)
                    hidden = chaos.members_of(catalog, snap.shards.corrupt_shards)
                except CatalogMismatch as exc:
                    if away or chaos.version != version:
                        self.refused += 1  # right while the catalog is gone
                    else:
                        self.fail(f"reader: refused outside a catalog deletion: {exc}")
                    time.sleep(chaos.config.reader_pause)
                    continue
                except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                    if away or chaos.version != version:
                        # No answer, but no reason either: counted apart from wrong answers.
                        self.unclear += 1
                        if self.unclear == 1:
                            chaos.report.note(
                                f"reader, catalog gone: {type(exc).__name__}: {exc}"[:400]
                            )
                    else:
                        self.fail(f"reader: {type(exc).__name__}: {exc}")
                    time.sleep(chaos.config.reader_pause)
                    continue
                self.queries += 1
                ids = [hit.id for hit in result.hits]
                problem = None
                if len(ids) != len(set(ids)):
                    problem = f"an id twice in one answer (generation {result.generation})"
                elif any(abs(hit.score) > 1.0001 for hit in result.hits):
                    problem = f"an impossible score (generation {result.generation})"
                elif result.generation < last_generation and not away:
                    problem = f"generation went back from {last_generation} to {result.generation}"
                elif chaos.version == version and not away:
                    missing = set(stable) - set(ids) - hidden
                    # Valid only while the catalog still is at the answer's generation: a
                    # repair committed since has moved the hidden shard's images elsewhere.
                    if missing and catalog.generation() == result.generation:
                        problem = (
                            f"generation {result.generation} misses committed images "
                            f"{sorted(missing)[:5]}"
                        )
                last_generation = max(last_generation, result.generation)
                if problem:
                    self.fail(f"reader: {problem}")
                time.sleep(chaos.config.reader_pause)
        finally:
            searcher.close()
            catalog.dispose()

    def fail(self, problem: str) -> None:
        self.failed += 1
        self.chaos.report.note(problem)


class Chaos:
    """One run: the world, its clean twin, the reader, and the loop of faults and checks."""

    def __init__(self, config: ChaosConfig, encoder: Encoder, commands: Commands) -> None:
        self.config = config
        self.databases = config.databases
        self.encoder = encoder
        self.commands = commands
        self.rng = random.Random(config.seed)
        self.report = ChaosReport(config.databases.kind)
        base = config.base
        self.root = base / "photos"
        self.data_dir = base / "data"
        self.index_dir = self.data_dir / "index"
        self.twin_settings = self._twin_settings(base / "twin", self.databases.twin)
        self.references: dict[str, np.ndarray] = {}
        self.corpus = Corpus(self.root, self.rng, self._reference)
        self.query_vectors = encoder.encode_texts(QUERIES)
        # What the reader may expect: ids committed by a finished index run whose files have
        # not changed since; `version` moves before any change, so a check that straddles one
        # is not counted.
        self._lock = threading.Lock()
        self.version = 0
        self.stable: dict[int, str] = {}
        self.catalog_away = False
        self.degraded = False
        self.epoch_done = True
        self.label_definition = LABELS_A
        self.durations = {command: 1.5 for command in COMMANDS}
        self.catalog = Catalog(self.databases.chaos)
        self.twin = Catalog(self.databases.twin)
        self.reader = Reader(self)

    def _twin_settings(self, data_dir: Path, url: str) -> Settings:
        """The clean twin's settings: those `env` gives the commands, and no labels on index
        (the twin labels once, at the end, with the final label set)."""
        return load_settings(
            data_dir=data_dir,
            database_url=url,
            model=MODEL,
            pretrained=str(self.config.checkpoint),
            device="cpu",
            workers=0,
            batch_size=8,
            shard_size=SHARD_SIZE,
            retire_grace_seconds=3,
            label_on_index=False,
        )

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "CLIPSEARCH_DATA_DIR": str(self.data_dir),
            "CLIPSEARCH_DATABASE_URL": self.databases.chaos,
            "CLIPSEARCH_MODEL": MODEL,
            "CLIPSEARCH_PRETRAINED": str(self.config.checkpoint),
            "CLIPSEARCH_DEVICE": "cpu",
            "CLIPSEARCH_TORCH_THREADS": "1",
            "CLIPSEARCH_WORKERS": "1",  # a DataLoader worker, to die with its killed parent
            "CLIPSEARCH_BATCH_SIZE": "4",
            "CLIPSEARCH_SHARD_SIZE": str(SHARD_SIZE),
            "CLIPSEARCH_RETIRE_GRACE_SECONDS": "3",
        }
        env.update(extra)
        return env

    # --- what the world should look like -------------------------------------------------
    def _reference(self, path: Path) -> str:
        """A fresh encoding of the file, by its sha256: what every stored copy must equal."""
        digest = sha256_of(path)
        if digest not in self.references:
            decoded = decode_image(
                str(path), max_pixels=100_000_000, min_side=self.encoder.identity.image_size
            )
            self.references[digest] = self.encoder.encode_images([decoded.image])[0]
        return digest

    def expectation(self) -> tuple[int, dict[int, str], bool]:
        with self._lock:
            return self.version, dict(self.stable), self.catalog_away

    def _forget(self, paths: set[Path]) -> None:
        with self._lock:
            self.version += 1
            gone = {str(p) for p in paths}
            self.stable = {i: p for i, p in self.stable.items() if p not in gone}

    def members_of(self, catalog: Catalog, shard_ids: Any) -> set[int]:
        found: set[int] = set()
        for shard_id in shard_ids:
            found.update(record.id for record in catalog.shard_members(shard_id))
        return found

    def active_rows(self) -> list[tuple[int, str, str | None, str | None]]:
        return active_rows(self.catalog)

    # --- the run -----------------------------------------------------------------------------
    def run(self) -> ChaosReport:
        started = time.monotonic()
        self.corpus.grow(self.config.initial_images)
        LabelStore(self.catalog_upgraded()).put(LabelSet.from_dict(self.label_definition))
        self._finish("index")
        self.reader.start()
        deletion_at = self._catalog_deletions_due()
        try:
            for entry in self.config.plan:
                self.scripted(entry)
            while self.report.kills < self.config.kills:
                self.step()
                while deletion_at and self.report.kills >= deletion_at[0]:
                    deletion_at.pop(0)
                    self.delete_catalog()
        finally:
            self.reader.stop.set()
            self.reader.join(60)
        self.report.queries = self.reader.queries
        self.report.reader_refusals = self.reader.refused
        self.report.reader_unclear_refusals = self.reader.unclear
        self.report.failed_queries += self.reader.failed
        self.finish()
        self.report.seconds = time.monotonic() - started
        return self.report

    def catalog_upgraded(self) -> Catalog:
        self.catalog.upgrade()
        return self.catalog

    def _catalog_deletions_due(self) -> list[int]:
        every = self.config.catalog_every
        if self.config.plan:
            return []
        if every <= 0:
            return [max(1, self.config.kills // 2)]
        return list(range(every, self.config.kills + 1, every))

    def step(self) -> None:
        """Pick a command and how to kill it (mostly), prepare its work, run it, check."""
        weights = {"index": 4, "compact": 2, "label": 2, "repair": 2}
        if self.degraded:
            weights["repair"] = 5
        command = self.rng.choices(list(weights), weights=list(weights.values()))[0]
        if command == "repair" and not self.degraded and self.config.flips:
            self.flip()
        if self.rng.random() >= 0.85:
            kill = None
        elif self.rng.random() < 0.4:
            kill = self.rng.choice(CRASH_POINTS[command])
        else:
            kill = TIMED
        self.run_step(command, kill)

    def scripted(self, entry: str) -> None:
        """One step of a plan: `flip`, `catalog`, `COMMAND` (run to its end), `COMMAND:timed`
        (killed at a random moment) or `COMMAND:CRASH_POINT`."""
        if entry == "flip":
            self.flip()
        elif entry == "catalog":
            self.delete_catalog()
        else:
            command, _, kill = entry.partition(":")
            self.run_step(command, kill or None)

    def run_step(self, command: str, kill: str | None) -> None:
        """Give the command work (changed files, an edited label set), run it, check."""
        if command == "index" and self.epoch_done:
            self._forget(self.corpus.change(self.config.max_images))
            self.epoch_done = False
        if command == "label" and self._labels_published():
            self.label_definition = LABELS_B if self.label_definition is LABELS_A else LABELS_A
            LabelStore(self.catalog).put(LabelSet.from_dict(self.label_definition))
        extra: dict[str, str] = {}
        kill_after = None
        if kill == TIMED:
            kill_after = self.rng.uniform(0.0, self.durations[command])
        elif kill is not None:
            extra[CRASH_ENV] = kill
        outcome = self.commands.run(self.argv(command), self.env(**extra), kill_after=kill_after)
        self.report.steps.append(f"{command}:{kill} -> {outcome.code}")
        self.after(outcome)

    def _labels_published(self) -> bool:
        """True once the label set's newest version labels the corpus (index, label and repair
        all label)."""
        stored = LabelStore(self.catalog).get(str(LABELS_A["name"]))
        return stored.labelled_version == stored.version

    def argv(self, command: str) -> list[str]:
        return {
            "index": ["index", str(self.root), "--no-progress"],
            "compact": ["compact", "--all"],
            "label": ["label"],
            "repair": ["repair"],
        }[command]

    def _finish(self, command: str) -> Outcome:
        """Run `command` to its end (no kill): it must succeed."""
        outcome = self.commands.run(self.argv(command), self.env())
        self.after(outcome)
        if outcome.code != 0:
            raise RuntimeError(f"clipsearch {command} failed:\n{outcome.output}")
        return outcome

    def after(self, outcome: Outcome) -> None:
        """Book-keeping and every check after one command."""
        report = self.report
        report.command_seconds += outcome.seconds
        if "Traceback" in outcome.output:
            report.tracebacks += 1
            report.note(f"{outcome.command}: traceback:\n{outcome.output[-2000:]}")
        if outcome.killed:
            report.kills += 1
            report.kills_by_command[outcome.command] += 1
            report.kills_at_points += outcome.crash_point is not None
        elif outcome.code == 3:
            report.lock_held += 1
            report.note(f"{outcome.command}: exit 3 after a kill: {outcome.output[-500:]}")
        elif outcome.code != 0:
            report.unexpected_exits += 1
            report.note(f"{outcome.command}: exit {outcome.code}: {outcome.output[-1500:]}")
        else:
            report.completed_runs += 1
            self.durations[outcome.command] = 0.7 * self.durations[outcome.command] + 0.3 * (
                outcome.seconds
            )
        succeeded = outcome.code == 0
        if succeeded and outcome.command == "index":
            self.epoch_done = True
            self._index_twin()
        if succeeded and outcome.command == "repair":
            self._check_repaired()
        self.check(after_success=succeeded, command=outcome.command)

    def _index_twin(self) -> None:
        """The clean twin indexes the same files, in process and never killed; the committed
        images become what every later search must return."""
        IndexJob(
            self.twin_settings,
            self.twin,
            lambda: self.encoder,
            progress=False,
        ).run([str(self.root)])
        rows = self.active_rows()
        on_disk = {str(p) for p in self.corpus.files()}
        indexed = {path for _, path, _, _ in rows}
        for path in sorted(on_disk - indexed):
            self.report.lost.add(path)
            self.report.note(f"index succeeded but {path} is not active")
        with self._lock:
            self.stable = {i: p for i, p, _, _ in rows}

    # --- faults ------------------------------------------------------------------------------
    def flip(self) -> None:
        """Damage one file of one active shard, then `verify` must name the shard (exit 6)."""
        rows = self.catalog.shards()
        if not rows:
            return
        shard = self.rng.choice(rows)
        target = FLIP_TARGETS[sum(self.report.flips.values()) % len(FLIP_TARGETS)]
        where = flip_bytes(shard_path(self.index_dir, shard.id), target, self.rng)
        self.report.flips[target] += 1
        self.degraded = True
        verified = self.commands.run(["verify"], self.env())
        if verified.code != 6 or shard.id not in verified.output:
            self.report.undetected_flips += 1
            self.report.note(
                f"flip of {where} in shard {shard.id} not reported by verify "
                f"(exit {verified.code}): {verified.output[-800:]}"
            )
        if "Traceback" in verified.output:
            self.report.tracebacks += 1

    def _check_repaired(self) -> None:
        report = verify_index(self.catalog, self.index_dir, progress=False)
        if report.ok:
            self.degraded = False
            return
        self.report.unrepaired += 1
        self.report.note(f"repair succeeded but verify finds {report.corrupt}")

    def delete_catalog(self) -> None:
        """The catalog disappears: every writer must refuse (exit 8) and delete nothing."""
        self.report.catalog_deletions += 1
        before = index_dir_files(self.index_dir)
        second = self.rng.choice(["compact", "label", "repair"])
        with self._catalog_gone() as url:
            for command in ("index", second):
                outcome = self.commands.run(
                    self.argv(command), self.env(CLIPSEARCH_DATABASE_URL=url)
                )
                if outcome.code != 8 or "Traceback" in outcome.output:
                    self.report.catalog_damage += 1
                    self.report.note(
                        f"{command} beside a deleted catalog: exit {outcome.code}: "
                        f"{outcome.output[-800:]}"
                    )
            after = index_dir_files(self.index_dir)
            if after != before:
                self.report.catalog_damage += 1
                changed = sorted(set(before.items()) ^ set(after.items()))[:5]
                self.report.note(f"a refused job changed the index dir: {changed}")

    @contextlib.contextmanager
    def _catalog_gone(self) -> Iterator[str]:
        """SQLite: the file (and its WAL) moved away, then put back as from a backup. Postgres: the
        writers pointed at an empty database (a reset one); the reader keeps the real one."""
        if self.databases.blank is not None:
            with self.databases.blank() as url:
                yield url
            return
        url = self.databases.chaos
        path = Path(url.removeprefix("sqlite:///"))
        aside = self.config.base / "aside"
        aside.mkdir(exist_ok=True)
        self.catalog.dispose()
        with self._lock:
            self.version += 1
            self.catalog_away = True
        moved = []
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{path}{suffix}")
            if source.exists():
                source.rename(aside / source.name)
                moved.append(source)
        try:
            yield url
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)  # what the refused jobs made
            for source in moved:
                (aside / source.name).rename(source)
            self.catalog = Catalog(url)
            time.sleep(0.5)  # the reader turns back (its own poll)
            with self._lock:
                self.version += 1
                self.catalog_away = False

    # --- checks ------------------------------------------------------------------------------
    def check(self, *, after_success: bool, command: str) -> None:
        report = self.report
        _, stable, _ = self.expectation()
        rows = self.active_rows()
        by_path = Counter(path for _, path, _, _ in rows)
        for path, count in by_path.items():
            if count > 1:
                report.duplicated.add(path)
                report.note(f"after {command}: {count} active rows for {path}")
        active = {image_id: (path, sha, shard) for image_id, path, sha, shard in rows}
        for image_id in sorted(set(stable) - set(active)):
            report.lost.add(f"id {image_id}")
            report.note(f"after {command}: committed image {image_id} is no longer active")
        for image_id in stable:
            if image_id in active and active[image_id][0] != stable[image_id]:
                report.lost.add(f"id {image_id}")
                report.note(f"after {command}: image {image_id} changed path")

        shard_rows = self.catalog.shards()
        known = self.catalog.known_shard_ids()
        if after_success and command in ("index", "compact", "repair"):
            for name in orphan_shard_dirs(self.index_dir, known):
                report.orphaned.add(name)
                report.note(f"after a successful {command}: orphan shard dir {name}")

        holder: dict[int, str] = {}
        corrupt: set[str] = set()
        for row in shard_rows:
            # Files as their writer left them (checksums only): a shard written from corrupt
            # input has sound checksums, whatever its vectors look like.
            if not check_shard(self.index_dir, row.id, ShardExpectation.of(row)).ok:
                corrupt.add(row.id)  # a flip: detected, left out until repaired
                continue
            folder = shard_path(self.index_dir, row.id)
            ids = np.load(folder / IDS_FILE)
            for image_id in ids.tolist():
                if image_id in holder:
                    report.duplicated.add(f"id {image_id}")
                    report.note(f"image {image_id} in shards {holder[image_id]} and {row.id}")
                holder[image_id] = row.id
            embeddings = np.load(folder / EMBEDDINGS_FILE).astype(np.float32)
            self._check_vectors(row.id, ids, embeddings, active)
        if corrupt and not self.degraded:
            report.note(f"after {command}: corrupt shards {sorted(corrupt)} without a flip")
            report.unrepaired += 1
        hidden = self.members_of(self.catalog, corrupt)
        for image_id in sorted(set(stable) - set(holder) - hidden):
            report.lost.add(f"id {image_id}")
            report.note(f"after {command}: committed image {image_id} is in no sound shard")
        self._check_search(stable, command)

    def _check_vectors(
        self,
        shard_id: str,
        ids: np.ndarray,
        embeddings: np.ndarray,
        active: dict[int, tuple[str, str | None, str | None]],
    ) -> None:
        """Laundering: every vector of a sound shard (embeddings.npy and the index's own copy)
        equals a fresh encoding of its image."""
        shas = self._shas(ids, active)
        copies = [embeddings]
        found = stored_vectors(read_index_file(shard_path(self.index_dir, shard_id) / INDEX_FILE))
        if found is not None and np.array_equal(found[0], ids):
            copies.append(found[1])
        for vectors in copies:
            for image_id, vector in zip(ids.tolist(), vectors, strict=True):
                sha = shas.get(image_id)
                reference = self.references.get(sha or "")
                if reference is None:
                    continue  # a row purged since (tombstoned): compared when it was live
                with np.errstate(invalid="ignore", over="ignore"):
                    apart = float(np.max(np.abs(vector - reference)))
                if not apart <= SAME_VECTOR_TOLERANCE:  # NaN too
                    self.report.laundered.add((shard_id, image_id))
                    self.report.note(
                        f"shard {shard_id} passes its checksums but image {image_id}'s vector "
                        f"is not its image's (a component {apart:.4g} off)"
                    )

    def _shas(
        self, ids: np.ndarray, active: dict[int, tuple[str, str | None, str | None]]
    ) -> dict[int, str | None]:
        shas = {i: active[i][1] for i in ids.tolist() if i in active}
        others = [i for i in ids.tolist() if i not in active]
        if others:
            shas.update({i: r.sha256 for i, r in self.catalog.records(others).items()})
        return shas

    def _check_search(self, stable: dict[int, str], command: str) -> None:
        """A fresh reader (as a restarted API) answers with every committed image."""
        searcher = Searcher(self.catalog, self.index_dir, None)
        try:
            snap = searcher.snapshot()
            hidden = self.members_of(self.catalog, snap.shards.corrupt_shards)
            for vector in self.query_vectors[:2]:
                hits = searcher.search_vector(vector, K_ALL).hits
                ids = [hit.id for hit in hits]
                if len(ids) != len(set(ids)):
                    self.report.duplicated.add(f"search after {command}")
                    self.report.note(f"after {command}: an id twice in one answer")
                for image_id in sorted(set(stable) - set(ids) - hidden):
                    self.report.lost.add(f"id {image_id}")
                    self.report.note(f"after {command}: image {image_id} not found by search")
        finally:
            searcher.close()

    # --- the end ----------------------------------------------------------------------------
    def finish(self) -> None:
        """Bring the world to rest without kills, then compare it with the clean twin."""
        for command in ("index", "label"):
            self._finish(command)
        if self.degraded:
            self._finish("repair")
        self._finish("compact")
        twin_store = LabelStore(self.twin)
        twin_store.put(LabelSet.from_dict(self.label_definition))
        LabelJob(self.twin_settings, self.twin, lambda: self.encoder, progress=False).run()
        verified = verify_index(self.catalog, self.index_dir, progress=False)
        if not verified.ok or verified.orphans:
            self.report.unrepaired += not verified.ok
            self.report.note(f"at the end, verify: {verified.to_dict()}")
        differences = self.compare()
        self.report.final_differences = differences
        self.report.final_identical = not differences
        self.catalog.dispose()
        self.twin.dispose()

    def observed(self, catalog: Catalog, index_dir: Path) -> dict[str, Any]:
        """What a user sees, by path (ids are compared through the checks above)."""
        records = catalog.records_under([str(self.root)])
        live = {path: (r.sha256, r.status) for path, r in records.items()}
        paths = {r.id: path for path, r in records.items()}
        searcher = Searcher(catalog, index_dir, None)
        try:
            results = [
                {paths[h.id]: h.score for h in searcher.search_vector(v, K_ALL).hits}
                for v in self.query_vectors
            ]
        finally:
            searcher.close()
        labels = LabelStore(catalog).labels_for(list(paths))
        by_path = {
            paths[i]: sorted((label.label, round(label.score, 3)) for label in found)
            for i, found in labels.items()
        }
        return {"live": live, "results": results, "labels": by_path}

    def compare(self) -> list[str]:
        mine = self.observed(self.catalog, self.index_dir)
        clean = self.observed(self.twin, self.twin_settings.resolved_index_dir)
        differences = []
        if mine["live"] != clean["live"]:
            only = sorted(set(mine["live"].items()) ^ set(clean["live"].items()))[:5]
            differences.append(f"live images differ: {only}")
        for query, ours, theirs in zip(QUERIES, mine["results"], clean["results"], strict=True):
            if set(ours) != set(theirs):
                differences.append(f"{query!r}: other images ({len(ours)} vs {len(theirs)})")
            elif any(abs(ours[p] - theirs[p]) > SCORE_TOLERANCE for p in ours):
                differences.append(f"{query!r}: other scores")
        if set(mine["labels"]) != set(clean["labels"]):
            differences.append(
                f"labelled images differ ({len(mine['labels'])} vs {len(clean['labels'])})"
            )
        else:
            for path, labels in mine["labels"].items():
                theirs = clean["labels"][path]
                if [name for name, _ in labels] != [name for name, _ in theirs] or any(
                    abs(a - b) > 0.01 for (_, a), (_, b) in zip(labels, theirs, strict=True)
                ):
                    differences.append(f"labels of {path}: {labels} vs {theirs}")
                    break
        return differences
