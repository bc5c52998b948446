"""The indexer lock: held by one process only, never inherited by a child, never released by
one, and free the moment its holder is killed, with no DataLoader worker left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from indexer.crash import CRASH_ENV
from indexer.lock import IndexLock
from indexer.workers import die_with_parent
from retrieval.config import Settings
from retrieval.errors import IndexLocked
from retrieval.training.shapes import generate_shapes
from tests.serving import REPO

MARK = "CLIPSEARCH_TEST_RUN"


def _links_of_open_files() -> str:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor that listed the directory, closed by now
            continue
    return "\n".join(links)


def _open_files() -> str:
    """A program that prints the files its process has open, one a line."""
    return (
        "import os\n"
        "for fd in os.listdir('/proc/self/fd'):\n"
        "    try: print(os.readlink(f'/proc/self/fd/{fd}'))\n"
        "    except OSError: pass\n"
    )


def test_a_started_program_does_not_inherit_the_lock(tmp_path: Path) -> None:
    with IndexLock(tmp_path):
        child = subprocess.run(
            [sys.executable, "-c", _open_files()],
            close_fds=False,  # even so: the descriptor is close-on-exec
            capture_output=True,
            text=True,
            check=True,
        )
    assert "indexer.lock" not in child.stdout
    assert str(tmp_path) not in child.stdout


def test_a_forked_child_neither_holds_nor_releases_the_lock(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    with IndexLock(tmp_path) as lock:
        pid = os.fork()
        if pid == 0:  # the child, as a DataLoader worker starts
            try:
                os.close(read_end)
                held = "indexer.lock" in _links_of_open_files()
                lock.__exit__(None, None, None)  # must not unlock the parent's lock
                os.write(write_end, b"held" if held else b"free")
            finally:
                os.close(write_end)
                time.sleep(30)
                os._exit(0)
        try:
            os.close(write_end)
            assert os.read(read_end, 4) == b"free"
            with pytest.raises(IndexLocked):  # still ours
                IndexLock(tmp_path).__enter__()
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
    try:
        # Released by us while the child lives on: the child kept no copy.
        with IndexLock(tmp_path):
            pass
    finally:
        os.close(read_end)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_die_with_parent_is_armed_on_linux() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    pid = os.fork()
    if pid == 0:
        ok = die_with_parent(os.getppid())
        os._exit(0 if ok else 3)
    assert os.waitpid(pid, 0)[1] == 0


def _marked_processes(run: str) -> list[int]:
    """Live (not zombie) processes whose environment carries this run's mark."""
    needle = f"{MARK}={run}".encode()
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                if stat.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    continue
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if needle in environ.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_a_killed_indexer_frees_the_lock_at_once_and_leaves_no_worker(
    settings: Settings, tmp_path: Path, db_url: str
) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("the lock and the workers do not depend on the database")
    generate_shapes(tmp_path / "pics", 60, seed=4)
    run = uuid.uuid4().hex
    env = {
        **os.environ,
        MARK: run,
        CRASH_ENV: "during_encode",  # SIGKILL after the first batch, workers decoding ahead
        "CLIPSEARCH_DATA_DIR": str(settings.data_dir),
        "CLIPSEARCH_DATABASE_URL": settings.resolved_database_url,
        "CLIPSEARCH_MODEL": settings.model,
        "CLIPSEARCH_PRETRAINED": settings.pretrained,
        "CLIPSEARCH_DEVICE": "cpu",
        "CLIPSEARCH_BATCH_SIZE": "4",
    }
    log = tmp_path / "index.log"
    with open(log, "wb") as output:  # a file, not a pipe: a pipe reader waits for the workers
        killed = subprocess.run(
            [sys.executable, "-m", "indexer", "index", str(tmp_path / "pics"), "--workers", "2"],
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=output,
            timeout=300,
        )
    assert killed.returncode == -signal.SIGKILL, log.read_text()
    # Reaped just now: the lock must be free at once, with no retry.
    with IndexLock(settings.resolved_index_dir):
        pass
    # The kernel killed the workers with their parent; give them a moment to be gone.
    deadline = time.monotonic() + 3
    while _marked_processes(run) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _marked_processes(run) == []
