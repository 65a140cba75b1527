"""The continuous batcher: batches form while the model is busy, the wait adapts to the
traffic, one batch's failure or a caller's timeout touches no other request; a model replica
takes its fronts' calls without waiting."""

import asyncio
import contextvars
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from freemerge.serving.app import ClassifierServer
from freemerge.serving.batcher import BatchCancelled, Batcher
from freemerge.serving.replicas import ModelReplica
from freemerge.serving.requests import ClassifyRequest, RequestError
from freemerge.serving.settings import ServingOptions


class SlowModel:
    """A stand-in model: each batch takes ``seconds``; records batch sizes and overlap."""

    def __init__(self, seconds: float = 0.02, fail_on: object = None) -> None:
        self.seconds = seconds
        self.fail_on = fail_on
        self.batches: list[list] = []
        self.running = 0
        self.most_running = 0

    async def __call__(self, items: list) -> list:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        self.batches.append(list(items))
        try:
            await asyncio.sleep(self.seconds)
            if self.fail_on in items:
                raise RuntimeError("this batch failed")
            return [ValueError(item) if item == "bad" else item * 2 for item in items]
        finally:
            self.running -= 1


def test_batches_form_while_the_model_is_busy():
    """16 clients in a closed loop, each arriving with its own small delay (as through a proxy
    and a front), against a model busy for 20 ms per batch: the requests that arrive during a
    batch join the next one, so batches hold many requests, not one each."""

    async def scenario() -> SlowModel:
        model = SlowModel(0.02)
        batcher = Batcher(model, max_size=16, wait_s=0.005)
        rng = random.Random(0)

        async def client(number: int) -> None:
            for _ in range(10):
                await asyncio.sleep(rng.uniform(0, 0.01))
                assert await batcher.submit([number]) == [number * 2]

        await asyncio.gather(*(client(n) for n in range(16)))
        return model

    model = asyncio.run(scenario())
    sizes = [len(batch) for batch in model.batches]
    assert sum(sizes) == 160
    assert statistics.median(sizes) >= 8, sizes
    assert model.most_running == 1


def test_an_idle_batcher_answers_at_once_and_waits_only_under_load():
    """After a batch of one (idle), a request runs without waiting for others (a wait of 10 s
    would time it out); after a batch of four, the next batch waits for four requests."""

    async def scenario() -> SlowModel:
        model = SlowModel(0.0)
        batcher = Batcher(model, max_size=8, wait_s=10.0)
        assert await asyncio.wait_for(batcher.submit([1]), 2.0) == [2]
        await batcher.submit([1, 2, 3, 4])  # a batch of four: the wait now expects four

        async def late(item: int, delay: float) -> list:
            await asyncio.sleep(delay)
            return await batcher.submit([item])

        answers = await asyncio.wait_for(
            asyncio.gather(*(late(item, 0.01 * item) for item in range(4))), 5.0
        )
        assert answers == [[0], [2], [4], [6]]
        return model

    model = asyncio.run(scenario())
    assert [len(batch) for batch in model.batches] == [1, 4, 4]


def test_batches_that_run_at_once_each_wait_for_their_share_of_the_recent_peak():
    """Two batches at once (a front's two calls out), after 16 requests were held at once: a
    batch waits for its share, 8, not for 16 (the last batch's size: it would wait for
    requests that the other batch holds) and not for fewer (it would leave while the rest
    are on their way)."""

    async def scenario() -> SlowModel:
        model = SlowModel(0.01)
        batcher = Batcher(model, max_size=16, wait_s=10.0, concurrency=2)
        await asyncio.gather(*(batcher.submit([k]) for k in range(16)))

        async def late(item: int) -> list:
            await asyncio.sleep(0.005 * item)
            return await batcher.submit([item])

        await asyncio.wait_for(asyncio.gather(*(late(k) for k in range(8))), 5.0)
        return model

    model = asyncio.run(scenario())
    assert [len(batch) for batch in model.batches] == [8, 8, 8]  # the burst split (below)


