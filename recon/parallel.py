"""Thread pools for the host work that releases the GIL (image decoding and encoding, large numpy/torch copies)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_THREADS = 16  # one thread per core, up to this many


def thread_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]`` in a thread pool (one thread per core, at most MAX_THREADS; in the caller's thread
    for fewer than two items or one core). Results in order; the first item's error in order is raised."""
    items = list(items)
    workers = min(len(items), os.cpu_count() or 1, MAX_THREADS)
    if workers < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))
