"""A new user's first hour, scripted: weights carried over by hand, a folder indexed, a search
with no model named, the server started with flags and its page opened in Chromium, and an index
of random weights that says so on the page.

The commands run through the `clipsearch` entry point (`main()` with the user's argv): `models
import`, `index` and `search` in this process, since the tiny model stands in for a recommended
one only where this test registers it; `serve` as real processes, named by flags alone. Each
step's wall time and the total are printed (run with -s to see them).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from retrieval.training.shapes import generate_shapes
from tests.conftest import TINY
from tests.indexer.cli.test_cli import run_cli
from tests.indexer.cli.test_index_model import loads  # noqa: F401 - a fixture
from tests.indexer.cli.test_models import TINY_TAG, cache, tiny_in_table  # noqa: F401 - fixtures
from tests.serving import start_server, wait_ready
from tests.web.conftest import OpenPage, open_page  # noqa: F401 - a fixture
from tests.web.search_page import SearchPage
from tests.web.test_page_states import RANDOM_WEIGHTS_EN

pytestmark = pytest.mark.slow  # starts two servers and a browser

PHOTOS = 8
RANDOM_WARNING = (
    "warning: random weights (pretrained=none): results are meaningless; `clipsearch models` "
    "lists real weights to index with"
)


class Clock:
    """The wall time of each step of the hour, and of all of them."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float]] = []
        self.started = time.monotonic()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        began = time.monotonic()
        yield
        self.steps.append((name, time.monotonic() - began))

    def report(self) -> str:
        total = time.monotonic() - self.started
        lines = [f"  {seconds:6.1f} s  {name}" for name, seconds in self.steps]
        return "\n".join(["first hour:", *lines, f"  {total:6.1f} s  in all"])


@pytest.fixture
def user(monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's shell: no clipsearch variable set but the model cache (`cache`), on the CPU."""
    for name in ("CLIPSEARCH_MODEL", "CLIPSEARCH_PRETRAINED", "CLIPSEARCH_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLIPSEARCH_DEVICE", "cpu")
    monkeypatch.setenv("CLIPSEARCH_WORKERS", "0")


def test_the_first_hour(
    tmp_path: Path,
    cache: Path,  # noqa: F811 - the fixture
    tiny_in_table: dict[str, Any],  # noqa: F811 - the fixture
    tiny_checkpoint: Path,
    user: None,
    loads: list[str],  # noqa: F811 - the fixture
    open_page: OpenPage,  # noqa: F811 - the fixture
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    photos, data, random_data = tmp_path / "photos", tmp_path / "data", tmp_path / "random"
    generate_shapes(photos, PHOTOS, seed=11)
    carried = tmp_path / "usb-stick" / "open_clip_pytorch_model.bin"  # copied from a machine
    carried.parent.mkdir()  # that has the internet (`clipsearch models fetch tiny` there)
    carried.write_bytes(tiny_checkpoint.read_bytes())
    clock = Clock()

    def cli(*args: str) -> tuple[str, str]:
        code, out, err = run_cli(list(args), capsys, monkeypatch)
        assert code == 0, (args, out, err)
        return out, err

    with clock.step("clipsearch models import FILE --name tiny"):
        out, _ = cli("models", "import", str(carried), "--name", "tiny")
    installed = cache / "clipsearch-imports" / "clipsearch-test--tiny-clip" / carried.name
    assert out.startswith(f"installed {carried} as {installed}\n")
    assert not data.exists()  # a fresh data dir: nothing there yet

    with clock.step("clipsearch index PHOTOS --model --pretrained --data-dir"):
        model = ["--model", TINY, "--pretrained", TINY_TAG]
        out, _ = cli("index", str(photos), *model, "--data-dir", str(data))
    assert out.startswith(f"generation 1: {PHOTOS} new, ")

    with clock.step("clipsearch search (no model flags)"):
        out, err = cli("search", "a red circle", "-k", "3", "--data-dir", str(data))
    lines = out.splitlines()
    assert lines[0].split() == ["score", "id", "path"] and len(lines) == 4
    assert all(str(photos) in line for line in lines[1:])
    assert loads[-1] == f"{TINY} / {TINY_TAG}"  # the index's model, found in the cache
    assert "random weights" not in err

    with clock.step("clipsearch index --pretrained none (a second data dir)"):
        none = ["--model", TINY, "--pretrained", "none"]
        cli("index", str(photos), *none, "--data-dir", str(random_data))
        out, err = cli("search", "a red circle", "-k", "1", "--data-dir", str(random_data))
    assert err.splitlines() == [RANDOM_WARNING]

    serve = {"CLIPSEARCH_DEVICE": "cpu"}  # nothing else: the flags name the rest
    trained_flags = ["--data-dir", str(data), "--model", TINY, "--pretrained", str(installed)]
    with contextlib.ExitStack() as stack:
        with clock.step("clipsearch serve --data-dir --model --pretrained (both side by side)"):
            trained = start_server(serve, tmp_path / "serve.log", trained_flags)
            stack.callback(trained.stop)
            # A misspelt variable, as users type them: warned about once in the server's log.
            typo = {**serve, "CLIPSEARCH_PRETRAINE": "none"}
            random = start_server(
                typo, tmp_path / "random.log", ["--data-dir", str(random_data), *none]
            )
            stack.callback(random.stop)
            wait_ready(trained)
            wait_ready(random)

        with clock.step("the page in Chromium, a search"):
            sp = SearchPage(open_page(trained.base_url + "/"))
            # The index's model, as it was indexed (the server was named the file it installed).
            assert sp.index_status() == f"Generation 1 · {PHOTOS} images · {TINY} ({TINY_TAG})"
            sp.search("a red circle")
            sp.wait_for_results()
            assert sp.cards().count() == PHOTOS
            assert sp.model_warning().is_hidden()

        with clock.step("the random index's page"):
            sp = SearchPage(open_page(random.base_url + "/"))
            sp.model_warning().wait_for(state="visible")
            assert sp.model_warning().inner_text() == RANDOM_WEIGHTS_EN
    warned = [line for line in random.log().splitlines() if "CLIPSEARCH_PRETRAINE " in line]
    assert warned == [
        "WARNING clipsearch.settings: CLIPSEARCH_PRETRAINE is not a setting and is ignored; "
        "did you mean CLIPSEARCH_PRETRAINED?"
    ]
    assert "CLIPSEARCH_PRETRAINE" not in trained.log()
    with capsys.disabled():
        print("\n" + clock.report())
