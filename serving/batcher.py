"""Continuous batching, for the fronts' calls and the model replicas' batches: requests queue
while a batch runs, and the next batch takes what queued, as soon as a slot is free.

Ray Serve's ``@serve.batch`` closes a batch when its wait ends even while the model is busy, so
under load its batches queue up behind the running one holding one request each. Here a batch
is only formed when a slot is free. Its wait adapts to the traffic: a batch waits up to
``wait_s`` for its share of the requests the batcher held lately (the most it held at once,
queued or running, over its last ``2 * concurrency`` batches, divided among the batches that
run at once); an idle server (one request at a time) answers at once, and after a burst one
wait that runs out brings it back there. The wait also scales with the machine: up to
``wait_share`` of the last batches' run time where that is longer than ``wait_s``, since the
answered clients' next requests come back through processes that share the model's cores (a
fixed 40 ms, right where a batch of 8 ran in 0.2 s, closed batches of 6 where it ran in 0.7 s).
Under a steady closed loop this wait also spreads the batches that run at once apart in time,
so that each finds its share queued when its slot frees, and then none waits. A batch takes
its share, not all that is queued: behind HAProxy a front's requests arrive in bursts (a
batch's clients answered together send again together), and the first free call took a whole
burst while the second left with nothing, one model replica busy and the other idle; and with
one slot free, a batch that took all (10 of 16 clients, its twin running 6) came back later
than its twin, so the next ones alternated 6 and 10 for seconds.

While the queue holds a full batch beyond the batches running, up to ``full_concurrency`` run
at once: a front then has a second call queued at each model replica, which starts it the
moment its batch ends instead of idling for the hop back to the front and out again.

The batches run in a context of their own, not the one of the request that happened to start
the batcher: Ray Serve reads a call's parent request from the context, so a model call made in
that request's context would be its child (logged under its ID, and cancelled with it while
still waiting for a replica). A batch
whose run is cancelled anyway answers :class:`BatchCancelled` to each of its callers.
"""

from __future__ import annotations

import asyncio
import contextvars
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Answer = TypeVar("Answer")


class BatchCancelled(RuntimeError):
    """The batch's run was cancelled before it answered (its callers may retry)."""


