"""The Ray engine: Ray Data decodes in CPU tasks and encodes on an actor pool, one model each.

The driver (`IndexJob`) keeps the lock, the scan and diff, the ids and every commit; this only
turns its list of files into blocks of (position, vector, decode meta or failure), in input
order. Before the driver commits anything, `start` checks that the cluster answers, that a
worker on every node sees the index dir and a sample of the files, and that a node has the
memory for the model; every actor then loads the model through the settings' own factory and
refuses to start when its identity differs from the driver's. A worker or node that dies
mid-job costs a retry (Ray Data retries the task, Ray restarts the actor): the commit point
stays the driver's catalog transaction, so nothing is lost or committed twice.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import secrets
import socket
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.crash import CRASH_ENV, CRASH_ONCE_ENV, crash_point
from indexer.decode import DecodedMeta, DecodeFailure, decode_for_model
from indexer.engines.base import EncodedBatch, Engine
from retrieval import errors
from retrieval.errors import ClipsearchError, ClusterError, ConfigError, MixedModels

if TYPE_CHECKING:
    from retrieval.config import Settings
    from retrieval.models.encoder import Encoder

log = logging.getLogger(__name__)

RAY_EXTRA = "pip install 'clipsearch[ray]'"
ADDRESS_SETTING = "CLIPSEARCH_RAY_ADDRESS"
CONNECT_TIMEOUT_S = 5.0  # the TCP check of a cluster address: fail in seconds, not minutes
ANSWER_TIMEOUT_S = 120.0  # the per-node checks (a busy cluster may queue them a while)
ACTOR_START_TIMEOUT_S = 600  # every encode actor must have loaded its model by then
ACTOR_RESTARTS = 3  # a dead actor is restarted (its batch retried) at most this often
# What one encode actor holds besides its model: a Ray worker with torch imported and a
# batch in flight (Ray Data measured 0.56 GiB for the tiny test model on CPU; rounded up).
ACTOR_OVERHEAD_BYTES = 768 * 1024**2
GPU_MARGIN_BYTES = 1024**3  # activations of a batch and CUDA's own context
SAMPLE_FILES = 16  # files each node stats before the job
GIB = 1024**3


def import_ray() -> ModuleType:
    """The ray module with Ray Data; ConfigError naming the extra when it is not installed."""
    try:
        import ray
        import ray.data  # noqa: F401 - the engine needs Ray Data, not only Ray Core
    except ImportError as exc:
        raise ConfigError(
            "CLIPSEARCH_ENGINE",
            f"the ray engine needs Ray Data, which is not installed ({exc}); install it with "
            f"{RAY_EXTRA}, or use CLIPSEARCH_ENGINE=local",
        ) from None
    return ray


def head_endpoint(address: str) -> tuple[str, int] | None:
    """The TCP endpoint a cluster address names (host:port, ray://host:port); None for `auto`
    and the empty address (a cluster on this machine)."""
    text = address.strip()
    if text in ("", "auto", "local"):
        return None
    default_port = 6379  # the head's GCS port, as `ray start --head` opens it
    if text.startswith("ray://"):
        text, default_port = text.removeprefix("ray://"), 10001  # Ray Client's port
    text = text.split("/", 1)[0]
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    host = host.strip("[]") or text
    try:
        return host, int(port) if port else default_port
    except ValueError:
        raise ConfigError(
            ADDRESS_SETTING, f"{address!r} is not host:port or ray://host:port"
        ) from None


def check_reachable(
    address: str, setting: str = ADDRESS_SETTING, timeout: float = CONNECT_TIMEOUT_S
) -> None:
    """ClusterError within `timeout` seconds when nothing listens at the cluster address
    (connecting with Ray itself would retry for minutes); `setting` names where it was set."""
    endpoint = head_endpoint(address)
    if endpoint is None:
        return
    try:
        speaks_grpc = _speaks_grpc(endpoint, timeout)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ClusterError(
            "unreachable",
            f"no Ray cluster answers at {address} ({setting}): {reason}. Start one "
            "(ray start --head) or fix the address; leave it empty to start a cluster on "
            "this machine for the job",
        ) from None
    if not speaks_grpc:
        raise ClusterError(
            "unreachable",
            f"{address} ({setting}) answers, but not as a Ray cluster's head: give the port "
            "`ray start --head` printed (6379 unless changed), or ray://host:10001 for Ray "
            "Client",
        )


# HTTP/2's client preface and an empty SETTINGS frame: a gRPC server (the head's GCS, Ray
# Client) answers with a SETTINGS frame of its own.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_SETTINGS_FRAME = 0x04


def _speaks_grpc(endpoint: tuple[str, int], timeout: float) -> bool:
    """Whether the server at `endpoint` answers the HTTP/2 preface as gRPC servers do (a port
    that something else holds, Postgres say, would hang ray.init for minutes)."""
    with socket.create_connection(endpoint, timeout=timeout) as connection:
        connection.settimeout(timeout)
        connection.sendall(_HTTP2_PREFACE)
        head = b""
        try:
            while len(head) < 9:
                chunk = connection.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
        except TimeoutError:
            return False
    return len(head) == 9 and head[3] == _SETTINGS_FRAME


def local_cluster_options() -> dict[str, Any]:
    """ray.init options of a cluster started for one job on this machine: every core, a
    bounded object store (in /dev/shm: decoded batches stream through it, a few hundred MiB
    is plenty), no dashboard."""
    cpus = os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    store = min(2 * GIB, memory // 10)
    try:
        # Ray falls back to /tmp (slower) when /dev/shm cannot hold the store: stay inside it.
        shm = os.statvfs("/dev/shm")
        store = min(store, shm.f_bavail * shm.f_frsize // 2)
    except OSError:
        pass
    return {
        "num_cpus": cpus,
        "object_store_memory": max(store, 128 * 1024**2),
        "include_dashboard": False,
    }


def _fault_env() -> dict[str, str]:
    """The crash-safety tests' fault injection, passed on to the cluster's workers."""
    return {name: os.environ[name] for name in (CRASH_ENV, CRASH_ONCE_ENV) if name in os.environ}


@dataclass(frozen=True)
class NodeView:
    """What a worker on one node saw: problems reading the index dir or the files, and the
    memory of its first GPU (0 where it has none)."""

    node: str
    problems: list[str]
    gpu_memory: int = 0


def look_from_node(probe: str, token: str, sample: list[str], gpus: int) -> NodeView:
    """Run on each node: is the probe file the driver wrote there with its token, can every
    sampled file be read, and how much memory has the GPU."""
    import ray

    problems = []
    try:
        seen = Path(probe).read_text()
    except OSError as exc:
        problems.append(f"the index dir {Path(probe).parent} ({exc.strerror or exc})")
    else:
        if seen != token:
            problems.append(f"the index dir {Path(probe).parent} (another directory is there)")
    unreadable = [path for path in sample if not os.access(path, os.R_OK)]
    if unreadable:
        more = f" and {len(unreadable) - 1} more of {len(sample)} sampled" if unreadable[1:] else ""
        problems.append(f"the image file {unreadable[0]}{more}")
    gpu_memory = 0
    if gpus:
        import torch

        if torch.cuda.is_available():
            gpu_memory = min(
                torch.cuda.get_device_properties(n).total_memory
                for n in range(torch.cuda.device_count())
            )
    return NodeView(ray.util.get_node_ip_address(), problems, gpu_memory)


def sample_paths(paths: Sequence[str], count: int = SAMPLE_FILES) -> list[str]:
    """Up to `count` paths spread evenly over the list, first and last included."""
    if len(paths) <= count:
        return list(paths)
    step = (len(paths) - 1) / (count - 1)
    return [paths[round(n * step)] for n in range(count)]


def model_bytes(encoder: Encoder) -> int:
    """The bytes of the model's weights as loaded here (parameters and buffers)."""
    model = encoder.model
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class ActorPlan:
    """The encode actor pool: how many, and what each reserves and uses."""

    actors: int
    num_cpus: float
    num_gpus: float
    memory: int  # host memory each actor reserves (Ray's `memory` resource)
    threads: int  # torch threads of a CPU actor (0: torch's default)


def plan_actors(
    nodes: list[dict[str, Any]],
    gpu_memory: dict[str, int],
    weights: int,
    *,
    use_gpus: bool,
    half_precision: bool,
) -> ActorPlan:
    """One actor per GPU where GPUs exist; else per node a few CPU actors with half its cores
    (the other half decodes). An actor only goes where its memory fits; ClusterError
    (model_too_large) when it fits nowhere."""
    host_need = 2 * weights + ACTOR_OVERHEAD_BYTES  # the checkpoint read, and the model
    gpu_need = (weights // 2 if half_precision else weights) + GPU_MARGIN_BYTES
    if use_gpus:
        count = 0
        for node in nodes:
            resources = node["Resources"]
            gpus = int(resources.get("GPU", 0))
            if gpus and gpu_memory.get(node["NodeID"], 0) >= gpu_need:
                count += min(gpus, int(resources.get("memory", 0) // host_need))
        if count:
            return ActorPlan(count, 1, 1, host_need, 0)
        largest = max(gpu_memory.values(), default=0)
        raise ClusterError(
            "model_too_large",
            f"no Ray worker can hold the model: it needs about {gpu_need / GIB:.1f} GiB of "
            f"GPU memory and {host_need / GIB:.1f} GiB of memory per encode actor; the "
            f"largest GPU has {largest / GIB:.1f} GiB. Use a smaller model, or nodes with "
            "larger GPUs",
        )
    cpu_nodes = [node for node in nodes if node["Resources"].get("CPU", 0) >= 1]
    smallest = min((int(node["Resources"]["CPU"]) for node in cpu_nodes), default=1)
    # torch scales poorly past ~8 threads: big nodes get several actors rather than one.
    actor_cpus = min(8, max(1, smallest // 2))
    count = 0
    for node in cpu_nodes:
        by_cpu = max(1, int(node["Resources"]["CPU"]) // 2 // actor_cpus)
        count += min(by_cpu, int(node["Resources"].get("memory", 0) // host_need))
    if count:
        # Each actor reserves half its share of cores and computes on all of it: decoding
        # tasks run on the other half, and the two overlap as the local engine's do.
        return ActorPlan(count, actor_cpus, 0, host_need, 2 * actor_cpus)
    largest = max((node["Resources"].get("memory", 0) for node in cpu_nodes), default=0)
    raise ClusterError(
        "model_too_large",
        f"no Ray worker has the memory for the model: an encode actor needs about "
        f"{host_need / GIB:.1f} GiB ({weights / GIB:.2f} GiB of weights, loaded once from the "
        f"checkpoint), the largest node offers {largest / GIB:.1f} GiB to Ray's workers. Use a "
        "smaller model, or larger nodes",
    )


def decode_batch(batch: dict[str, np.ndarray], **options: Any) -> dict[str, np.ndarray]:
    """A Ray Data CPU task over rows that each hold one encode batch of the local engine (its
    positions and paths): each becomes one row holding that batch decoded (pickled). So every
    actor encodes exactly the batches the local engine encodes (the same float32 sums, the same
    float16 vectors stored), whatever blocks Ray Data cuts the dataset into."""
    groups = [
        pickle.dumps(_decode_paths(np.asarray(index, np.int64), list(path), **options), protocol=5)
        for index, path in zip(batch["index"], batch["path"], strict=True)
    ]
    return {"group": np.array(groups, dtype=object)}


def _decode_paths(
    indices: np.ndarray,
    paths: list[str],
    *,
    preprocess: Any,
    shape: tuple[int, ...],
    max_pixels: int,
    min_side: int | None,
    max_bytes: int | None,
) -> dict[str, np.ndarray]:
    """Decode and preprocess each path as the local engine does (the same function, so a bad
    file fails with the same reason); a failed file keeps a zero tensor."""
    count = len(paths)
    pixels = np.zeros((count, *shape), dtype=np.float32)
    ok = np.zeros(count, dtype=bool)
    metas = []
    for n, path in enumerate(paths):
        tensor, meta = decode_for_model(
            str(path), preprocess, max_pixels=max_pixels, min_side=min_side, max_bytes=max_bytes
        )
        if tensor is not None:
            pixels[n] = tensor.numpy()
            ok[n] = True
        metas.append(pickle.dumps(meta))
    # object: a bytes dtype would drop the pickles' trailing NUL bytes.
    return {"index": indices, "pixels": pixels, "ok": ok, "meta": np.array(metas, object)}


class EncodeActor:
    """One model on one worker (a GPU where it has one), loaded by the settings' factory."""

    def __init__(self, settings: Settings, driver_key: str, driver_model: str) -> None:
        import ray

        from retrieval.models.encoder import encoder_from_settings

        crash_point("ray_encoder_load")
        self.encoder = encoder_from_settings(settings)
        identity = self.encoder.identity
        if identity.key != driver_key:
            where = f"node {ray.util.get_node_ip_address()}"
            raise MixedModels(identity.describe(), driver_model, where)
        self.key = identity.key

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each row is one decoded encode batch; its images come out one row each."""
        crash_point("ray_encode")
        parts = [self._encode(pickle.loads(raw)) for raw in batch["group"]]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def _encode(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ok = batch["ok"]
        vectors = np.zeros((len(ok), self.encoder.dim), dtype=np.float32)
        if ok.any():
            vectors[ok] = self.encoder.encode_image_tensors(torch.from_numpy(batch["pixels"][ok]))
        return {
            "index": batch["index"],
            "ok": ok,
            "vector": vectors,
            "meta": batch["meta"],
            "model": np.array([self.key] * len(ok)),
        }


_REMOTE_ERROR = re.compile(r"^(retrieval\.errors\.(\w+)): (.+)$", re.MULTILINE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _domain_error(exc: BaseException) -> ClipsearchError | None:
    """The clipsearch error a worker raised, inside Ray's wrappers: the exception itself where
    Ray kept it (a task's cause), else rebuilt from its traceback text (an actor that failed
    to start keeps only that), so that it keeps its class and exit code."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ClipsearchError):
            return current
        inner = getattr(current, "cause", None)
        current = inner if isinstance(inner, BaseException) else current.__cause__
    found = _REMOTE_ERROR.findall(_ANSI.sub("", str(exc)))
    if not found:
        return None
    _, name, message = found[-1]
    kind = getattr(errors, name, None)
    if not (isinstance(kind, type) and issubclass(kind, ClipsearchError)):
        return None
    rebuilt = kind.__new__(kind)
    rebuilt.args = (message,)
    return rebuilt


class RayEngine(Engine):
    name = "ray"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ray = import_ray()
        self.encoders = 0
        self._connected = False
        self._job: dict[str, Any] = {}

    def start(self, encoder: Encoder, paths: Sequence[str], index_dir: Path) -> None:
        started = time.monotonic()
        self._connect()
        log.info("ray engine: connected in %.1f s", time.monotonic() - started)
        try:
            nodes = self._worker_nodes()
            views = self._look_from_nodes(nodes, paths, index_dir)
            log.info("ray engine: nodes checked in %.1f s", time.monotonic() - started)
            use_gpus = self.settings.device != "cpu" and any(
                node["Resources"].get("GPU", 0) for node in nodes
            )
            plan = plan_actors(
                nodes,
                {node_id: view.gpu_memory for node_id, view in views.items()},
                model_bytes(encoder),
                use_gpus=use_gpus,
                half_precision=self.settings.precision in ("auto", "fp16", "bf16"),
            )
        except BaseException:
            self.close()
            raise
        self.encoders = plan.actors
        identity = encoder.identity
        size = identity.image_size
        from PIL import Image

        shape = tuple(encoder.preprocess(Image.new("RGB", (size, size))).shape)
        self._job = {
            "paths": list(paths),
            "plan": plan,
            "identity": identity,
            "preprocess": encoder.preprocess,
            "shape": shape,
        }
        log.info("ray engine: %d encode actors (%s)", plan.actors, plan)

    def _connect(self) -> None:
        ray = self.ray
        address = self.settings.ray_address.strip()
        check_reachable(address)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from a job
        # The driver's own Ray core logs warnings meant for Ray's developers on stderr.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        options: dict[str, Any] = {
            "logging_level": logging.ERROR,
            "log_to_driver": False,
            "namespace": "clipsearch",
        }
        if _fault_env():
            options["runtime_env"] = {"env_vars": _fault_env()}
        if address:
            options["address"] = address
        else:
            # "local": a new cluster for this job, never one a `ray start` left running here
            # (ray.init with no address would join that one).
            options.update(address="local", **local_cluster_options())
        try:
            ray.init(**options)
        except (ConnectionError, TimeoutError, RuntimeError) as exc:
            raise ClusterError(
                "unreachable",
                f"cannot join the Ray cluster at {address or 'this machine'} "
                f"({ADDRESS_SETTING}): {exc}",
            ) from None
        self._connected = True
        from ray.data import DataContext

        context = DataContext.get_current()
        context.execution_options.preserve_order = True  # deterministic shards, as local
        context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S  # all models loaded, or fail
        context.enable_progress_bars = False  # the index job draws its own
        context.print_on_execution_start = False
        context.issue_detectors_config.detectors = []  # advice for Ray users, not ours
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)

    def _worker_nodes(self) -> list[dict[str, Any]]:
        nodes = [
            node
            for node in self.ray.nodes()
            if node.get("Alive")
            and (node["Resources"].get("CPU", 0) >= 1 or node["Resources"].get("GPU", 0))
        ]
        if not nodes:
            raise ClusterError("worker_failed", "the Ray cluster has no node with a CPU or GPU")
        return nodes

    def _look_from_nodes(
        self, nodes: list[dict[str, Any]], paths: Sequence[str], index_dir: Path
    ) -> dict[str, NodeView]:
        """Every node's view of the index dir and a sample of the files; ClusterError
        (cannot_see) naming the first node that misses something."""
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token = secrets.token_hex(16)
        probe = index_dir.resolve() / f".cluster-probe-{token[:8]}"
        probe.write_text(token)
        sample = sample_paths([str(Path(p).absolute()) for p in paths])
        look = ray.remote(look_from_node)
        try:
            pending = {
                node["NodeID"]: look.options(
                    num_cpus=0,
                    num_gpus=1 if node["Resources"].get("GPU", 0) else 0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
                ).remote(str(probe), token, sample, int(node["Resources"].get("GPU", 0)))
                for node in nodes
            }
            try:
                views: dict[str, NodeView] = dict(
                    zip(
                        pending,
                        ray.get(list(pending.values()), timeout=ANSWER_TIMEOUT_S),
                        strict=True,
                    )
                )
            except ray.exceptions.GetTimeoutError:
                raise ClusterError(
                    "worker_failed",
                    f"the Ray cluster's nodes did not answer a check within "
                    f"{ANSWER_TIMEOUT_S:.0f} s (a full cluster?)",
                ) from None
        finally:
            probe.unlink(missing_ok=True)
        for view in views.values():
            if view.problems:
                raise ClusterError(
                    "cannot_see",
                    f"the Ray workers on node {view.node} cannot read "
                    f"{'; nor '.join(view.problems)}. A multi-node cluster must share the image "
                    "folders and the index dir at the same paths on every node",
                )
        return views

    def batches(self) -> Iterator[EncodedBatch]:
        job = self._job
        assert job, "start() first"
        ray = self.ray
        settings = self.settings
        plan: ActorPlan = job["plan"]
        identity = job["identity"]
        paths: list[str] = job["paths"]
        batch_size = settings.batch_size
        # One row per encode batch of the local engine (see decode_batch).
        items = [
            {
                "index": list(range(first, min(first + batch_size, len(paths)))),
                "path": paths[first : first + batch_size],
            }
            for first in range(0, len(paths), batch_size)
        ]
        dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 1000)))
        dataset = dataset.map_batches(
            decode_batch,
            fn_kwargs={
                "preprocess": job["preprocess"],
                "shape": job["shape"],
                "max_pixels": settings.max_image_pixels,
                "min_side": identity.image_size if settings.jpeg_draft else None,
                "max_bytes": settings.max_decode_bytes,
            },
            batch_size=1,  # a row is a whole encode batch
            batch_format="numpy",
            num_cpus=1,
        )
        actor_settings = settings.model_copy(update={"torch_threads": plan.threads})
        with warnings.catch_warnings():
            # Ray 2.60 takes max_restarts only among the remote args it deprecates for 2.64.
            warnings.simplefilter("ignore", DeprecationWarning)
            dataset = dataset.map_batches(
                EncodeActor,
                fn_constructor_kwargs={
                    "settings": actor_settings,
                    "driver_key": identity.key,
                    "driver_model": identity.describe(),
                },
                batch_size=1,  # one decoded encode batch per call
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=plan.actors),
                num_cpus=plan.num_cpus,
                num_gpus=plan.num_gpus or None,
                memory=plan.memory,
                # Bounded (Ray Data's default is forever): an actor that dies on every batch
                # (out of memory on each) fails the job instead of hanging it.
                max_restarts=ACTOR_RESTARTS,
                max_task_retries=ACTOR_RESTARTS,
            )
        received = False
        try:
            for block in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                received = True
                yield self._results(block, identity)
        except ClipsearchError:
            raise
        except Exception as exc:
            raise self._job_failed(exc, started=received) from None

    def _results(self, block: dict[str, np.ndarray], identity: Any) -> EncodedBatch:
        keys = set(block["model"].tolist())
        if keys - {identity.key}:  # the actors check this as they start; checked again here
            raise MixedModels(", ".join(sorted(keys)), identity.describe(), "the Ray cluster")
        indices: list[int] = []
        rows: list[int] = []
        metas: list[DecodedMeta] = []
        failures: list[tuple[int, DecodeFailure]] = []
        for row, (index, ok, raw) in enumerate(
            zip(block["index"].tolist(), block["ok"].tolist(), block["meta"], strict=True)
        ):
            meta = pickle.loads(raw)
            if ok:
                indices.append(index)
                rows.append(row)
                metas.append(meta)
            else:
                failures.append((index, meta))
        vectors = np.ascontiguousarray(block["vector"][rows], dtype=np.float32)
        return EncodedBatch(indices, vectors, metas, failures)

    def _job_failed(self, exc: Exception, *, started: bool) -> ClipsearchError:
        """A Ray failure as the clipsearch error it is: one a worker raised (another model,
        weights missing on a node), or workers that could not start or kept dying."""
        domain = _domain_error(exc)
        if domain is not None:
            return domain
        text = _ANSI.sub("", str(exc)).strip()
        detail = f"{type(exc).__name__}: {text.splitlines()[0] if text else 'no detail'}"
        if not started:
            return ClusterError(
                "worker_failed",
                f"the Ray encode actors could not start ({detail}): an actor that dies while "
                "loading the model is most often out of memory (see `ray status` and the "
                "workers' logs). Nothing was committed",
            )
        return ClusterError(
            "worker_failed",
            f"the Ray workers kept failing after {ACTOR_RESTARTS} restarts ({detail}). The "
            "shards committed so far are kept: run the same command again to index the rest",
        )

    def close(self) -> None:
        if self._connected:
            self._connected = False
            self._job = {}
            self.ray.shutdown()
