"""The header deadline of `clipsearch serve`'s HTTP protocol, on a real uvicorn server: slow
and silent clients are disconnected, a slow answer to a complete request is not cut off."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from api.server import HeaderTimeoutH11Protocol
from tests.serving import free_port

HEADER_TIMEOUT_S = 0.3


async def slow_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await asyncio.sleep(2 * HEADER_TIMEOUT_S)  # answering takes longer than the deadline
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


@contextmanager
def running(header_timeout_s: float, max_connections: int | None = None) -> Iterator[int]:
    """A uvicorn server in a thread, with the protocol `clipsearch serve` uses; its port."""
    chosen = free_port()
    config = uvicorn.Config(
        slow_app,
        host="127.0.0.1",
        port=chosen,
        http=HeaderTimeoutH11Protocol,
        lifespan="off",
        log_level="warning",
        timeout_keep_alive=30,  # long, so only the header deadline can close connections
        limit_concurrency=max_connections,
    )
    config.header_timeout_s = header_timeout_s  # type: ignore[attr-defined]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield chosen
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with running(HEADER_TIMEOUT_S) as chosen:
        yield chosen


def _read_until_closed(sock: socket.socket) -> bytes:
    sock.settimeout(10)  # generous: the deadline is far shorter; a hang fails here
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_headers_trickling_past_the_deadline_get_408_and_a_closed_connection(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"code": "request_timeout"' in answer


def test_a_connection_that_sends_nothing_is_closed(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        assert _read_until_closed(sock) == b""


def test_a_complete_request_is_answered_however_long_it_takes_and_the_deadline_rearms(
    port: int,
) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        first = b""
        while not first.endswith(b"\r\n\r\nok"):
            chunk = sock.recv(4096)
            assert chunk, f"closed before the answer was complete: {first!r}"
            first += chunk
        assert first.startswith(b"HTTP/1.1 200 ")
        # Kept alive for a next request, but its headers have the deadline again.
        sock.sendall(b"GET / HTTP/1.1\r\n")
        assert _read_until_closed(sock).startswith(b"HTTP/1.1 408 ")


def test_past_the_connection_limit_a_request_gets_the_json_503_and_its_connection_closes() -> None:
    with (
        running(header_timeout_s=30, max_connections=1) as port,
        socket.create_connection(("127.0.0.1", port)) as first,
    ):
        first.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # holds the only connection
        with socket.create_connection(("127.0.0.1", port)) as second:
            second.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = _read_until_closed(second)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"retry-after: 1" in head.lower() and b"connection: close" in head.lower()
    assert json.loads(body)["code"] == "overloaded"
