"""The README's backup recipe: `flock` on the indexer lock keeps every index job out."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from indexer.lock import IndexLock
from indexer.pipeline import IndexJob
from retrieval.catalog.database import Catalog
from retrieval.config import Settings
from retrieval.errors import IndexLocked
from retrieval.models.encoder import Encoder
from retrieval.training.shapes import generate_shapes


@pytest.mark.skipif(shutil.which("flock") is None, reason="util-linux flock not found")
def test_flock_on_the_index_lock_holds_off_the_indexer(
    settings: Settings, encoder: Encoder, tmp_path: Path
) -> None:
    generate_shapes(tmp_path / "pics", 2, seed=1)
    lock = settings.resolved_index_dir / "indexer.lock"
    lock.parent.mkdir(parents=True)
    ready = tmp_path / "ready"
    backup = subprocess.Popen(
        ["flock", "--nonblock", str(lock), "sh", "-c", f"touch {ready}; sleep 30"],
        start_new_session=True,  # its own process group: the sleep holds the lock too
    )
    try:
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert time.monotonic() < deadline and backup.poll() is None
            time.sleep(0.05)
        catalog = Catalog(settings.resolved_database_url)
        job = IndexJob(settings, catalog, lambda: encoder, progress=False)
        with pytest.raises(IndexLocked):
            job.run([tmp_path / "pics"])
    finally:
        os.killpg(backup.pid, signal.SIGTERM)
        backup.wait(timeout=10)
    deadline = time.monotonic() + 10
    while True:  # the group's last process may take a moment to die and drop the lock
        try:
            with IndexLock(settings.resolved_index_dir):
                break
        except IndexLocked:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert job.run([tmp_path / "pics"]).new == 2  # released with the backup
    catalog.dispose()
