"""Overload and upload memory of a real `clipsearch serve` (uvicorn) with the tiny model.

Memory: concurrent 100-megapixel PNG uploads (RGB and grey) and float TIFFs against the
server's defaults, the peak and settled RSS of the server process against the stated bound
  baseline + CLIPSEARCH_MAX_CONCURRENT_DECODES x (CLIPSEARCH_API_MAX_DECODE_BYTES
           + CLIPSEARCH_MAX_UPLOAD_BYTES) + 64 MiB,
then the same with the decode budget raised to 512 MiB (100 MP RGB is decoded), and with the
limits off (64 decodes at once, a 4 GiB budget) for comparison.

Overload: a burst of 2,000 text searches sent at once (one connection each, no retries), then
100 concurrent clients on kept-alive connections sending 2,000 more (waiting Retry-After when
refused), against the default limits and against a server whose limits are off: the share of
answers that were 503 (429 is never sent), and the latency percentiles of the accepted ones.
Client and server share the machine's cores; the client speaks raw HTTP/1.1 to stay small.
Prints ONE JSON line. Usage: python bench/overload.py [--skip-memory]
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.served_corpus import build_served_corpus, query_text  # noqa: E402
from retrieval.config import Settings, load_settings  # noqa: E402

MODEL = "clipsearch-tiny"
VECTORS = 10_000
MIB = 1024 * 1024
LIMITS_OFF = {
    "CLIPSEARCH_MAX_CONCURRENT_REQUESTS": "10000",
    "CLIPSEARCH_MAX_QUEUED_REQUESTS": "100000",
    "CLIPSEARCH_MAX_CONNECTIONS": "100000",
    "CLIPSEARCH_MICROBATCH_MAX_PENDING": "10000000",
    "CLIPSEARCH_MAX_CONCURRENT_DECODES": "64",
    "CLIPSEARCH_API_MAX_DECODE_BYTES": str(4096 * MIB),
}


def _build_corpus(tmp: Path) -> dict[str, str]:
    env, _ = build_served_corpus(tmp, MODEL, VECTORS, "flat")
    return {
        **env,
        "CLIPSEARCH_RELOAD_INTERVAL_SECONDS": "0",
        "CLIPSEARCH_QUERY_CACHE_SIZE": "0",
    }


@contextmanager
def _server(env: dict[str, str], extra: dict[str, str]) -> Iterator[tuple[str, int]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "indexer", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env={**clean, **env, **extra},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(base + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("server did not become ready")
            time.sleep(0.3)
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# --- memory --------------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _rss_mib(pid: int) -> float:
    return _status_kib(pid, "VmRSS") / 1024


class PeakRss:
    """The server's peak RSS over a block: VmHWM after resetting it, and 5 ms sampling."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.sampled = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRss:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # resets VmHWM
        except OSError:
            pass
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sampled = max(self.sampled, _rss_mib(self.pid))
            time.sleep(0.005)

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.hwm = _status_kib(self.pid, "VmHWM") / 1024

    @property
    def peak(self) -> float:
        return round(max(self.sampled, self.hwm), 1)


def _png(mode: str, side: int) -> bytes:
    row = (np.arange(side, dtype=np.uint32) * 7 % 251).astype(np.uint8)
    grey = Image.fromarray(np.ascontiguousarray(np.broadcast_to(row, (side, side))))
    image = (
        grey
        if mode == "L"
        else Image.merge("RGB", (grey, grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT), grey))
    )
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=1)
    return out.getvalue()


def _float_tiff(side: int) -> bytes:
    values = np.zeros((side, side), np.float32)
    values[::97, ::89] = 0.75
    out = io.BytesIO()
    Image.fromarray(values, "F").save(out, "TIFF", compression="tiff_adobe_deflate")
    return out.getvalue()


def _upload_all(base: str, name: str, data: bytes, copies: int) -> Counter[int]:
    def one(_: int) -> int:
        response = httpx.post(
            base + "/search/image", files={"file": (name, data)}, data={"k": "5"}, timeout=300
        )
        return response.status_code

    with ThreadPoolExecutor(copies) as pool:
        return Counter(pool.map(one, range(copies)))


def _memory_phases(
    base: str, pid: int, files: dict[str, tuple[bytes, int]], settings: Settings
) -> dict[str, Any]:
    time.sleep(1.0)
    baseline = _rss_mib(pid)
    bound = baseline + (
        settings.max_concurrent_decodes
        * (settings.api_max_decode_bytes + settings.max_upload_bytes)
        / MIB
        + 64
    )
    phases: dict[str, Any] = {}
    for name, (data, copies) in files.items():
        with PeakRss(pid) as peak:
            statuses = _upload_all(base, name, data, copies)
        time.sleep(3.0)
        phases[name] = {
            "uploads": copies,
            "upload_kib": len(data) // 1024,
            "statuses": dict(statuses),
            "peak_rss_mib": peak.peak,
            "settled_rss_mib": round(_rss_mib(pid), 1),
        }
    peak_all = max(p["peak_rss_mib"] for p in phases.values())
    return {
        "baseline_rss_mib": round(baseline, 1),
        "bound_mib": round(bound, 1),
        "within_bound": peak_all <= bound,
        "phases": phases,
    }