class Batcher(Generic[Item, Answer]):
    """Runs ``run(items)`` on batches of at most ``max_size`` items, ``concurrency`` batches at
    a time (``full_concurrency`` while a full batch queues beyond them; by default the same);
    ``run`` answers one result (or exception) per item, in order."""

    def __init__(
        self,
        run: Callable[[list[Item]], Awaitable[Sequence[Answer]]],
        max_size: int,
        wait_s: float,
        concurrency: int = 1,
        full_concurrency: int | None = None,
        wait_share: float = 0.0,
    ) -> None:
        full_concurrency = concurrency if full_concurrency is None else full_concurrency
        if (
            max_size < 1
            or concurrency < 1
            or full_concurrency < concurrency
            or not 0 <= wait_s < float("inf")
            or not 0 <= wait_share <= 1
        ):
            raise ValueError(
                "max_size and concurrency must be >= 1, full_concurrency >= concurrency, "
                "wait_s finite and >= 0, wait_share in [0, 1]"
            )
        self.run = run
        self.max_size = max_size
        self.wait_s = wait_s
        self.wait_share = wait_share
        # how long the last batches ran, for the wait in proportion to them
        self.run_seconds: deque[float] = deque(maxlen=2 * concurrency)
        self.concurrency = concurrency
        self.full_concurrency = full_concurrency
        self.queue: deque[tuple[Item, asyncio.Future]] = deque()
        self.running = 0  # batches
        self.running_items = 0
        # the most items held at once (queued or running) since each of the last batches formed
        self.peaks: deque[int] = deque([1], maxlen=2 * concurrency)
        self._changed: asyncio.Event | None = None  # bound to the loop on first use
        self._loop_task: asyncio.Task | None = None

    async def submit(self, items: list[Item]) -> list[Answer | BaseException]:
        """Queue ``items`` together (they enter the same batch when it has room) and wait for
        their answers; a batch that raised answers its exception to each of its items."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self.queue.extend(zip(items, futures, strict=True))
        self.peaks[-1] = max(self.peaks[-1], len(self.queue) + self.running_items)
        self._wake()
        return list(await asyncio.gather(*futures, return_exceptions=True))

    def _wake(self) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        self._changed.set()
        if self._loop_task is None or self._loop_task.done():
            # no request's context: the batches it starts belong to none (see the module)
            self._loop_task = asyncio.get_running_loop().create_task(
                self._form_batches(), context=contextvars.Context()
            )

    async def _changes(self, timeout: float | None = None) -> None:
        """Wait for a new item or a finished batch (or ``timeout``)."""
        assert self._changed is not None
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    async def _form_batches(self) -> None:
        while True:
            self._drop_cancelled()
            full = len(self.queue) >= self.max_size
            if not self.queue or self.running >= (
                self.full_concurrency if full else self.concurrency
            ):
                await self._changes()
                continue
            await self._fill()
            batch = [self.queue.popleft() for _ in range(self.taken())]
            if batch:
                self.running += 1
                self.running_items += len(batch)
                self.peaks.append(len(self.queue) + self.running_items)
                asyncio.get_running_loop().create_task(self._run(batch))

    def wanted(self) -> int:
        """Items the next batch waits for: its share of the most held at once lately."""
        return min(self.max_size, -(-max(self.peaks) // self.concurrency))

    def taken(self) -> int:
        """Items the next batch takes: what is queued, up to its share (:meth:`wanted`, which
        counts what is queued now and is at most ``max_size``). So a burst is spread over the slots
        instead of all going to the first, and the batches that run at once stay even: one
        that took more than its share would come back later than the others, its clients too,
        and the next batches would alternate small and large."""
        return min(len(self.queue), self.wanted())

    def wait_seconds(self) -> float:
        """How long a batch waits at most for :meth:`wanted`: ``wait_s``, or ``wait_share`` of
        the median run time of the last batches where that is longer."""
        if not self.run_seconds:
            return self.wait_s
        return max(self.wait_s, self.wait_share * statistics.median(self.run_seconds))

    async def _fill(self) -> None:
        """Wait up to :meth:`wait_seconds` while the queue holds fewer than :meth:`wanted`; a
        wait that runs out forgets the peaks (the load fell), so the next batch expects what is
        held now."""
        deadline = time.monotonic() + self.wait_seconds()
        while len(self.queue) < self.wanted():
            left = deadline - time.monotonic()
            if left <= 0:
                self.peaks.clear()
                self.peaks.append(len(self.queue) + self.running_items)
                return
            await self._changes(left)
            self._drop_cancelled()

    def _drop_cancelled(self) -> None:
        """Items whose caller gave up (a timeout) take no place in a batch."""
        if any(future.done() for _, future in self.queue):
            self.queue = deque(entry for entry in self.queue if not entry[1].done())

    async def _run(self, batch: list[tuple[Item, asyncio.Future]]) -> None:
        items = [item for item, _ in batch]
        cancelled = False
        started = time.monotonic()
        try:
            answers: Sequence[Answer | BaseException] = await self.run(items)
            self.run_seconds.append(time.monotonic() - started)
            if len(answers) != len(items):
                raise RuntimeError(f"{len(answers)} answers to a batch of {len(items)}")
        except Exception as err:
            answers = [err] * len(items)
        except asyncio.CancelledError:
            answers = [BatchCancelled("the batch was cancelled before it answered")] * len(items)
            cancelled = True
        finally:
            self.running -= 1
            self.running_items -= len(items)
            self._wake()
        self._answer(batch, answers)
        task = asyncio.current_task()
        if cancelled and task is not None and task.cancelling():  # this task was cancelled
            raise asyncio.CancelledError

    @staticmethod
    def _answer(
        batch: list[tuple[Item, asyncio.Future]], answers: Sequence[Answer | BaseException]
    ) -> None:
        """Each caller still waiting gets its answer, or the exception that ``submit`` returns
        in the answer's place."""
        for (_, future), answer in zip(batch, answers, strict=True):
            if future.done():  # its caller gave up
                continue
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)
