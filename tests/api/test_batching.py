"""The micro-batcher on its own: batching, ordering, errors."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from api.admission import Overloaded
from api.batching import MicroBatcher


class SlowEncoder:
    """Returns [len(text)] per text; records batch sizes; one call at a time, like a model."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.batches: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            self.batches.append(len(texts))
            time.sleep(self.delay)
            return np.array([[float(len(t))] for t in texts], dtype=np.float32)


def test_concurrent_queries_share_forward_passes_and_get_their_own_answers() -> None:
    encoder = SlowEncoder()

    async def main() -> list[np.ndarray]:
        batcher = MicroBatcher(encoder, max_wait_s=0.005, max_batch=8)
        texts = ["x" * n for n in range(1, 41)]
        results = await asyncio.gather(*(batcher.encode(t) for t in texts))
        await batcher.close()
        return results

    results = asyncio.run(main())
    assert [int(r[0]) for r in results] == list(range(1, 41))
    assert sum(encoder.batches) == 40
    assert max(encoder.batches) <= 8
    assert len(encoder.batches) <= 6  # 40 texts in batches of up to 8, not 40 passes


def test_arrivals_during_a_pass_form_the_next_batch() -> None:
    encoder = SlowEncoder(delay=0.05)

    async def main() -> None:
        batcher = MicroBatcher(encoder, max_wait_s=0.001, max_batch=32)
        first = asyncio.ensure_future(batcher.encode("a"))
        await asyncio.sleep(0.01)  # the first pass is running now
        later = [asyncio.ensure_future(batcher.encode("bb")) for _ in range(10)]
        await asyncio.gather(first, *later)
        await batcher.close()

    asyncio.run(main())
    assert encoder.batches == [1, 10]


def test_an_encoder_error_reaches_every_waiter() -> None:
    def broken(texts: Sequence[str]) -> np.ndarray:
        raise RuntimeError("boom")

    async def main() -> None:
        batcher = MicroBatcher(broken, max_wait_s=0.001, max_batch=4)
        outcomes = await asyncio.gather(
            *(batcher.encode("q") for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(o, RuntimeError) for o in outcomes)
        # and the batcher still works afterwards
        batcher._encode = SlowEncoder(0.0)
        assert float((await batcher.encode("abc"))[0]) == 3.0
        await batcher.close()

    asyncio.run(main())


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(SlowEncoder(), max_wait_s=0.001, max_batch=0)


class RecordingEncoder(SlowEncoder):
    """Also records the texts of each batch, in order."""

    def __init__(self, delay: float = 0.05) -> None:
        super().__init__(delay)
        self.texts: list[list[str]] = []

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.texts.append(list(texts))
        return super().__call__(texts)


def test_prompts_come_back_in_order_and_queries_go_before_them() -> None:
    encoder = RecordingEncoder()

    async def main() -> np.ndarray:
        batcher = MicroBatcher(encoder, max_wait_s=0.001, max_batch=4)
        first = asyncio.ensure_future(batcher.encode("q"))
        await asyncio.sleep(0.01)  # the first pass is running
        prompts = asyncio.ensure_future(batcher.encode_many(["p" * n for n in range(1, 11)]))
        await asyncio.sleep(0)
        query = asyncio.ensure_future(batcher.encode("query"))
        await asyncio.gather(first, query)
        vectors: np.ndarray = await prompts
        await batcher.close()
        return vectors

    vectors = asyncio.run(main())
    assert [int(v[0]) for v in vectors] == list(range(1, 11))
    # The query that came after the prompts still leads the next pass.
    assert encoder.texts[1][0] == "query"
    assert [len(batch) for batch in encoder.texts] == [1, 4, 4, 3]


def test_a_full_queue_refuses_with_retry_after_instead_of_growing() -> None:
    encoder = SlowEncoder(delay=0.05)
    refusals: list[int] = []

    async def main() -> None:
        batcher = MicroBatcher(
            encoder,
            max_wait_s=0.001,
            max_batch=2,
            max_pending=5,
            on_refuse=lambda: refusals.append(1),
        )
        running = asyncio.ensure_future(batcher.encode("a"))
        await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(batcher.encode_many(["b"] * 5))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as refused:
            await batcher.encode("c")
        assert int(refused.value.headers["Retry-After"]) >= 1  # type: ignore[index]
        assert batcher.pending == 5  # the refused text was never queued
        await asyncio.gather(running, queued)
        assert float((await batcher.encode("c"))[0]) == 1.0  # room again
        await batcher.close()

    asyncio.run(main())
    assert refusals == [1]


def test_texts_of_a_caller_that_went_away_are_not_encoded() -> None:
    encoder = RecordingEncoder()

    async def main() -> None:
        batcher = MicroBatcher(encoder, max_wait_s=0.001, max_batch=8)
        running = asyncio.ensure_future(batcher.encode("a"))
        await asyncio.sleep(0.01)
        abandoned = asyncio.ensure_future(batcher.encode_many(["gone"] * 6))
        kept = asyncio.ensure_future(batcher.encode("kept"))
        await asyncio.sleep(0)
        abandoned.cancel()
        await asyncio.gather(running, kept)
        await batcher.close()

    asyncio.run(main())
    assert encoder.texts == [["a"], ["kept"]]
