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

How little a lone request pays (issue 15, server overhead): no scheduler task sits between the requests and
the thread. A submit asks the event loop for one `call_soon` pass (so requests submitted in the same loop
iteration still batch together), which hands the batch straight to the inference thread; the thread posts the
results back with one `call_soon_threadsafe`, which resolves each request's future and starts the next batch.
Two loop hops per batch, the minimum for running the model off the event loop; the earlier design (a batcher
task waiting on an event, `run_in_executor`, the task resuming to resolve the futures) needed four. The thread
is a plain loop over a `SimpleQueue`, not a `ThreadPoolExecutor` (whose futures, work items and condition
variables are code a request walks through cold on a busy machine: every such layer costs tens of microseconds
there).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
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
    images: int = field(init=False)  # x.shape[0], once: len() of a tensor is a Python-level torch call

    def __post_init__(self):
        self.images = self.x.shape[0]


class MicroBatcher:
    """`await submit(key, x, t0, wait)` returns `run(key, items)[i]` for this request's item.

    `run(key, items) -> list` is called in the worker thread with 1..k items of one key whose images add up
    to at most `max_images` (a single larger request runs alone). Bound to the event loop of its latest
    `submit` (a new loop starts afresh: the app may be served again after a shutdown); `aclose()` unbinds it,
    `close()` stops the thread. All state below is touched on the event loop's thread only.
    """

    def __init__(self, run: Callable[[Hashable, list[Item]], list[Any]], *, window_ms: float = 2.0,
                 max_images: int = 64, max_pending: int = 1024, arriving: Callable[[], int] | None = None):
        self._run = run
        self._arriving = arriving
        self.window_s = window_ms / 1e3
        self.max_images = max_images
        self.max_pending = max_pending
        self._pending: deque[Item] = deque()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # (loop, key, batch) for the thread; None stops it
        self._thread: threading.Thread | None = None  # started on the first batch
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy = False  # a batch of this loop is in the inference thread
        self._kicked = False  # a `_schedule` pass is queued with call_soon
        self._timer: asyncio.TimerHandle | None = None  # closes the oldest request's window
        self.batches = 0  # statistics, read by /health
        self.requests = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or the app moved to a new loop (the old one is gone)
            self._unbind()
            self._loop = loop
        return loop

    def _unbind(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._loop, self._pending, self._busy, self._kicked, self._timer = None, deque(), False, False, None

    async def submit(self, key: Hashable, x: Tensor, t0: float, wait: bool = True):
        loop = self._bind()
        if len(self._pending) >= self.max_pending:
            raise QueueFull(f"{len(self._pending)} requests are already waiting")
        item = Item(key, x, t0, wait, loop.create_future())
        self._pending.append(item)
        self._kick()
        return await item.future

    def nudge(self) -> None:
        """Look again whether the oldest request still has company on its way (a request that was arriving
        failed before it was submitted). Event-loop thread only; a no-op for another loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if loop is self._loop and self._pending:
            self._kick()

    def _kick(self) -> None:
        # call_soon, not an immediate start: requests whose handlers are already queued in this loop iteration
        # (a burst read in one go) get submitted before the batch is formed, so they share it.
        if not self._kicked:
            self._kicked = True
            self._loop.call_soon(self._kicked_pass)

    def _kicked_pass(self) -> None:
        self._kicked = False
        self._schedule()

    def _images(self, key: Hashable) -> int:
        return sum(it.images for it in self._pending if it.key == key)

    def _take(self, key: Hashable) -> list[Item]:
        """The oldest request plus later ones with the same key, in arrival order, up to `max_images`."""
        head = self._pending.popleft()
        batch, images, rest = [head], head.images, deque()
        while self._pending:
            it = self._pending.popleft()
            if it.key == key and images + it.images <= self.max_images:
                batch.append(it)
                images += it.images
            else:
                rest.append(it)
        self._pending = rest
        return batch

    def _wait_left(self, head: Item) -> float:
        """Seconds the oldest request may still wait for company (0: start now): until its window (from its
        arrival) closes, while the batch is not full and (with an `arriving` counter) some request is on its way."""
        if not head.wait or self.window_s <= 0:
            return 0.0
        remaining = head.queued + self.window_s - time.perf_counter()
        if remaining <= 0 or self._images(head.key) >= self.max_images:
            return 0.0
        if self._arriving is not None and self._arriving() == 0:
            return 0.0
        return remaining

    def _schedule(self, window_closed: bool = False) -> None:
        """Start the next batch if the thread is free and the oldest request need not wait any longer."""
        while not self._busy and self._pending:
            head = self._pending[0]
            wait = 0.0 if window_closed else self._wait_left(head)
            if wait > 0:
                if self._timer is None:  # one timer for the head; a start cancels it
                    self._timer = self._loop.call_later(wait, self._window_closed)
                return
            self._start(head.key)

    def _window_closed(self) -> None:
        self._timer = None
        self._schedule(window_closed=True)  # timers may fire a little early: the head's window is over

    def _start(self, key: Hashable) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = [it for it in self._take(key) if not it.future.done()]  # done = client gone
        if not batch:
            return
        if self._closed:  # `close()` stopped the thread: fail these, keep the loop going
            for it in batch:
                it.future.set_exception(RuntimeError("the micro-batcher is closed"))
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._thread_main, name="anytime-inference", daemon=True)
            self._thread.start()
        self._busy = True
        self._jobs.put((self._loop, key, batch))

    def _thread_main(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._work(*job)

    def _work(self, loop: asyncio.AbstractEventLoop, key: Hashable, batch: list[Item]) -> None:
        """Inference thread: run the batch, post the outcome back to the loop that queued it."""
        try:
            results, error = self._run(key, batch), None
            if len(results) != len(batch):
                raise RuntimeError(f"batch run returned {len(results)} results for {len(batch)} requests")
        except Exception as e:  # a bug in `run`: fail this batch's requests, keep serving the rest
            results, error = None, e
        try:
            loop.call_soon_threadsafe(self._done, loop, batch, results, error)
        except RuntimeError:  # that loop is closed (the server stopped): nobody waits for these answers
            pass

    def _done(self, loop: asyncio.AbstractEventLoop, batch: list[Item], results: list | None,
              error: Exception | None) -> None:
        for i, it in enumerate(batch):
            if not it.future.done():
                if error is None:
                    it.future.set_result(results[i])
                else:
                    it.future.set_exception(error)
        if loop is not self._loop:  # a batch from before a rebind: its loop's state is gone
            return
        self._busy = False
        if error is None:
            self.batches += 1
            self.requests += len(batch)
        self._schedule()  # whatever queued while this batch ran starts now, before these handlers resume

    async def aclose(self) -> None:
        """Unbind from the current loop (app shutdown); a later `submit` on a new loop starts afresh."""
        self._unbind()

    def close(self) -> None:
        """Stop the inference thread (after the batch it runs, if any); later batches fail."""
        self._unbind()
        self._closed = True
        self._jobs.put(None)
