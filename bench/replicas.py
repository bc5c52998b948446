"""Serving replicas: query throughput of 1 and 2 `clipsearch serve` processes behind a
round-robin load balancer, all reading one index dir and one Postgres catalog.

ViT-B-32 with random weights (pretrained="none"), 50k synthetic vectors in one shard (HNSW, as
the indexer would build it) with their catalog rows in a fresh Postgres database
(BENCH_PG_ADMIN_URL, default the local server's `test` database, is used to create and drop
it). The load balancer is a small asyncio TCP proxy (a new connection goes to the next
replica, as nginx's `stream` or HAProxy's `mode tcp` do), run in its own process; its own
ceiling is measured against a trivial HTTP endpoint. A closed-loop client keeps
BENCH_CONCURRENCY (16) kept-alive connections busy with POST /search/text (query cache off, each
query different) for BENCH_SECONDS per repetition; the figures are medians of BENCH_REPEATS (3).

Configurations: one replica reached directly; one replica behind the proxy; two behind the
proxy (one torch thread each); and the same two with each replica pinned to its own core
against one replica pinned to one core (taskset), which is the N-cores-for-N-replicas case.
For each: QPS, latency p50/p99, CPU seconds per query of the replicas, the proxy, the client and
the Postgres backends serving this database, and the database connections held.

The database side is also counted in-process: statements and milliseconds per generation poll
(what every replica runs each CLIPSEARCH_RELOAD_INTERVAL_SECONDS) and per search (the hits'
catalog rows), so the load N replicas put on Postgres can be extrapolated.

Prints ONE JSON line. Usage: python bench/replicas.py
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.scratch_postgres import admin, scratch_database  # noqa: E402
from bench.served_corpus import build_served_corpus, query_text  # noqa: E402

MODEL = "ViT-B-32"
VECTORS = int(os.environ.get("BENCH_VECTORS", "50000"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "16"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "6"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
DB_NAME = "clipsearch_bench_replicas"
TICK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process (and its reaped children are not counted)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


# --- the load balancer and the trivial endpoint (each run as its own process) ---------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _proxy(port: int, backends: Sequence[tuple[str, int]]) -> None:
    """Round-robin TCP proxy: each new client connection goes to the next backend."""
    turn = itertools.cycle(backends)

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, backend_port = next(turn)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, backend_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(accept, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


async def _trivial(port: int) -> None:
    """HTTP/1.1 keep-alive endpoint answering every request with a small fixed JSON body."""
    body = b'{"ok":true}'
    answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(_content_length(head))
                writer.write(answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@contextmanager
def _subprocess(args: Sequence[str], env: dict[str, str] | None = None) -> Iterator[int]:
    proc = subprocess.Popen(
        list(args),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_port(port: int, path: str = "", timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if path:
                if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).status_code == 200:
                    return
            else:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
        except (OSError, httpx.TransportError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing ready on port {port}")
        time.sleep(0.3)


@contextmanager
def _helper(mode: str, port: int, backends: Sequence[int] = ()) -> Iterator[int]:
    spec = ",".join(str(p) for p in backends)
    args = [sys.executable, str(Path(__file__)), f"--{mode}", str(port)]
    with _subprocess([*args, spec] if backends else args) as pid:
        _wait_port(port)
        yield pid


@contextmanager
def _replicas(env: dict[str, str], cores: Sequence[str | None], threads: int) -> Iterator[Any]:
    """One `clipsearch serve` per entry of `cores` (a CPU list for taskset, or None)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_")}
    full = {**clean, **env, "CLIPSEARCH_TORCH_THREADS": str(threads)}
    with ExitStack() as stack:
        started: list[tuple[int, int]] = []
        for core in cores:
            port = _free_port()
            serve = [sys.executable, "-m", "indexer", "serve", "--host", "127.0.0.1"]
            pin = ["taskset", "-c", core] if core is not None else []
            pid = stack.enter_context(_subprocess([*pin, *serve, "--port", str(port)], full))
            started.append((port, pid))
        for port, _ in started:
            _wait_port(port, "/ready")
        yield started


# --- the client -----------------------------------------------------------------------------


