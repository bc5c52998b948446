"""Admission control: bounded concurrency with a bounded, timed queue, refused with 503 and
Retry-After when full, so overload costs clients a retry instead of everyone a growing wait."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import ApiError

# Monitoring must answer while the service is full: exactly the routes a probe uses.
EXEMPT_PATHS = frozenset({"/health", "/ready", "/metrics"})
MAX_RETRY_AFTER_S = 60


class Overloaded(ApiError):
    """503: no room now; `retry_after` (whole seconds) is sent as the Retry-After header."""

    def __init__(self, what: str, retry_after: int) -> None:
        super().__init__(
            503,
            "overloaded",
            f"The server is at its limit of {what}; retry after {retry_after} s.",
            headers={"Retry-After": str(retry_after)},
        )
        self.retry_after = retry_after


class Gate:
    """At most `limit` holders at once; at most `max_waiting` more wait their turn (first come,
    first served), each for at most `wait_s` seconds. Anything beyond is Overloaded at once.

    One instance serves one event loop; it needs no lock because it never awaits between
    reading and changing its counts.
    """

    def __init__(
        self,
        what: str,
        *,
        limit: int,
        max_waiting: int,
        wait_s: float,
        on_refuse: Callable[[], None] | None = None,
    ) -> None:
        if limit < 1 or max_waiting < 0 or wait_s <= 0:
            raise ValueError("a gate needs limit >= 1, max_waiting >= 0 and wait_s > 0")
        self.what = what
        self.limit = limit
        self.max_waiting = max_waiting
        self.wait_s = wait_s
        self.holding = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._mean_hold_s = 0.05  # running mean of how long a holder keeps its slot
        self._on_refuse = on_refuse
        self.refused = 0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def retry_after(self) -> int:
        """Seconds until the queue ahead has probably drained (at least 1)."""
        drain = (self.waiting + 1) * self._mean_hold_s / self.limit
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(drain)))

    def _refuse(self) -> Overloaded:
        self.refused += 1
        if self._on_refuse is not None:
            self._on_refuse()
        return Overloaded(self.what, self.retry_after())

    async def acquire(self) -> None:
        if self.holding < self.limit and not self._waiters:
            self.holding += 1
            return
        if len(self._waiters) >= self.max_waiting:
            raise self._refuse()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.wait_s):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot just as we gave up: pass it on
            else:
                waiter.cancel()
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            if isinstance(exc, TimeoutError):
                raise self._refuse() from None
            raise

    def release(self, held_s: float | None = None) -> None:
        """Give the slot back; `held_s` (how long it was held) feeds Retry-After."""
        if held_s is not None:
            self._mean_hold_s += 0.1 * (held_s - self._mean_hold_s)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the next in line
                return
        self.holding -= 1

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        started = time.monotonic()
        try:
            yield
        finally:
            self.release(time.monotonic() - started)


class AdmissionControl:
    """Pure ASGI middleware: every HTTP request but monitoring passes `gate` first.

    It sits before the body is read, so a refused request costs no parsing, and its answer is
    the JSON error body of the rest of the API.
    """

    def __init__(self, app: ASGIApp, gate: Gate, exempt: Iterable[str] = EXEMPT_PATHS) -> None:
        self.app = app
        self.gate = gate
        self.exempt = frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        try:
            await self.gate.acquire()
        except Overloaded as refused:
            await send_error(send, refused)
            return
        started = time.monotonic()
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.release(time.monotonic() - started)


async def send_error(send: Send, error: ApiError) -> None:
    """Answer with the API's JSON error body from outside FastAPI (a middleware)."""
    body = json.dumps({"code": error.code, "message": error.message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