def test_a_burst_is_split_among_the_batches_that_can_start():
    """A burst of 12 arriving at once, three batches free (a front's calls out, one per model
    replica): each takes its share, 4, where the first would have taken all 12; with one batch
    free it takes all that is queued."""

    async def sizes(concurrency: int) -> list[int]:
        model = SlowModel(0.01)
        batcher = Batcher(model, max_size=16, wait_s=1.0, concurrency=concurrency)
        await asyncio.wait_for(asyncio.gather(*(batcher.submit([k]) for k in range(12))), 5.0)
        return [len(batch) for batch in model.batches]

    assert asyncio.run(sizes(3)) == [4, 4, 4]
    assert asyncio.run(sizes(1)) == [12]


def test_a_batch_takes_its_share_not_all_that_queued_while_its_twin_runs():
    """Seen at 16 clients (two calls out): one batch of 6 running, 10 queued when the other
    slot frees. The batch takes its share of the 16 held, 8, not the 10 (which came back
    later than the 6, its clients too, and the next batches alternated 6 and 10); the 2 left
    join the next batch. With both slots free each takes half."""
    batcher = Batcher(SlowModel(), max_size=16, wait_s=0.04, concurrency=2)
    batcher.queue.extend((k, None) for k in range(10))
    batcher.peaks.append(16)
    batcher.running, batcher.running_items = 1, 6
    assert batcher.taken() == 8
    batcher.running, batcher.running_items = 0, 0
    assert batcher.taken() == 8  # of 10 queued and the peak of 16: the share of either slot


def test_a_full_queue_runs_more_batches_at_once_and_less_does_not():
    """Saturated (a full batch queued beyond the batches running), up to ``full_concurrency``
    batches run at once, so that a model replica has its next one waiting; with less queued,
    ``concurrency``."""

    async def most_running(items: int, concurrency: int) -> int:
        model = SlowModel(0.05)
        batcher = Batcher(model, 4, 0.0, concurrency, full_concurrency=2 * concurrency)
        answers = await asyncio.gather(*(batcher.submit([k]) for k in range(items)))
        assert answers == [[2 * k] for k in range(items)]
        return model.most_running

    assert asyncio.run(most_running(20, 2)) == 4
    assert asyncio.run(most_running(6, 1)) == 1  # a batch of 4; the 2 left are no full batch


def test_after_a_burst_one_wait_runs_out_and_then_a_lone_request_goes_at_once():
    """16 requests held at once, then one client alone: its first request waits ``wait_s``
    for a share that never comes, and that wait forgets the burst; the next ones go at once
    (not each waiting as long, for as many batches as the peaks are kept)."""

    async def scenario() -> list[float]:
        batcher = Batcher(SlowModel(0.0), max_size=16, wait_s=0.2, concurrency=2)
        await asyncio.gather(*(batcher.submit([k]) for k in range(16)))
        waits = []
        for k in range(4):
            start = time.monotonic()
            assert await batcher.submit([k]) == [2 * k]
            waits.append(time.monotonic() - start)
        return waits

    waits = asyncio.run(scenario())
    assert waits[0] >= 0.15, waits
    assert all(wait < 0.1 for wait in waits[1:]), waits


def closed_loop_sizes(
    seed: int,
    run_s: Callable[[int], float],
    away_s: tuple[float, float],
    requests: int,
    **batcher_options: Any,
) -> list[int]:
    """Sizes of the batches a 16-client closed loop forms through a front's two calls: each
    client away ``away_s`` (a uniform range) before each of its ``requests``, each batch of
    ``n`` running ``run_s(n)``."""

    async def scenario() -> list[int]:
        sizes: list[int] = []

        async def model(items: list) -> list:
            sizes.append(len(items))
            await asyncio.sleep(run_s(len(items)))
            return items

        batcher = Batcher(model, max_size=16, concurrency=2, **batcher_options)
        rng = random.Random(seed)

        async def client(number: int) -> None:
            for _ in range(requests):
                await asyncio.sleep(rng.uniform(*away_s))
                assert await batcher.submit([number]) == [number]

        await asyncio.gather(*(client(n) for n in range(16)))
        return sizes

    return asyncio.run(scenario())


