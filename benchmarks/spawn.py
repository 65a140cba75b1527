"""Run a function in a fresh (spawned) process and return what it returns: a load client that
must not share the server's interpreter, or a measurement that needs a clean process (memory,
merge peaks). The one place the benchmarks start a process of their own."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any


def _child(function: Callable[..., Any], args: tuple, queue: multiprocessing.Queue) -> None:
    queue.put(function(*args))


def run_in_child(function: Callable[..., Any], *args: Any, timeout: float = 900) -> Any:
    """``function(*args)`` in a spawned process (``function`` importable by name); its return
    value (picklable), or an error if the child dies or ``timeout`` seconds pass."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(function, args, queue))
    process.start()
    try:
        return queue.get(timeout=timeout)
    finally:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
