"""Budget-aware micro-batching for the HTTP app: concurrent requests with the *same budget* share one call.

Why it cannot break a budget:

* FLOPs budgets (and "no budget") are per image: the schedule prefix depends on the budget only, so a request
  batched with others runs exactly the steps it would run alone (and the same per-image FLOPs).
* Deadlines: only requests with the same deadline share a batch, and the batch gets the deadline of its
  *oldest* member minus the time that member already waited, so every member's deadline is respected
  (the predictor never starts a step whose measured time, for that batch size, cannot fit).

One worker thread runs every batch, so the model is never run concurrently (a second inference thread
only makes both slower on CPU) and requests that arrive while a batch runs queue up for the next one.
FLOPs/no-budget requests wait at most `window_ms` (from the oldest one's arrival) for company, and only
while other requests are on their way (being read or parsed: no waiting for nobody at low load); deadline
requests never wait: they only join requests that are already queued.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


class QueueFull(Exception):
    """More than `max_pending` requests are waiting; the caller answers 503."""


@dataclass
class Item:
    key: Hashable  # requests batch together only when their keys are equal (the budget)
    x: Tensor  # (N, C, H, W)
    t0: float  # time.perf_counter() when the request arrived (deadlines are measured from here)
    wait: bool  # may wait up to the window for company
    future: asyncio.Future = field(repr=False)
    queued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """`await submit(key, x, t0, wait)` returns `run(key, items)[i]` for this request's item.

    `run(key, items) -> list` is called in the worker thread with 1..k items of one key whose images add up
    to at most `max_images` (a single larger request runs alone). Bound to the event loop of its first
    `submit`; `close()` stops it.
    """

    def __init__(self, run: Callable[[Hashable, list[Item]], list[Any]], *, window_ms: float = 2.0,
                 max_images: int = 64, max_pending: int = 1024, arriving: Callable[[], int] | None = None):
        self._run = run
        self._arriving = arriving
        self.window_s = window_ms / 1e3
        self.max_images = max_images
        self.max_pending = max_pending
        self._pending: deque[Item] = deque()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="anytime-inference")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0  # statistics, read by /health
        self.requests = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or the app moved to a new loop (old one is gone)
            self._loop, self._wake, self._pending = loop, asyncio.Event(), deque()
            self._task = None
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._work(), name="anytime-batcher")

    async def submit(self, key: Hashable, x: Tensor, t0: float, wait: bool = True):
        self._ensure_worker()
        if len(self._pending) >= self.max_pending:
            raise QueueFull(f"{len(self._pending)} requests are already waiting")
        item = Item(key, x, t0, wait, self._loop.create_future())
        self._pending.append(item)
        self._wake.set()
        return await item.future

    def _images(self, key: Hashable) -> int:
        return sum(len(it.x) for it in self._pending if it.key == key)

    def _take(self, key: Hashable) -> list[Item]:
        """The oldest request plus later ones with the same key, in arrival order, up to `max_images`."""
        head = self._pending.popleft()
        batch, images, rest = [head], len(head.x), deque()
        while self._pending:
            it = self._pending.popleft()
            if it.key == key and images + len(it.x) <= self.max_images:
                batch.append(it)
                images += len(it.x)
            else:
                rest.append(it)
        self._pending = rest
        return batch

    async def _gather(self, head: Item) -> None:
        """Let requests with the head's key join until the window (from its arrival) closes, the batch is full
        or (with an `arriving` counter) no other request is on its way."""
        while True:
            remaining = head.queued + self.window_s - time.perf_counter()
            if remaining <= 0 or self._images(head.key) >= self.max_images:
                return
            if self._arriving is not None and self._arriving() == 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            head = self._pending[0]
            if head.wait and self.window_s > 0:
                await self._gather(head)
            batch = [it for it in self._take(head.key) if not it.future.done()]  # done = client gone
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run, head.key, batch)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug in `run`: fail this batch's requests, keep serving the rest
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(e)
                continue
            self.batches += 1
            self.requests += len(batch)
            for it, r in zip(batch, results):
                if not it.future.done():
                    it.future.set_result(r)

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._task = None

    def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
