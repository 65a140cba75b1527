"""The replica's model thread and health signals, without Ray: stuck is no progress, not
a long batch; a failed restore of the merged weights is remembered."""

import asyncio
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from freemerge.serving.replicas import ModelThread
from freemerge.serving.requests import StageTimings
from freemerge.serving.runtime import MergedClassifier


def test_a_call_without_progress_is_stuck_and_one_with_progress_is_not():
    thread = ModelThread(1)
    release = threading.Event()

    async def scenario():
        blocked = asyncio.ensure_future(thread.run(release.wait))
        await asyncio.sleep(0.3)
        stuck, responds = thread.stuck(0.2), await thread.responds(0.3)
        release.set()
        await blocked
        return stuck, responds, thread.stuck(0.0), await thread.responds(0.3)

    stuck, responds, stuck_after, responds_after = asyncio.run(scenario())
    assert (stuck, responds) == (True, False)
    assert (stuck_after, responds_after) == (False, True)


def test_a_long_call_that_beats_responds():
    thread = ModelThread(1)

    def long_batch(timings: StageTimings) -> None:
        for _ in range(30):  # 1.5 s of forward passes, each reporting its end
            time.sleep(0.05)
            timings.add("forward", 0.05)

    async def scenario():
        batch = asyncio.ensure_future(thread.run(long_batch, StageTimings(progress=thread.beat)))
        await asyncio.sleep(0.3)
        answer = await thread.responds(0.3), thread.stuck(0.3)
        await batch
        return answer

    assert asyncio.run(scenario()) == (True, False)


@contextmanager
def applied(fail_on_exit):
    yield
    if fail_on_exit:
        raise RuntimeError("restore failed")


def test_a_failed_restore_marks_the_model_damaged_and_a_failed_block_does_not():
    model = SimpleNamespace(damaged=None)
    with pytest.raises(ValueError):
        with MergedClassifier._restore_watched(model, applied(False)):
            raise ValueError("the forward failed")
    assert model.damaged is None
    with pytest.raises(RuntimeError):
        with MergedClassifier._restore_watched(model, applied(True)):
            pass
    assert "restoring the merged weights failed (RuntimeError)" in model.damaged
