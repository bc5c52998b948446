"""Body limits on their own: a body too large is 413, a body too slow is 408; neither reaches
the app's own answer, and a body that did arrive leaves the app all the time it needs."""

from __future__ import annotations

import asyncio
import json

from starlette.types import Message, Receive, Scope, Send

from api.limits import BodyLimits

SCOPE: Scope = {"type": "http", "method": "POST", "path": "/x", "headers": []}


async def reading_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the whole body, then waits for a disconnect a while (as streaming responses do)."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    waiting = asyncio.ensure_future(receive())
    await asyncio.sleep(0.3)  # longer than the body timeout below
    waiting.cancel()
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def _run(app: BodyLimits, chunks: list[Message]) -> list[Message]:
    """Feed `chunks`, then behave as a client that neither sends more nor leaves."""

    async def main() -> list[Message]:
        queue = list(chunks)
        sent: list[Message] = []

        async def receive() -> Message:
            if queue:
                return queue.pop(0)
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

        async def send(message: Message) -> None:
            sent.append(message)

        await asyncio.wait_for(app(SCOPE, receive, send), 10)
        return sent

    return asyncio.run(main())


def test_a_body_that_stops_arriving_is_408_and_closes_the_connection() -> None:
    app = BodyLimits(reading_app, max_bytes=1000, timeout_s=0.1)
    sent = _run(app, [{"type": "http.request", "body": b"abc", "more_body": True}])
    start, body = sent
    assert start["status"] == 408
    assert (b"connection", b"close") in start["headers"]
    assert json.loads(body["body"])["code"] == "request_timeout"


def test_a_body_too_large_is_413_before_the_timeout() -> None:
    app = BodyLimits(reading_app, max_bytes=4, timeout_s=5)
    chunk: Message = {"type": "http.request", "body": b"abcdef", "more_body": True}
    sent = _run(app, [chunk])
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["code"] == "payload_too_large"


def test_after_the_body_the_app_takes_its_time() -> None:
    app = BodyLimits(reading_app, max_bytes=1000, timeout_s=0.1)
    chunks: list[Message] = [
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"cd", "more_body": False},
    ]
    sent = _run(app, chunks)
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"4"