async def _connection(
    port: int, stop_at: float, offset: int, path: str, latencies: list[float], bad: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    try:
        while time.perf_counter() < stop_at:
            body = json.dumps({"query": query_text(offset + i), "k": 10}).encode()
            i += 1
            request = (
                f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n"
            ).encode() + body
            started = time.perf_counter()
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(_content_length(head))
            latencies.append((time.perf_counter() - started) * 1000)
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                bad.append(status)
    finally:
        writer.close()


def _load(port: int, seconds: float, offset: int, path: str = "/search/text") -> dict[str, Any]:
    latencies: list[float] = []
    bad: list[int] = []

    async def run() -> float:
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(
            *(
                _connection(port, stop_at, offset + c * 100_000, path, latencies, bad)
                for c in range(CONCURRENCY)
            )
        )
        return time.perf_counter() - started

    cpu = time.process_time()
    wall = asyncio.run(run())
    arr = np.array(latencies)
    return {
        "qps": len(latencies) / wall,
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "requests": len(latencies),
        "errors": len(bad),
        "client_cpu_s": time.process_time() - cpu,
    }


# --- Postgres -------------------------------------------------------------------------------


def _db_backends() -> list[int]:
    with admin() as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (DB_NAME,)
        ).fetchall()
    return [int(r[0]) for r in rows]


def _db_stats() -> dict[str, int]:
    with admin() as conn:
        row = conn.execute(
            "SELECT numbackends, xact_commit + xact_rollback, tup_returned + tup_fetched "
            "FROM pg_stat_database WHERE datname = %s",
            (DB_NAME,),
        ).fetchone()
    assert row is not None
    return {"backends": int(row[0]), "xacts": int(row[1]), "tuples": int(row[2])}