def _memory(env: dict[str, str]) -> dict[str, Any]:
    rgb100, grey100 = _png("RGB", 10_000), _png("L", 10_000)
    float100, float64 = _float_tiff(10_000), _float_tiff(8_000)
    defaults = {
        "rgb_100mp.png": (rgb100, 4),
        "grey_100mp.png": (grey100, 4),
        "float_100mp.tif": (float100, 3),
        "float_64mp.tif": (float64, 3),
    }
    out: dict[str, Any] = {}
    runs: list[tuple[str, dict[str, str], dict[str, tuple[bytes, int]]]] = [
        ("defaults", {}, defaults),
        (
            "budget_512mib",
            {"CLIPSEARCH_API_MAX_DECODE_BYTES": str(512 * MIB)},
            {"rgb_100mp.png": (rgb100, 4), "float_100mp.tif": (float100, 3)},
        ),
        (
            "limits_off",
            LIMITS_OFF,
            {"rgb_100mp.png": (rgb100, 4), "float_100mp.tif": (float100, 3)},
        ),
    ]
    for label, extra, files in runs:
        overrides = {k.removeprefix("CLIPSEARCH_").lower(): v for k, v in extra.items()}
        settings = load_settings(**overrides)
        with _server(env, extra) as (base, pid):
            out[label] = _memory_phases(base, pid, files, settings)
    return out


# --- overload ------------------------------------------------------------------------------


Outcome = tuple[str, float]  # ("200", "503 overloaded", "503 bare", "error", ...), ms


def _summary(results: list[Outcome], wall: float) -> dict[str, Any]:
    kinds = Counter(kind for kind, _ in results)
    accepted = [ms for kind, ms in results if kind == "200"]
    refused = sum(n for kind, n in kinds.items() if kind.startswith(("429", "503")))
    summary: dict[str, Any] = {
        "requests": len(results),
        "outcomes": dict(sorted(kinds.items())),
        "share_429_503": round(refused / len(results), 4),
        "wall_s": round(wall, 2),
    }
    if accepted:
        summary["accepted_ms"] = {
            "p50": round(float(np.percentile(accepted, 50)), 1),
            "p99": round(float(np.percentile(accepted, 99)), 1),
            "max": round(max(accepted), 1),
        }
    return summary


def _request_bytes(i: int) -> bytes:
    query = urllib.parse.quote_plus(query_text(i))
    return f"GET /search?q={query}&k=10 HTTP/1.1\r\nHost: bench\r\n\r\n".encode()


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int
) -> tuple[str, bool, float]:
    """One search on an open connection: its outcome, whether the connection stays open, and
    the Retry-After it asked for (0 if none).

    A 503 is "overloaded" (the API's JSON with Retry-After) or "bare" (anything else). A raw
    HTTP/1.1 exchange keeps the client's own CPU small beside the server's when both share the
    cores.
    """
    writer.write(_request_bytes(i))
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    status = head.split(" ", 2)[1]
    headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    kind = status
    if status == "503":
        overloaded = b'"overloaded"' in body and "retry-after" in headers
        kind += " overloaded" if overloaded else " bare"
    retry_after = float(headers.get("retry-after", "0"))
    return kind, headers.get("connection") != "close", retry_after


async def _one_shot(port: int, i: int) -> Outcome:
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            kind, _, _ = await _exchange(reader, writer, i)
        finally:
            writer.close()
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        kind = "connection error"
    return kind, (time.perf_counter() - started) * 1000


async def _burst(port: int, total: int, offset: int) -> dict[str, Any]:
    started = time.perf_counter()
    results = await asyncio.gather(*(_one_shot(port, offset + i) for i in range(total)))
    return _summary(list(results), time.perf_counter() - started)


async def _clients(port: int, clients: int, total: int, offset: int) -> dict[str, Any]:
    counter = iter(range(total))
    results: list[Outcome] = []

    async def one_client() -> None:
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for i in counter:
            started = time.perf_counter()
            retry_after = 0.0
            try:
                if connection is None:
                    connection = await asyncio.open_connection("127.0.0.1", port)
                kind, keep, retry_after = await _exchange(*connection, offset + i)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                kind, keep = "connection error", False
            results.append((kind, (time.perf_counter() - started) * 1000))
            if not keep and connection is not None:
                connection[1].close()
                connection = None
            await asyncio.sleep(retry_after)  # a well-behaved client waits as it was asked
        if connection is not None:
            connection[1].close()

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    return _summary(results, time.perf_counter() - started)


def _overload(env: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, extra in (("limits", {}), ("no_limits", LIMITS_OFF)):
        with _server(env, extra) as (base, _):
            port = int(base.rsplit(":", 1)[1])
            asyncio.run(_clients(port, 4, 40, 900_000))  # warm-up
            out[label] = {
                "burst_2000": asyncio.run(_burst(port, 2000, 0)),
                "clients_100": asyncio.run(_clients(port, 100, 2000, 100_000)),
            }
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = _build_corpus(Path(tmp))
        defaults = Settings()
        result: dict[str, Any] = {
            "bench": "overload",
            "model": f"{MODEL}/none",
            "vectors": VECTORS,
            "cores": os.cpu_count(),
            "limits": {
                "max_concurrent_requests": defaults.max_concurrent_requests,
                "max_queued_requests": defaults.max_queued_requests,
                "queue_timeout_seconds": defaults.queue_timeout_seconds,
                "max_concurrent_decodes": defaults.max_concurrent_decodes,
                "api_max_decode_bytes": defaults.api_max_decode_bytes,
            },
            "overload": _overload(env),
        }
        if "--skip-memory" not in sys.argv:
            result["memory"] = _memory(env)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
