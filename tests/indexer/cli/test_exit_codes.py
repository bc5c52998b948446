"""Every exit code the README and `clipsearch --help` document is reached by a real invocation of
the command, with its message and without a traceback; and no other code is documented."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from indexer.cli.app import HELP
from indexer.cli.output import EXIT_CODES, INTERRUPTED, UNEXPECTED
from indexer.lock import IndexLock
from indexer.pipeline import IndexJob
from retrieval.catalog.database import make_engine
from retrieval.catalog.migrate import upgrade_database
from retrieval.config import Settings, load_settings
from retrieval.index.shard import INDEX_FILE, list_shard_dirs, shard_path
from retrieval.training.shapes import generate_shapes
from tests.indexer.cli.test_cli import run_cli

README = Path(__file__).resolve().parents[3] / "README.md"
# Besides the domain errors' codes (EXIT_CODES): success, the unexpected, click's usage errors
# and an interrupt.
GENERIC = {0, UNEXPECTED, 2, INTERRUPTED}


class World:
    """A SQLite data dir with the tiny model, and the command line's environment for it."""

    def __init__(
        self,
        tmp_path: Path,
        settings: Settings,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        self.tmp_path = tmp_path
        self.settings = settings
        self.monkeypatch = monkeypatch
        self.capsys = capsys
        self.held = contextlib.ExitStack()  # what a case holds while the command runs
        self.pics = tmp_path / "pics"
        generate_shapes(self.pics, 4, seed=3)
        for name, value in {
            "CLIPSEARCH_DATA_DIR": str(settings.data_dir),
            "CLIPSEARCH_DATABASE_URL": settings.resolved_database_url,
            "CLIPSEARCH_MODEL": settings.model,
            "CLIPSEARCH_PRETRAINED": settings.pretrained,
            "CLIPSEARCH_DEVICE": "cpu",
            "CLIPSEARCH_WORKERS": "0",
        }.items():
            monkeypatch.setenv(name, value)

    def index(self) -> list[str]:
        """The pictures indexed (through the CLI); returns the shard ids."""
        code, _, err = self.run(["index", str(self.pics)])
        assert code == 0, err
        return list_shard_dirs(self.settings.resolved_index_dir)

    def run(self, args: list[str]) -> tuple[int, str, str]:
        return run_cli(args, self.capsys, self.monkeypatch)


def _ok(world: World) -> list[str]:
    return ["index", str(world.pics)]


def _unexpected(world: World) -> list[str]:
    # A catalog database nobody answers on: nothing the program could name in advance.
    world.monkeypatch.setenv("CLIPSEARCH_DATABASE_URL", "postgresql+psycopg://x@127.0.0.1:1/x")
    return ["status"]


def _bad_setting(world: World) -> list[str]:
    world.monkeypatch.setenv("CLIPSEARCH_BATCH_SIZE", "0")
    return ["index", str(world.pics)]


def _usage(world: World) -> list[str]:
    return ["index", "--no-such-option", str(world.pics)]


def _locked(world: World) -> list[str]:
    index_dir = world.settings.resolved_index_dir
    index_dir.mkdir(parents=True)
    world.held.enter_context(IndexLock(index_dir))
    return ["index", str(world.pics)]


def _other_model(world: World) -> list[str]:
    world.index()
    return ["search", "a red circle", "--model", "ViT-B-32", "--pretrained", "openai"]


def _weights_gone(world: World) -> list[str]:
    weights = world.tmp_path / "moving.pt"
    weights.write_bytes(Path(world.settings.pretrained).read_bytes())
    world.monkeypatch.setenv("CLIPSEARCH_PRETRAINED", str(weights))
    world.index()
    weights.unlink()
    return ["search", "a red circle"]


def _corrupt(world: World) -> list[str]:
    shard = world.index()[0]
    path = shard_path(world.settings.resolved_index_dir, shard) / INDEX_FILE
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    return ["verify"]


def _not_found(world: World) -> list[str]:
    world.index()  # repair reads an index: with no catalog at all it would exit 9
    return ["repair", "--shard", "no-such-shard"]


def _catalog_lost(world: World) -> list[str]:
    world.index()
    database = Path(world.settings.resolved_database_url.removeprefix("sqlite:///"))
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    return ["index", str(world.pics)]


def _empty_index(world: World) -> list[str]:
    return ["search", "a red circle"]


def _no_such_device(world: World) -> list[str]:
    # A device number no machine has: refused whether or not this one has a GPU.
    world.monkeypatch.setenv("CLIPSEARCH_DEVICE", "cuda:99")
    return ["index", str(world.pics)]


def _schema_older(world: World) -> list[str]:
    # A catalog an older clipsearch wrote: readers never migrate it, they name the command.
    world.settings.data_dir.mkdir(parents=True)
    upgrade_database(make_engine(world.settings.resolved_database_url), "0005")
    return ["status"]


def _cluster_unreachable(world: World) -> list[str]:
    # Port 1 on this machine: nothing listens, so the job is refused in seconds.
    return ["index", str(world.pics), "--engine", "ray", "--ray-address", "127.0.0.1:1"]


def _interrupted(world: World) -> list[str]:
    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C in the middle of the job

    world.monkeypatch.setattr(IndexJob, "run", interrupted)
    return ["index", str(world.pics)]


# code -> (what triggers it, words its message must have)
CASES: dict[str, tuple[int, Callable[[World], list[str]], str]] = {
    "ok": (0, _ok, ""),
    "unexpected": (1, _unexpected, "the traceback is in"),
    "bad-setting": (2, _bad_setting, "CLIPSEARCH_BATCH_SIZE"),
    "usage": (2, _usage, "No such option"),
    "locked": (3, _locked, "Another indexer is already running"),
    "other-model": (4, _other_model, "ViT-B-32"),
    "weights-gone": (5, _weights_gone, "moving.pt"),
    "corrupt-shard": (6, _corrupt, "clipsearch repair"),
    "not-found": (7, _not_found, "no-such-shard"),
    "catalog-lost": (8, _catalog_lost, "catalog"),
    "empty-index": (9, _empty_index, "clipsearch index"),
    "no-such-device": (10, _no_such_device, "CLIPSEARCH_DEVICE=cuda:99: "),
    "schema-older": (11, _schema_older, "run `clipsearch db upgrade`"),
    "cluster-unreachable": (12, _cluster_unreachable, "no Ray cluster answers at 127.0.0.1:1"),
    "interrupted": (INTERRUPTED, _interrupted, "interrupted"),
}


def _documented_in_readme() -> set[int]:
    text = README.read_text(encoding="utf-8")
    start = text.index("Exit codes: `0`")
    paragraph = text[start : text.index("\n\n", start)]
    return {int(code) for code in re.findall(r"`(\d+)` [a-z]", paragraph)}


def _documented_in_help() -> set[int]:
    listed = HELP[HELP.index("Exit codes:") :]
    return {int(code) for code in re.findall(r"(?:: |, )(\d+) [a-z]", listed)}


def test_the_readme_the_help_and_the_code_document_the_same_exit_codes() -> None:
    produced = GENERIC | set(EXIT_CODES.values())
    assert _documented_in_readme() == produced
    assert _documented_in_help() == produced
    assert {code for code, _, _ in CASES.values()} == produced, "a code no test reaches"


@pytest.mark.parametrize("case", list(CASES))
def test_each_exit_code_is_reached_with_a_message_and_no_traceback(
    case: str,
    tmp_path: Path,
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = load_settings(
        data_dir=tmp_path / "data", model="clipsearch-tiny", pretrained=str(tiny_checkpoint)
    )
    world = World(tmp_path, settings, monkeypatch, capsys)
    expected, trigger, words = CASES[case]
    with world.held:
        code, out, err = world.run(trigger(world))
    assert code == expected, out + err
    assert "Traceback" not in out + err + caplog.text
    assert words in out + err
    saved = re.search(r"the traceback is in (\S+)\)", err)
    if saved is not None:  # kept for a bug report, where the message says
        kept = Path(saved.group(1))
        assert "Traceback" in kept.read_text() and "OperationalError" in kept.read_text()
        kept.unlink()
