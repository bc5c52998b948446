"""Micro-batching of text queries: those arriving within a few ms share one forward pass."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import numpy as np
from starlette.concurrency import run_in_threadpool

EncodeBatch = Callable[[Sequence[str]], np.ndarray]


class MicroBatcher:
    """Collects texts for at most `max_wait_s` (or until `max_batch` are waiting), then encodes
    them together in a worker thread.

    Only one batch is encoded at a time. Texts that arrive while it runs wait for it and
    then go together in the next batch, at once: under load the batches grow by themselves
    (continuous batching), instead of many small batches queueing for the same model.

    One instance per event loop (it is built in the app lifespan).
    """

    def __init__(self, encode: EncodeBatch, *, max_wait_s: float, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._encode = encode
        self.max_wait_s = max_wait_s
        self.max_batch = max_batch
        self._pending: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy = False
        self.batches = 0
        self.batched_texts = 0

    async def encode(self, text: str) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((text, future))
        if not self._busy:
            if len(self._pending) >= self.max_batch:
                self._flush()
            elif self._timer is None:
                self._timer = loop.call_later(self.max_wait_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy or not self._pending:
            return
        batch = self._pending[: self.max_batch]
        self._pending = self._pending[self.max_batch :]
        self._busy = True
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[str, asyncio.Future[np.ndarray]]]) -> None:
        self.batches += 1
        self.batched_texts += len(batch)
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
            self._busy = False
            # Whatever queued up meanwhile has waited long enough: encode it now.
            if self._pending:
                self._flush()
        for row, (_, future) in enumerate(batch):
            if not future.done():
                future.set_result(vectors[row])

    async def close(self) -> None:
        self._flush()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
