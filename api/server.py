"""uvicorn's HTTP protocol with a header deadline, and what each limit of `clipsearch serve`
(which runs uvicorn with them) protects:

- `max_connections` (uvicorn's limit_concurrency, answered here): open connections and running
  requests; past it a request is answered at once with the API's JSON 503 and Retry-After and
  its connection closed, so a connection flood costs no work and gives its descriptors back.
- `header_timeout_seconds` (HeaderTimeoutH11Protocol): a request's headers must be complete this
  long after the connection opened or the previous response ended; a slowloris client that
  trickles its headers is disconnected instead of holding a socket forever.
- `max_header_bytes` (h11's incomplete-event limit): headers larger than this are refused
  (400) instead of being buffered.
- `keep_alive_seconds` (uvicorn's timeout_keep_alive): an idle keep-alive connection closes.
- `body_timeout_seconds` (api.limits.BodyLimits): the whole request body must arrive within it
  (408), so a trickled upload holds one of the `max_concurrent_requests` slots no longer.
"""

from __future__ import annotations

import asyncio
from functools import cache
from typing import Any

import h11
from starlette.types import Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from api.admission import Overloaded, send_error
from retrieval.config import load_settings

_TIMEOUT_BODY = (
    b'{"code": "request_timeout", "message": "The request headers did not arrive in time."}'
)
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    + f"content-length: {len(_TIMEOUT_BODY)}\r\n".encode()
    + b"connection: close\r\n\r\n"
    + _TIMEOUT_BODY
)


@cache
def _header_timeout_from_settings() -> float:
    return load_settings().header_timeout_seconds


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request's headers, and the API's own
    answer past the connection limit.

    uvicorn times out only idle keep-alive connections, and cancels even that timer at the
    first byte received, so a client that sends a byte now and then holds its connection for
    ever. Here the headers must be complete `header_timeout_s` after the connection opened
    or the previous response ended. The value comes from the uvicorn config's
    `header_timeout_s` attribute when set, else from CLIPSEARCH_HEADER_TIMEOUT_SECONDS.

    Past uvicorn's limit_concurrency, uvicorn itself would answer a plain-text 503 without
    Retry-After; here the limit is checked the same way but answered like every other refusal
    of the API (JSON, Retry-After, connection closed).
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, object],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        configured = getattr(config, "header_timeout_s", None)
        self.header_timeout_s = (
            float(configured) if configured is not None else _header_timeout_from_settings()
        )
        self._header_timer: asyncio.TimerHandle | None = None
        self.max_connections = self.limit_concurrency
        self.limit_concurrency = None  # uvicorn's own check is replaced by _limited
        if self.max_connections is not None:
            self.app = self._limited(self.app)

    def _limited(self, app: Any) -> Any:
        async def limited(scope: Scope, receive: Receive, send: Send) -> None:
            limit = self.max_connections
            # This request's own task is already counted, unlike in uvicorn's check.
            if limit is not None and (len(self.connections) > limit or len(self.tasks) > limit):
                refusal = Overloaded(f"{limit} open connections", 1)
                refusal.headers = {**(refusal.headers or {}), "Connection": "close"}
                await send_error(send, refusal)
                return
            await app(scope, receive, send)

        return limited

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._follow_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _follow_header_deadline(self) -> None:
        """Time the wait for headers: armed while h11 waits for a request, off otherwise."""
        waiting_for_headers = self.conn.their_state is h11.IDLE
        if not waiting_for_headers or self.transport.is_closing():
            self._stop_header_timer()
        elif self._header_timer is None:
            self._header_timer = self.loop.call_later(
                self.header_timeout_s, self._on_header_timeout
            )

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        partial, _ = self.conn.trailing_data
        if partial:  # a request had begun: say why it ends
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()
