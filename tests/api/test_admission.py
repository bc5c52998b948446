"""Admission control: the gate on its own, and 503 with Retry-After from the real app when a
request limit or the decode slots are full; over-budget uploads are 413 without decoding."""

from __future__ import annotations

import asyncio
import io
import struct
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.admission import Gate, Overloaded
from tests.fixtures.bad_images import png_with_idat

# --- the gate ---------------------------------------------------------------------------


def test_gate_admits_up_to_its_limit_then_queues_in_order_then_refuses() -> None:
    async def main() -> list[str]:
        gate = Gate("things", limit=2, max_waiting=2, wait_s=5)
        order: list[str] = []
        await gate.acquire()
        await gate.acquire()

        async def wait(name: str) -> None:
            await gate.acquire()
            order.append(name)

        first = asyncio.create_task(wait("first"))
        second = asyncio.create_task(wait("second"))
        await asyncio.sleep(0)
        assert (gate.holding, gate.waiting) == (2, 2)
        with pytest.raises(Overloaded) as refused:
            await gate.acquire()  # the queue is full: refused at once
        assert refused.value.status == 503
        assert refused.value.headers == {"Retry-After": str(refused.value.retry_after)}
        assert refused.value.retry_after >= 1
        gate.release()
        gate.release()
        await asyncio.gather(first, second)
        assert (gate.holding, gate.waiting, gate.refused) == (2, 0, 1)
        return order

    assert asyncio.run(main()) == ["first", "second"]


def test_a_waiter_that_times_out_is_refused_and_leaves_no_trace() -> None:
    async def main() -> None:
        gate = Gate("things", limit=1, max_waiting=5, wait_s=0.05)
        await gate.acquire()
        with pytest.raises(Overloaded):
            await gate.acquire()
        assert (gate.holding, gate.waiting) == (1, 0)
        gate.release()
        assert gate.holding == 0
        async with gate.slot():
            assert gate.holding == 1
        assert gate.holding == 0

    asyncio.run(main())


def test_a_cancelled_waiter_gives_its_turn_to_the_next() -> None:
    async def main() -> None:
        gate = Gate("things", limit=1, max_waiting=5, wait_s=5)
        await gate.acquire()
        cancelled = asyncio.create_task(gate.acquire())
        later = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.sleep(0)
        gate.release()
        await asyncio.wait_for(later, 1)
        assert cancelled.cancelled() and (gate.holding, gate.waiting) == (1, 0)

    asyncio.run(main())


# --- the app ------------------------------------------------------------------------------


def _hold(gate: Gate, slots: int) -> None:
    """Take `slots` free slots from outside the app's event loop (no waiting involved)."""
    for _ in range(slots):
        asyncio.run(gate.acquire())


def test_full_request_queue_is_503_with_retry_after_and_health_still_answers(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_concurrent_requests=2, max_queued_requests=0)
    gate: Gate = client.app.state.admission  # type: ignore[attr-defined]
    _hold(gate, 2)
    response = client.get("/search", params={"q": "a red circle"})
    assert response.status_code == 503
    assert response.json()["code"] == "overloaded"
    assert "concurrent requests" in response.json()["message"]
    assert int(response.headers["Retry-After"]) >= 1
    for probe in ("/health", "/metrics"):
        assert client.get(probe).status_code == 200  # monitoring is never queued
    metrics = client.get("/metrics").text
    assert 'clipsearch_overload_refusals_total{limit="requests"} 1' in metrics
    assert "clipsearch_requests_in_flight 2" in metrics
    gate.release()
    assert client.get("/search", params={"q": "a red circle"}).status_code == 200


def test_a_queued_request_waits_for_a_slot_then_is_served(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_concurrent_requests=1, max_queued_requests=4)
    gate: Gate = client.app.state.admission  # type: ignore[attr-defined]
    _hold(gate, 1)
    portal = client.portal
    assert portal is not None
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.get, "/search", params={"q": "a blue square"})
        while gate.waiting == 0:
            time.sleep(0.01)
        portal.call(gate.release)  # in the app's event loop, where the waiter lives
        assert future.result(timeout=60).status_code == 200


def test_a_request_that_waits_too_long_is_503(make_client: Callable[..., TestClient]) -> None:
    client = make_client(
        max_concurrent_requests=1, max_queued_requests=4, queue_timeout_seconds=0.2
    )
    gate: Gate = client.app.state.admission  # type: ignore[attr-defined]
    _hold(gate, 1)
    response = client.get("/search", params={"q": "a red circle"})
    assert response.status_code == 503 and "Retry-After" in response.headers
    assert gate.waiting == 0


def _png(side: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


def test_uploads_wait_for_a_decode_slot_and_are_503_when_none_comes(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_concurrent_decodes=1, queue_timeout_seconds=0.2)
    slots: Gate = client.app.state.services.decode_slots  # type: ignore[attr-defined]
    _hold(slots, 1)
    for route, data in (("/search/image", {}), ("/classify", {"labels": "cat, dog"})):
        response = client.post(route, files={"file": ("q.png", _png())}, data=data)
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "overloaded"
        assert "image decodes" in response.json()["message"]
        assert "Retry-After" in response.headers
    assert 'limit="decodes"' in client.get("/metrics").text
    slots.release()
    response = client.post("/search/image", files={"file": ("q.png", _png())})
    assert response.status_code == 200, response.text


def _declared_png(width: int, height: int) -> bytes:
    """A 16-bit grey PNG header whose data stream breaks off: decoding it says truncated."""
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return png_with_idat(ihdr, zlib.compress(b"\x00" * (1 + width * 2) * 4)[:-6])


def test_an_upload_over_the_decode_budget_is_413_without_decoding(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(api_max_decode_bytes=1024 * 1024)
    data = _declared_png(1000, 1000)  # 2 MB of 16-bit pixels, 4 MB of RGB result
    for route, form in (("/search/image", {}), ("/classify", {"labels": "cat, dog"})):
        response = client.post(route, files={"file": ("big.png", data)}, data=form)
        assert response.status_code == 413, response.text
        assert response.json()["code"] == "image_too_large"
        assert "1048576 allowed" in response.json()["message"]
    # Within the budget the same kind of file is decoded, and found truncated.
    small = client.post("/search/image", files={"file": ("small.png", _declared_png(100, 100))})
    assert small.status_code == 422 and small.json()["code"] == "image_truncated"
