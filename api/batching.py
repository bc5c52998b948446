"""Micro-batching of texts: those arriving within a few ms share one forward pass."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np
from starlette.concurrency import run_in_threadpool

from api.admission import MAX_RETRY_AFTER_S, Overloaded

EncodeBatch = Callable[[Sequence[str]], np.ndarray]
_Waiting = tuple[str, "asyncio.Future[np.ndarray]"]


class MicroBatcher:
    """Collects texts for at most `max_wait_s` (or until `max_batch` are waiting), then encodes
    them together in a worker thread.

    Only one batch is encoded at a time. Texts that arrive while it runs wait for it and
    then go together in the next batch, at once: under load the batches grow by themselves
    (continuous batching), instead of many small batches queueing for the same model.

    Search queries (`encode`) go first; label prompts (`encode_many`) fill the rest of each
    batch, so a large /classify delays a query by at most one pass. At most `max_pending`
    texts wait; a request that would pass that is refused (Overloaded, 503) instead of
    lengthening everyone's wait.

    One instance per event loop (it is built in the app lifespan).
    """

    def __init__(
        self,
        encode: EncodeBatch,
        *,
        max_wait_s: float,
        max_batch: int,
        max_pending: int | None = None,
        on_refuse: Callable[[], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._encode = encode
        self.max_wait_s = max_wait_s
        self.max_batch = max_batch
        self.max_pending = max_pending
        self._on_refuse = on_refuse
        self._queries: deque[_Waiting] = deque()
        self._prompts: deque[_Waiting] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy = False
        self._mean_pass_s = 0.05
        self.batches = 0
        self.batched_texts = 0
        self.refused = 0

    @property
    def pending(self) -> int:
        return len(self._queries) + len(self._prompts)

    async def encode(self, text: str) -> np.ndarray:
        """The embedding of one query text."""
        (future,) = self._enqueue([text], self._queries)
        return await future

    async def encode_many(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of many texts (label prompts), in order, after every waiting query."""
        if not texts:
            raise ValueError("encode_many needs at least one text")
        futures = self._enqueue(texts, self._prompts)
        # If the caller goes away, gather cancels the futures and the flush skips them.
        return np.stack(await asyncio.gather(*futures))

    def _enqueue(
        self, texts: Sequence[str], queue: deque[_Waiting]
    ) -> list[asyncio.Future[np.ndarray]]:
        if self.max_pending is not None and self.pending + len(texts) > self.max_pending:
            self.refused += 1
            if self._on_refuse is not None:
                self._on_refuse()
            raise Overloaded(f"{self.max_pending} texts waiting to be encoded", self._drain_s())
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[np.ndarray]] = []
        for text in texts:
            future: asyncio.Future[np.ndarray] = loop.create_future()
            queue.append((text, future))
            futures.append(future)
        if not self._busy:
            if self.pending >= self.max_batch:
                self._flush()
            elif self._timer is None:
                self._timer = loop.call_later(self.max_wait_s, self._flush)
        return futures

    def _drain_s(self) -> int:
        passes = math.ceil((self.pending + 1) / self.max_batch)
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(passes * self._mean_pass_s)))

    def _take_batch(self) -> list[_Waiting]:
        batch: list[_Waiting] = []
        for queue in (self._queries, self._prompts):
            while queue and len(batch) < self.max_batch:
                text, future = queue.popleft()
                if not future.done():  # a cancelled caller's texts are not encoded
                    batch.append((text, future))
        return batch

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy:
            return
        batch = self._take_batch()
        if not batch:
            return
        self._busy = True
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Waiting]) -> None:
        self.batches += 1
        self.batched_texts += len(batch)
        started = time.monotonic()
        try:
            vectors = await run_in_threadpool(self._encode, [text for text, _ in batch])
        except BaseException as exc:  # every waiter must hear about it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._mean_pass_s += 0.1 * (time.monotonic() - started - self._mean_pass_s)
            self._busy = False
            # Whatever queued up meanwhile has waited long enough: encode it now.
            if self.pending:
                self._flush()
        for row, (_, future) in enumerate(batch):
            if not future.done():
                future.set_result(vectors[row])

    async def close(self) -> None:
        self._flush()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