def test_closed_loop_clients_fill_both_of_a_fronts_calls():
    """16 closed-loop clients, each away 10 to 40 ms between requests (a proxy, a front and
    the client), two batches at once, a model whose batch takes longer the more it holds:
    most batches hold half of the clients, in every seed."""
    for seed in range(3):
        sizes = closed_loop_sizes(seed, lambda n: 0.01 + 0.01 * n, (0.01, 0.04), 10, wait_s=0.06)
        assert sum(sizes) == 160
        assert statistics.median(sizes) >= 8, (seed, sizes)


def test_the_wait_grows_with_the_run_time_where_clients_come_back_slowly():
    """Slow cores: a batch runs 0.3 s and its clients come back 30 to 80 ms after their
    answers (longer than ``wait_s``, 20 ms). A fixed wait closes batches before half of the
    clients are back; a wait of up to 40% of the run time (120 ms) lets each take its share, 8,
    in every seed."""

    def sizes(seed: int, wait_share: float) -> list[int]:
        ran = closed_loop_sizes(
            seed, lambda n: 0.3, (0.03, 0.08), 5, wait_s=0.02, wait_share=wait_share
        )
        return ran[2:]  # after the first two calls, which ran the first arrivals

    for seed in range(2):
        assert statistics.median(sizes(seed, 0.0)) < 8
        adapted = sizes(seed, 0.4)
        assert statistics.median(adapted) >= 8, (seed, adapted)


def test_a_model_replica_takes_a_fronts_call_without_waiting():
    """A front sends a formed batch: the model replica runs a call smaller than its last batch
    at once, however long ``batch_wait_timeout_s`` (the fronts' wait) is."""
    replica = ModelReplica.func_or_class(ServingOptions(batch_wait_timeout_s=30.0))
    model = SlowModel(0.0)
    replica.batcher.run = model

    async def scenario() -> None:
        await replica.batcher.submit(list(range(8)))
        await asyncio.wait_for(replica.batcher.submit([1, 2, 3]), 5.0)

    asyncio.run(scenario())
    assert [len(batch) for batch in model.batches] == [8, 3]


def test_limits_order_and_concurrency():
    async def scenario() -> tuple[SlowModel, list]:
        model = SlowModel(0.01)
        batcher = Batcher(model, max_size=3, wait_s=0.0, concurrency=2)
        answers = await asyncio.gather(*(batcher.submit([k, k + 100]) for k in range(5)))
        return model, answers

    model, answers = asyncio.run(scenario())
    assert answers == [[2 * k, 2 * (k + 100)] for k in range(5)]
    assert max(len(batch) for batch in model.batches) <= 3
    assert sum(len(batch) for batch in model.batches) == 10
    assert model.most_running == 2


def test_a_failed_batch_or_item_fails_only_its_own_requests():
    async def scenario() -> tuple[list, list, list]:
        model = SlowModel(0.01, fail_on="boom")
        batcher = Batcher(model, max_size=2, wait_s=0.0)
        failed = await batcher.submit(["boom", "x"])
        one_bad = await batcher.submit(["bad", "y"])
        after = await batcher.submit(["z"])
        return failed, one_bad, after

    failed, one_bad, after = asyncio.run(scenario())
    assert all(isinstance(answer, RuntimeError) for answer in failed)
    assert isinstance(one_bad[0], ValueError) and one_bad[1] == "yy"
    assert after == ["zz"]


def test_a_caller_that_gave_up_takes_no_place_in_a_batch():
    async def scenario() -> SlowModel:
        model = SlowModel(0.05)
        batcher = Batcher(model, max_size=8, wait_s=0.0)
        first = asyncio.ensure_future(batcher.submit(["first"]))
        await asyncio.sleep(0.01)  # "first" is running; the next one queues behind it
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batcher.submit(["gave up"]), 0.01)
        assert await batcher.submit(["kept"]) == ["keptkept"]
        await first
        return model

    model = asyncio.run(scenario())
    assert model.batches == [["first"], ["kept"]]


