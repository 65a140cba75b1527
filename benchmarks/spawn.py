"""Run a function in a fresh (spawned) process and return what it returns: a load client that
must not share the server's interpreter, or a measurement that needs a clean process (memory,
merge peaks). The one place the benchmarks start a process of their own."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

CONTEXT = multiprocessing.get_context("spawn")


def _child(function: Callable[..., Any], args: tuple, queue: multiprocessing.Queue) -> None:
    queue.put(function(*args))


def _run_all(function: Callable[..., Any], calls: list[tuple], timeout: float) -> list[Any]:
    """``function(*args)`` for each ``args`` of ``calls``, each in its own spawned process, all
    at once; their return values in order."""
    queues = [CONTEXT.Queue() for _ in calls]
    processes = [
        CONTEXT.Process(target=_child, args=(function, args, queue))
        for args, queue in zip(calls, queues, strict=True)
    ]
    for process in processes:
        process.start()
    try:
        return [queue.get(timeout=timeout) for queue in queues]
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()


def run_in_child(function: Callable[..., Any], *args: Any, timeout: float = 900) -> Any:
    """``function(*args)`` in a spawned process (``function`` importable by name); its return
    value (picklable), or an error if the child dies or ``timeout`` seconds pass."""
    return _run_all(function, [args], timeout)[0]


def run_side_by_side(
    function: Callable[..., Any], args: tuple, copies: int, timeout: float = 900
) -> list[Any]:
    """``function(*args, start)`` in ``copies`` spawned processes at once, where ``start`` is a
    barrier they share (``start.wait()`` lines up what they measure); their return values."""
    start = CONTEXT.Barrier(copies)
    return _run_all(function, [(*args, start)] * copies, timeout)
