"""Prometheus text-format metrics, kept in-process (no client library needed)."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Seconds. Covers a cached text query (sub-ms) to a slow image upload.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in pairs
    )
    return "{" + inner + "}"


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self._histograms: dict[tuple[str, tuple[tuple[str, str], ...]], Histogram] = {}
        self._help: dict[str, tuple[str, str]] = {}
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def inc(self, name: str, help_text: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._help.setdefault(name, ("counter", help_text))
            self._counters[(name, tuple(sorted(labels.items())))] += value

    def observe(self, name: str, help_text: str, seconds: float, **labels: str) -> None:
        with self._lock:
            self._help.setdefault(name, ("histogram", help_text))
            key = (name, tuple(sorted(labels.items())))
            self._histograms.setdefault(key, Histogram()).observe(seconds)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self._gauges[name] = (help_text, read)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            by_name: dict[str, list[str]] = defaultdict(list)
            for (name, labels), value in sorted(self._counters.items()):
                by_name[name].append(f"{name}{_labels(labels)} {value:g}")
            for (name, labels), hist in sorted(self._histograms.items()):
                cumulative = 0
                for bound, count in zip(BUCKETS, hist.counts, strict=True):
                    cumulative = count
                    le = labels + (("le", f"{bound:g}"),)
                    by_name[name].append(f"{name}_bucket{_labels(le)} {cumulative}")
                inf = labels + (("le", "+Inf"),)
                by_name[name].append(f"{name}_bucket{_labels(inf)} {hist.total}")
                by_name[name].append(f"{name}_sum{_labels(labels)} {hist.sum:.6f}")
                by_name[name].append(f"{name}_count{_labels(labels)} {hist.total}")
            for name in sorted(by_name):
                kind, help_text = self._help[name]
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
                lines.extend(by_name[name])
        for name, (help_text, read) in sorted(self._gauges.items()):
            try:
                value = float(read())
            except Exception:  # a gauge must never break the scrape
                continue
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} gauge")
            lines.append(f"{name} {value:g}")
        return "\n".join(lines) + "\n"


class RequestMetrics:
    """ASGI middleware: request count and latency per route template, method and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        import time

        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = str(scope.get("method", ""))
            self.metrics.inc(
                "clipsearch_http_requests_total",
                "HTTP requests by route, method and status.",
                route=path,
                method=method,
                status=str(status),
            )
            self.metrics.observe(
                "clipsearch_http_request_duration_seconds",
                "HTTP request latency by route and method.",
                time.perf_counter() - started,
                route=path,
                method=method,
            )