def test_a_cancelled_batch_answers_its_callers_and_the_next_batch_runs():
    """A batch whose call to the model is cancelled (not by its callers) answers
    :class:`BatchCancelled` to each of them, instead of leaving them waiting for ever."""

    async def scenario() -> tuple[list, list]:
        calls = 0

        async def model(items: list) -> list:
            nonlocal calls
            calls += 1
            if calls == 1:  # the first call is cancelled by someone else, as Ray may do
                call = asyncio.ensure_future(asyncio.sleep(10))
                asyncio.get_running_loop().call_later(0.01, call.cancel)
                await call
            return [item * 2 for item in items]

        batcher = Batcher(model, max_size=4, wait_s=0.0)
        cancelled = await asyncio.wait_for(batcher.submit(["a", "b"]), 2.0)
        return cancelled, await asyncio.wait_for(batcher.submit(["c"]), 2.0)

    cancelled, after = asyncio.run(scenario())
    assert [type(answer) for answer in cancelled] == [BatchCancelled, BatchCancelled]
    assert after == ["cc"]


REQUEST_ID = contextvars.ContextVar("request_id", default=None)


def test_batches_run_outside_the_context_of_the_request_that_started_the_batcher():
    """Ray Serve takes a call's parent request from the context: a batch must not run as a
    child of the first request the batcher saw (it would be cancelled with that request)."""

    async def scenario() -> list:
        seen = []

        async def model(items: list) -> list:
            seen.append(REQUEST_ID.get())
            return items

        batcher = Batcher(model, max_size=4, wait_s=0.0)

        async def request(request_id: str) -> None:
            REQUEST_ID.set(request_id)
            await batcher.submit([request_id])

        await asyncio.gather(request("first"), request("second"))
        await request("third")
        return seen

    assert set(asyncio.run(scenario())) == {None}


class FailingModels:
    """A stand-in for the front's handle to the model replicas: every call raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.classify = self

    def remote(self, requests: list) -> object:
        async def fail() -> None:
            raise self.error

        return fail()


@pytest.mark.parametrize(
    "error, message",
    [
        (BackPressureError(num_queued_requests=8, max_queued_requests=8), "overloaded"),
        (RayActorError(), "lost 3 times"),
        (BatchCancelled("cancelled"), "cancelled"),
    ],
)
def test_a_front_answers_503_when_its_batch_finds_no_model_replica(error, message, monkeypatch):
    """The model replicas full, lost on every attempt or the call cancelled: a 503 to retry, as
    for a multiplexed call, not a 500 that blames the model."""
    # The front's own class, without Serve's ingress wrapper. Serve holds a copy of the class
    # with its own globals, whose app it pickles with the deployment: the guard the front sets
    # on that app is taken off after, so later tests can still deploy.
    front_class = ClassifierServer.func_or_class.__mro__[1]
    its_app = front_class.__init__.__globals__["api"]
    monkeypatch.setattr(its_app.state, "guard", None, raising=False)

    async def scenario() -> RequestError:
        front = front_class(ServingOptions(), FailingModels(error))
        request = ClassifyRequest("sms_spam", ["hello"], time.perf_counter())
        with pytest.raises(RequestError) as refused:
            await front._served("sms_spam", lambda: request, "/v1/classify")
        return refused.value

    refused = asyncio.run(scenario())
    assert refused.status == 503 and message in str(refused), str(refused)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Batcher(SlowModel(), max_size=0, wait_s=0.0)
    with pytest.raises(ValueError, match="full_concurrency"):
        Batcher(SlowModel(), max_size=4, wait_s=0.0, concurrency=2, full_concurrency=1)
    with pytest.raises(ValueError, match="wait_share"):
        Batcher(SlowModel(), max_size=4, wait_s=0.0, wait_share=1.5)
    with pytest.raises(ValueError, match="batch_wait_run_share"):
        ServingOptions(batch_wait_run_share=-0.1)
