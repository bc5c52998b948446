"""The micro-batcher on its own: batching, ordering, errors."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

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