def _catalog_costs(url: str, index_dir: Path) -> dict[str, Any]:
    """Statements, transactions (what Postgres counts, pool pings included) and milliseconds
    per poll that finds no new generation, per search without the encoder (its hits' rows and
    labels), and per lookup of 10 hits' rows: one replica's load on the database."""
    from sqlalchemy import event

    from retrieval.catalog.database import Catalog
    from retrieval.search import Searcher

    rng = np.random.default_rng(7)

    def measure(action: str, reps: int) -> dict[str, float]:
        catalog = Catalog(url)
        searcher = Searcher(catalog, index_dir, None)
        searcher.refresh(force=True)
        dim = searcher.snapshot().shards.dim
        vectors = rng.standard_normal((reps, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        statements = [0]

        def count(*_: object) -> None:
            statements[0] += 1

        event.listen(catalog.engine, "before_cursor_execute", count)
        catalog.engine.dispose()  # the counts below start from a fresh pool
        time.sleep(0.5)
        before, times = _db_stats()["xacts"], []
        for i in range(reps):
            t = time.perf_counter()
            if action == "poll":
                searcher.refresh()
            elif action == "search":
                searcher.search_vector(vectors[i], 10)
            else:
                catalog.records(int(j) for j in rng.integers(1, VECTORS, 10))
            times.append((time.perf_counter() - t) * 1000)
        searcher.close()
        catalog.dispose()  # a closing backend reports its counts at once
        time.sleep(0.5)
        return {
            "statements": statements[0] / reps,
            "xacts": round((_db_stats()["xacts"] - before) / reps, 2),
            "ms_p50": round(float(np.median(times)), 2),
        }

    return {
        "poll": measure("poll", 100),
        "search_without_encoding": measure("search", 100),
        "rows_of_10_hits": measure("rows", 100),
    }


# --- the runs ---------------------------------------------------------------------------------


def _median_runs(
    port: int, pids: dict[str, list[int]], offset: int, path: str = "/search/text"
) -> dict[str, Any]:
    _load(port, 1.0, 900_000_000 + offset, path)  # warm-up (connections, first batches)
    runs = []
    peak_backends = 0
    for rep in range(REPEATS):
        pg_pids = _db_backends() if path == "/search/text" else []
        before = {role: sum(_cpu_seconds(p) for p in ps) for role, ps in pids.items()}
        pg_before = sum(_cpu_seconds(p) for p in pg_pids)
        run = _load(port, SECONDS, offset + rep * 10_000_000, path)
        if path == "/search/text":
            peak_backends = max(peak_backends, _db_stats()["backends"])
            pg_pids_after = _db_backends()
            new = [p for p in pg_pids_after if p not in pg_pids]
            run["postgres_cpu_s"] = (
                sum(_cpu_seconds(p) for p in pg_pids_after) - pg_before
            )  # backends opened during the run started from 0
            run["new_backends"] = len(new)
        for role, ps in pids.items():
            run[f"{role}_cpu_s"] = sum(_cpu_seconds(p) for p in ps) - before[role]
        runs.append(run)
    out: dict[str, Any] = {}
    for key in runs[0]:
        value = float(np.median([r[key] for r in runs]))
        out[key] = round(value, 4 if key.endswith("cpu_s") else 1)
    total = out["requests"]
    for key in [k for k in out if k.endswith("_cpu_s")]:
        out[key.replace("_cpu_s", "_cpu_ms_per_query")] = round(out[key] * 1000 / total, 2)
    if path == "/search/text":
        out["db_connections_peak"] = peak_backends
    out["qps_runs"] = [round(r["qps"], 1) for r in runs]
    return out


def _proxy_ceiling() -> dict[str, Any]:
    trivial = _free_port()
    proxy = _free_port()
    with _helper("trivial", trivial) as backend, _helper("proxy", proxy, [trivial]) as lb:
        direct = _median_runs(trivial, {"backend": [backend]}, 0, "/trivial")
        through = _median_runs(proxy, {"backend": [backend], "proxy": [lb]}, 0, "/trivial")
    return {"trivial_direct": direct, "trivial_via_proxy": through}


def _replica_runs(env: dict[str, str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    plans: list[tuple[str, list[str | None], int, bool]] = [
        ("one_direct", [None], 0, False),
        ("one_via_proxy", [None], 0, True),
        ("two_via_proxy", [None, None], 1, True),
        ("one_pinned_core0_via_proxy", ["0"], 1, True),
        ("two_pinned_core0_core1_via_proxy", ["0", "1"], 1, True),
    ]
    for n, (name, cores, threads, proxied) in enumerate(plans):
        with _replicas(env, cores, threads) as started:
            pids = {"replicas": [pid for _, pid in started]}
            time.sleep(1.0)
            idle_before = _db_stats()
            time.sleep(10.0)  # idle: only the replicas' polls reach the database
            idle_after = _db_stats()
            idle = {
                "xacts_per_s": round((idle_after["xacts"] - idle_before["xacts"]) / 10.0, 2),
                "backends": idle_after["backends"],
            }
            if proxied:
                proxy_port = _free_port()
                with _helper("proxy", proxy_port, [port for port, _ in started]) as lb:
                    run = _median_runs(proxy_port, {**pids, "proxy": [lb]}, n * 1_000_000_000)
            else:
                run = _median_runs(started[0][0], pids, n * 1_000_000_000)
            results[name] = {
                "replicas": len(cores),
                "torch_threads": threads or "default",
                "cores": cores,
                **run,
                "idle_db": idle,
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--proxy", nargs=2, metavar=("PORT", "BACKEND_PORTS"))
    parser.add_argument("--trivial", type=int, metavar="PORT")
    args = parser.parse_args()
    if args.proxy:
        backends = [("127.0.0.1", int(p)) for p in args.proxy[1].split(",")]
        asyncio.run(_proxy(int(args.proxy[0]), backends))
        return
    if args.trivial:
        asyncio.run(_trivial(args.trivial))
        return

    load_start = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, scratch_database(DB_NAME) as url:
        env, kind = build_served_corpus(Path(tmp), MODEL, VECTORS, "auto", database_url=url)
        env.update(
            {
                "CLIPSEARCH_QUERY_CACHE_SIZE": "0",
                "CLIPSEARCH_RELOAD_INTERVAL_SECONDS": "5",  # the default poll
            }
        )
        catalog_costs = _catalog_costs(url, Path(env["CLIPSEARCH_INDEX_DIR"]))
        ceiling = _proxy_ceiling()
        runs = _replica_runs(env)
    one = runs["one_via_proxy"]["qps"]
    pinned_one = runs["one_pinned_core0_via_proxy"]["qps"]
    result = {
        "bench": "replicas",
        "model": f"{MODEL}/none",
        "vectors": VECTORS,
        "index_kind": kind,
        "catalog": "postgres",
        "concurrency": CONCURRENCY,
        "seconds_per_run": SECONDS,
        "repeats": REPEATS,
        "cpu_count": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "proxy_ceiling": ceiling,
        "runs": runs,
        "two_vs_one_qps": round(runs["two_via_proxy"]["qps"] / one, 2),
        "two_vs_one_qps_one_core_each": round(
            runs["two_pinned_core0_core1_via_proxy"]["qps"] / pinned_one, 2
        ),
        "proxy_cost_qps_ratio": round(one / runs["one_direct"]["qps"], 2),
        "catalog_per_replica": catalog_costs,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
