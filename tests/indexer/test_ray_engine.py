"""`clipsearch index --engine ray` on a real local Ray cluster (2 CPUs, shared by the module):
the same index as the local engine, a dead worker costs a retry, a killed driver a re-run, and
each cluster problem is a clear error with nothing committed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.engines import engine_for
from indexer.engines.ray import ACTOR_OVERHEAD_BYTES
from indexer.pipeline import IndexJob, IndexReport
from retrieval.catalog.database import Catalog
from retrieval.config import Settings, load_settings
from retrieval.errors import ClusterError, ConfigError, MixedModels
from retrieval.index.shard import list_shard_dirs
from retrieval.models.encoder import Encoder, encoder_from_settings
from retrieval.search import Searcher
from retrieval.training.shapes import generate_shapes
from retrieval.training.shapes_model import SHAPES_MODEL
from tests.fixtures.bad_images import write_bad_images
from tests.indexer.cli.test_cli import run_cli
from tests.serving import run_cli as run_cli_process

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

GIB = 1024**3
# What Ray may reserve on the test node: room for one actor of the tiny test model, not for a
# model with 64M parameters (see test_a_model_no_worker_can_hold_is_refused).
NODE_MEMORY = ACTOR_OVERHEAD_BYTES + 256 * 1024**2
QUERIES = ["a red circle", "a blue square", "a green triangle"]


@dataclass(frozen=True)
class Cluster:
    address: str
    hidden: Path | None  # a folder the cluster's workers see empty (None: no unshare here)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _can_unshare() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    probe = subprocess.run([unshare, "-m", "-r", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A Ray head with 2 CPUs and NODE_MEMORY for its workers. Where the kernel allows a private
    mount namespace, the cluster runs in one in which `hidden` is an empty tmpfs: what the
    tests put there, this process sees and the workers do not (a node without the share)."""
    port = _free_port()
    hidden: Path | None = tmp_path_factory.mktemp("hidden") if _can_unshare() else None
    start = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--memory={NODE_MEMORY}",
        f"--object-store-memory={256 * 1024**2}",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    if hidden is not None:
        script = f'mount -t tmpfs tmpfs "{hidden}" && exec "$@"'
        start = ["unshare", "-m", "-r", "sh", "-c", script, "ray", *start]
    # A cluster on the loopback for this process only: no token to share with the jobs.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        start,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    address = f"127.0.0.1:{port}"
    auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        _wait_for_node(address, head)
        yield Cluster(address, hidden)
    finally:
        if auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth
        os.killpg(head.pid, signal.SIGTERM)  # the head's processes: its workers follow them
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def _wait_for_node(address: str, head: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start failed: {head.stderr.read() if head.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", int(address.split(":")[1])), 1).close()
            break
        except OSError:
            time.sleep(0.5)
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        while time.monotonic() < deadline:
            if any(node["Alive"] and node["Resources"].get("CPU") for node in ray.nodes()):
                return
            time.sleep(0.5)
        raise RuntimeError("the Ray head never offered a CPU")
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shapes pictures and one file per decode failure (truncated, bomb, not an image...)."""
    root = tmp_path_factory.mktemp("corpus") / "photos"
    generate_shapes(root, 24, seed=3)
    (root / "captions.csv").unlink()
    write_bad_images(root / "bad")
    return root


def _settings(base: Path, checkpoint: Path, **overrides: object) -> Settings:
    return load_settings(
        data_dir=base,
        model=SHAPES_MODEL,
        pretrained=str(checkpoint),
        device="cpu",
        workers=0,
        batch_size=8,
        shard_size=16,
        retire_grace_seconds=0,
        label_on_index=False,
        **overrides,
    )


def _index(settings: Settings, root: Path, encoder: Encoder) -> IndexReport:
    catalog = Catalog(settings.resolved_database_url)
    try:
        return IndexJob(settings, catalog, lambda: encoder, progress=False).run([root])
    finally:
        catalog.dispose()


@dataclass
class IndexState:
    rows: Mapping[str, tuple[object, ...]]  # path -> id, status, reason, detail, width, height
    vectors: dict[str, np.ndarray]  # path -> stored vector
    searches: list[list[str]]  # the paths each query finds


def _state(settings: Settings, root: Path, encoder: Encoder) -> IndexState:
    catalog = Catalog(settings.resolved_database_url)
    searcher = Searcher(catalog, settings.resolved_index_dir, encoder)
    try:
        records = catalog.records_under([str(root)])
        rows = {
            path: (r.id, r.status, r.error_reason, r.error_detail, r.width, r.height, r.format)
            for path, r in records.items()
        }
        paths = {r.id: path for path, r in records.items()}
        live = np.array(sorted(r.id for r in records.values() if r.shard_id), dtype=np.int64)
        found, vectors = searcher.snapshot().shards.vectors(live)
        by_path = {paths[i]: vector for i, vector in zip(found.tolist(), vectors, strict=True)}
        searches = [[hit.path for hit in searcher.search_text(q, 5).hits] for q in QUERIES]
        return IndexState(rows, by_path, searches)
    finally:
        searcher.close()
        catalog.dispose()


def _assert_same(state: IndexState, reference: IndexState, *, same_ids: bool = True) -> None:
    """Same rows (ids too, unless `same_ids` is False), vectors within 1e-5, same searches."""
    if same_ids:
        assert state.rows == reference.rows
    else:  # a killed job's uncommitted rows get fresh ids on the re-run: ids are never reused
        assert {p: row[1:] for p, row in state.rows.items()} == {
            p: row[1:] for p, row in reference.rows.items()
        }
    assert state.vectors.keys() == reference.vectors.keys()
    for path, vector in reference.vectors.items():
        np.testing.assert_allclose(state.vectors[path], vector, atol=1e-5)
    assert state.searches == reference.searches


def _committed_nothing(settings: Settings) -> None:
    catalog = Catalog(settings.resolved_database_url)
    try:
        assert catalog.counts() in ({}, {"active": 0, "error": 0, "deleted": 0})
        assert not catalog.shards()
    finally:
        catalog.dispose()


@pytest.fixture(scope="module")
def semantic_encoder(
    semantic_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Encoder:
    base = tmp_path_factory.mktemp("encoder")
    return encoder_from_settings(_settings(base, semantic_checkpoint))


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory,
    corpus: Path,
    semantic_checkpoint: Path,
    semantic_encoder: Encoder,
) -> IndexState:
    """The local engine's index of the corpus."""
    settings = _settings(tmp_path_factory.mktemp("local"), semantic_checkpoint)
    report = _index(settings, corpus, semantic_encoder)
    assert report.engine == "local" and report.encoded == 24
    return _state(settings, corpus, semantic_encoder)


def test_ray_indexes_the_folder_as_the_local_engine_does(
    tmp_path: Path,
    cluster: Cluster,
    corpus: Path,
    semantic_checkpoint: Path,
    semantic_encoder: Encoder,
    reference: IndexState,
) -> None:
    settings = _settings(tmp_path, semantic_checkpoint, engine="ray", ray_address=cluster.address)
    report = _index(settings, corpus, semantic_encoder)
    assert report.engine == "ray" and report.encoders == 1
    assert report.encoded == 24 and len(report.failed) == 14
    assert len(report.shards_written) == 2  # shard_size 16: committed in two transactions
    state = _state(settings, corpus, semantic_encoder)
    assert {row[2] for row in state.rows.values()} >= {"truncated", "too_large", "not_an_image"}
    _assert_same(state, reference)


def test_a_worker_killed_mid_job_costs_a_retry(
    tmp_path: Path,
    cluster: Cluster,
    corpus: Path,
    semantic_checkpoint: Path,
    semantic_encoder: Encoder,
    reference: IndexState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The encode actor SIGKILLs itself on its first batch, once: Ray restarts it and retries.
    marker = tmp_path / "killed-once"
    monkeypatch.setenv("CLIPSEARCH_CRASH_AT", "ray_encode")
    monkeypatch.setenv("CLIPSEARCH_CRASH_ONCE", str(marker))
    settings = _settings(tmp_path, semantic_checkpoint, engine="ray", ray_address=cluster.address)
    report = _index(settings, corpus, semantic_encoder)
    assert marker.exists(), "the worker was never killed"
    assert report.encoded == 24
    _assert_same(_state(settings, corpus, semantic_encoder), reference)


def test_an_actor_that_dies_loading_the_model_is_a_clear_error(
    tmp_path: Path,
    cluster: Cluster,
    corpus: Path,
    semantic_checkpoint: Path,
    semantic_encoder: Encoder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SIGKILL while loading, every time, as the kernel's OOM killer does on a node too small.
    monkeypatch.setenv("CLIPSEARCH_CRASH_AT", "ray_encoder_load")
    settings = _settings(tmp_path, semantic_checkpoint, engine="ray", ray_address=cluster.address)
    with pytest.raises(ClusterError, match="encode actors could not start") as caught:
        _index(settings, corpus, semantic_encoder)
    assert caught.value.reason == "worker_failed"
    _committed_nothing(settings)


def test_a_rerun_after_the_driver_was_killed_ends_as_a_clean_run(
    tmp_path: Path,
    cluster: Cluster,
    corpus: Path,
    semantic_checkpoint: Path,
    semantic_encoder: Encoder,
    reference: IndexState,
) -> None:
    settings = _settings(tmp_path, semantic_checkpoint)
    args = ("index", str(corpus), "--engine", "ray", "--ray-address", cluster.address)
    env = {"CLIPSEARCH_SHARD_SIZE": "16", "CLIPSEARCH_LABEL_ON_INDEX": "false"}
    killed = run_cli_process(settings, *args, env={**env, "CLIPSEARCH_CRASH_AT": "after_commit"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    catalog = Catalog(settings.resolved_database_url)
    try:
        assert 0 < catalog.counts().get("active", 0) < 24, "killed after its first shard"
    finally:
        catalog.dispose()
    # The re-run (here, in this process: the same job the command runs) finishes the rest.
    ray_settings = settings.model_copy(update={"engine": "ray", "ray_address": cluster.address})
    report = _index(ray_settings, corpus, semantic_encoder)
    assert report.engine == "ray" and 0 < report.encoded < 24
    state = _state(settings, corpus, semantic_encoder)
    _assert_same(state, reference, same_ids=False)
    assert len({row[0] for row in state.rows.values()}) == len(state.rows)  # no duplicate
    catalog = Catalog(settings.resolved_database_url)
    try:  # no orphan: every shard on disk is one the catalog committed
        committed = {shard.id for shard in catalog.shards()}
    finally:
        catalog.dispose()
    assert set(list_shard_dirs(settings.resolved_index_dir)) == committed


def test_another_model_on_a_worker_is_refused(
    tmp_path: Path, cluster: Cluster, corpus: Path, semantic_checkpoint: Path
) -> None:
    # The driver loads the checkpoint; then the file at that path changes, as when one node
    # holds another file at the same path. The workers load the changed one.
    weights = tmp_path / "model.pt"
    shutil.copy(semantic_checkpoint, weights)
    settings = _settings(tmp_path, weights, engine="ray", ray_address=cluster.address)

    def load_then_swap() -> Encoder:
        encoder = encoder_from_settings(settings)
        checkpoint = torch.load(weights, map_location="cpu", weights_only=False)
        state = checkpoint.get("state_dict", checkpoint)
        first = next(key for key, value in state.items() if value.is_floating_point())
        state[first] = state[first] + 0.01
        torch.save(checkpoint, weights)
        return encoder

    catalog = Catalog(settings.resolved_database_url)
    try:
        with pytest.raises(MixedModels, match="every node must hold the same weights"):
            IndexJob(settings, catalog, load_then_swap, progress=False).run([corpus])
    finally:
        catalog.dispose()
    _committed_nothing(settings)


def test_a_model_no_worker_can_hold_is_refused(
    tmp_path: Path, cluster: Cluster, corpus: Path
) -> None:
    # 64M parameters (a wide text tower): 0.25 GiB of weights, more than the node offers.
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "clipsearch-wide.json").write_text(
        json.dumps(
            {
                "embed_dim": 64,
                "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16},
                "text_cfg": {
                    "context_length": 16,
                    "vocab_size": 49408,
                    "width": 1024,
                    "heads": 8,
                    "layers": 1,
                },
            }
        )
    )
    settings = load_settings(
        data_dir=tmp_path,
        model="clipsearch-wide",
        pretrained="none",
        model_config_dir=configs,
        device="cpu",
        engine="ray",
        ray_address=cluster.address,
    )
    encoder = encoder_from_settings(settings)
    with pytest.raises(ClusterError, match="no Ray worker has the memory") as caught:
        _index(settings, corpus, encoder)
    assert caught.value.reason == "model_too_large"
    _committed_nothing(settings)


def test_workers_that_cannot_see_the_index_dir_are_refused(
    cluster: Cluster, corpus: Path, semantic_checkpoint: Path, semantic_encoder: Encoder
) -> None:
    if cluster.hidden is None:
        pytest.skip("needs a private mount namespace (unshare -m) to hide a folder from Ray")
    base = cluster.hidden / "state"
    settings = _settings(base, semantic_checkpoint, engine="ray", ray_address=cluster.address)
    with pytest.raises(ClusterError, match="cannot read the index dir") as caught:
        _index(settings, corpus, semantic_encoder)
    assert caught.value.reason == "cannot_see"
    assert "same paths on every node" in str(caught.value)
    _committed_nothing(settings)
    assert not list(settings.resolved_index_dir.glob(".cluster-probe-*")), "probe left behind"


def test_an_unreachable_cluster_is_refused_in_seconds(
    tmp_path: Path, corpus: Path, semantic_checkpoint: Path, semantic_encoder: Encoder
) -> None:
    settings = _settings(tmp_path, semantic_checkpoint, engine="ray", ray_address="127.0.0.1:1")
    started = time.monotonic()
    with pytest.raises(ClusterError, match="no Ray cluster answers at 127.0.0.1:1") as caught:
        _index(settings, corpus, semantic_encoder)
    assert caught.value.reason == "unreachable"
    assert time.monotonic() - started < 60  # the scan and hashing included; Ray alone: minutes
    _committed_nothing(settings)


def test_a_port_that_is_not_a_ray_head_is_refused_in_seconds(
    tmp_path: Path, corpus: Path, semantic_checkpoint: Path, semantic_encoder: Encoder
) -> None:
    # Something else listens there (an SSH server, say): ray.init would retry for minutes.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def greet() -> None:
            connection, _ = server.accept()
            with connection:
                connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

        greeter = threading.Thread(target=greet, daemon=True)
        greeter.start()
        address = f"127.0.0.1:{port}"
        settings = _settings(tmp_path, semantic_checkpoint, engine="ray", ray_address=address)
        with pytest.raises(ClusterError, match="answers, but not as a Ray cluster's head"):
            _index(settings, corpus, semantic_encoder)
        greeter.join(timeout=10)
    _committed_nothing(settings)


def test_ray_missing_names_the_extra(
    tmp_path: Path,
    semantic_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    settings = _settings(tmp_path / "data", semantic_checkpoint)
    monkeypatch.setenv("CLIPSEARCH_DATA_DIR", str(settings.data_dir))
    photos = tmp_path / "photos"
    generate_shapes(photos, 2, seed=1)
    code, out, err = run_cli(["index", str(photos), "--engine", "ray"], capsys, monkeypatch)
    assert code == 2, out + err
    assert "pip install 'clipsearch[ray]'" in err and "CLIPSEARCH_ENGINE" in err
    assert "Traceback" not in err
    assert not settings.data_dir.exists(), "refused before the catalog was created"
    with pytest.raises(ConfigError, match=r"clipsearch\[ray\]"):
        engine_for(settings.model_copy(update={"engine": "ray"}))
