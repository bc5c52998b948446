"""Request body limits, enforced while the body streams in: its size (never buffered first)
and the time it may take to arrive (a client trickling a body must not hold a slot forever)."""

from __future__ import annotations

import asyncio
import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _BodyRefused(Exception):
    pass


class BodyLimits:
    """Pure ASGI middleware: 413 once more than `max_bytes` have arrived, 408 when the whole
    body has not arrived `timeout_s` seconds after the app first asked for it.

    A declared Content-Length over the limit is refused before any byte is read. Otherwise the
    body is counted chunk by chunk as the app reads it; the app's own response (usually a
    parse error) is dropped and replaced by the refusal, and the connection is closed.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def _refuse(self, send: Send, status: int) -> None:
        if status == 413:
            code, message = (
                "payload_too_large",
                f"The request is larger than the {self.max_bytes} bytes "
                f"({self.max_bytes / 2**20:.3g} MiB) this server accepts.",
            )
        else:
            code, message = (
                "request_timeout",
                f"The request body did not arrive within {self.timeout_s:g} s.",
            )
        body = json.dumps({"code": code, "message": message}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await self._refuse(send, 413)
                    return
        received = 0
        refused: int | None = None
        started = False
        body_done = False
        deadline: float | None = None

        async def guarded_receive() -> Message:
            nonlocal received, refused, deadline, body_done
            if self.timeout_s is None or body_done:
                # After the body, receive() only waits for a disconnect: no deadline then.
                message = await receive()
            else:
                if deadline is None:
                    deadline = time.monotonic() + self.timeout_s
                try:
                    async with asyncio.timeout_at(_loop_time(deadline)):
                        message = await receive()
                except TimeoutError:
                    refused = 408
                    raise _BodyRefused() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = 413
                    raise _BodyRefused()
                if not message.get("more_body", False):
                    body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused is not None:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if refused is None:
                raise
        if refused is not None and not started:
            await self._refuse(send, refused)


def _loop_time(deadline: float) -> float:
    """A time.monotonic() deadline on the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())
