"""Dynamic batching: concurrent requests share one backbone + model forward.

A :class:`Batcher` owns a bounded queue of items (one item = one post). Its worker task
takes the first waiting item, then keeps collecting until it has ``max_batch`` items or
``max_wait_ms`` have passed since the first (or until no other request can come: see
``can_wait`` below), and runs ``fn(items) -> results`` on the
inference thread (one thread for all batchers, so forwards never overlap and torch keeps
its threads). While a batch runs, new requests queue up and form the next batch, so
under load batches fill by themselves and the wait only costs latency when traffic is
light. A request whose items do not fit in the queue is refused at once with
:class:`QueueFull` (the service answers 503 + Retry-After): waiting is always bounded.
Retry-After is the time until the request would fit: the forwards needed to make room
(the one running, plus the queued items beyond the room, ``max_batch`` per forward) times
the recent seconds per forward.

``can_wait`` (optional, a callable) says whether waiting for batch-mates can still pay: the
service answers False when every open connection already waits for an answer, so that no
request can arrive before one is sent (a single client, or clients that wait for each reply
before the next request). The batch then runs at once instead of idling ``max_wait_ms``:
measured with one post per request from 16 keep-alive clients and batches of up to 32, the
wait otherwise cost every batch the whole ``max_wait_ms`` (docs/serve.md, "Speed").
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import Executor
from typing import Any, Callable, Sequence


class QueueFull(Exception):
    """The queue cannot take the request's items now."""

    def __init__(self, name: str, depth: int, limit: int, retry_after: int):
        self.name, self.depth, self.limit, self.retry_after = name, depth, limit, retry_after
        super().__init__(f"the {name} queue is full ({depth} waiting, limit {limit})")


class Batcher:
    def __init__(self, name: str, fn: Callable[[list], Sequence[Any]], executor: Executor, *,
                 max_batch: int, max_wait_ms: float, max_queue: int,
                 on_batch: Callable[[str, int, float], None] | None = None,
                 can_wait: Callable[[], bool] | None = None):
        self.name, self.fn, self.executor = name, fn, executor
        self.max_batch, self.max_wait, self.max_queue = int(max_batch), max_wait_ms / 1000.0, int(max_queue)
        self.on_batch, self.can_wait = on_batch, can_wait
        self._q: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.running = 0          # items in the batch being computed now
        self._batch_s = 0.0       # seconds per forward, recent average (for Retry-After)
        self._waiter: asyncio.Future | None = None   # set while the worker waits for batch-mates

    # -- lifecycle ----------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._loop is not loop or self._task.done():
            self._loop, self._q = loop, asyncio.Queue()
            self._task = loop.create_task(self._work(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop the worker; requests still queued get an error instead of waiting forever."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._task = None
        while self._q is not None and not self._q.empty():
            _, fut = self._q.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError(f"the {self.name} batcher stopped"))

    @property
    def depth(self) -> int:
        return self._q.qsize() if self._q is not None else 0

    # -- submitting ---------------------------------------------------------------------------
    async def submit(self, items: Sequence[Any]) -> list:
        """Queue ``items``; return their results in order (an exception of ``fn`` is raised)."""
        self._ensure_started()
        if self.depth + len(items) > self.max_queue:
            raise QueueFull(self.name, self.depth + self.running, self.max_queue, self.retry_after(len(items)))
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in items]
        for it, fut in zip(items, futs):
            self._q.put_nowait((it, fut))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)                         # wake the collecting worker
        if len(futs) == 1:
            return [await futs[0]]
        return list(await asyncio.gather(*futs))

    def retry_after(self, n: int) -> int:
        """Whole seconds until ``n`` more items would fit in the queue (at least 1)."""
        over = self.depth + n - self.max_queue
        forwards = math.ceil(max(0, over) / self.max_batch) + (1 if self.running else 0)
        return max(1, math.ceil(forwards * (self._batch_s or 0.1)))

    async def _work(self) -> None:
        q, loop = self._q, asyncio.get_running_loop()
        while True:
            batch = [await q.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                if not q.empty():
                    batch.append(q.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0 or (self.can_wait is not None and not self.can_wait()):
                    break
                # wait for the next submit or the deadline: a bare future and a timer (no task per item)
                self._waiter = fut = loop.create_future()
                timer = loop.call_later(left, lambda f=fut: f.done() or f.set_result(None))
                try:
                    await fut
                finally:
                    timer.cancel()
                    self._waiter = None
            batch = [(it, f) for it, f in batch if not f.done()]   # the client went away
            if not batch:
                continue
            self.running = len(batch)
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [it for it, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            except asyncio.CancelledError:  # stop() while this batch runs: its requests get an error, not a hang
                for _, f in batch:
                    if not f.done():
                        f.set_exception(RuntimeError(f"the {self.name} batcher stopped"))
                raise
            except Exception as e:  # every waiting request gets the error (a 500), the worker goes on
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
            else:
                for (_, f), r in zip(batch, results):
                    if not f.done():
                        f.set_result(r)
            finally:
                dt = time.perf_counter() - t0
                self.running = 0
                self._batch_s = dt if self._batch_s == 0 else 0.8 * self._batch_s + 0.2 * dt
                if self.on_batch is not None:
                    self.on_batch(self.name, len(batch), dt)
