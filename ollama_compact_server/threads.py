"""Threads for torch work done beside the device threads (loading, compressing, importing).

Such work runs on a thread that exits when the job ends. The reason is the OpenMP runtime of
the CPU builds of torch (libgomp): every thread that ever runs a parallel region keeps a pool
of OpenMP workers for as long as it lives, and once the pools together hold more threads
than there are CPUs, libgomp makes every worker sleep between parallel regions instead of
spinning ("throttled" spin count). A forward pass is hundreds of small parallel regions, so
each then pays a futex wake-up: on a 2-core machine a 64-row decode step of gemma3:270m
took 190-200 ms on the device thread with the model loaded on a persistent thread, and
145-150 ms with it loaded on a thread that had exited (same process layout otherwise). A
thread that exits frees its pool, so only the device threads keep one.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


def _run_into(future: Future[Any], fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # handed to whoever waits on the future
        future.set_exception(exc)
    else:
        future.set_result(result)


def run_on_fresh_thread(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
    """Runs ``fn`` on a new thread that exits when it returns. Like the workers of
    ``ThreadPoolExecutor``, the thread is not a daemon: interpreter exit waits for a job in
    flight (a registry write finishes or rolls back instead of being cut off)."""
    future: Future[T] = Future()
    future.set_running_or_notify_cancel()
    thread = threading.Thread(target=_run_into, args=(future, fn, args, kwargs), name="ocs-job")
    thread.start()  # raises if no thread can be started; the caller sees it
    return future


async def to_fresh_thread(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``asyncio.to_thread`` for torch work: the thread exits afterwards (module doc)."""
    return await asyncio.wrap_future(run_on_fresh_thread(fn, *args, **kwargs))


def _fail(failed: list[tuple[Future[Any], BaseException]]) -> None:
    for future, exc in failed:
        future.set_exception(exc)


class FreshThreadExecutor(Executor):
    """Runs submitted jobs one at a time, in order, each on a new thread that exits after
    it (a one-worker ``ThreadPoolExecutor`` whose worker is never reused)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._queue: deque[tuple[Future[Any], Callable[..., Any], Any, Any]] = deque()
        self._current: threading.Thread | None = None
        self._closed = False
        self._started = 0

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        failed: list[tuple[Future[Any], BaseException]] = []
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new jobs after shutdown")
            self._queue.append((future, fn, args, kwargs))
            if self._current is None:
                failed = self._start_next()
        _fail(failed)
        return future

    def _start_next(self) -> list[tuple[Future[Any], BaseException]]:
        """Starts the next job that was not cancelled (the lock is held). Returns the jobs
        whose thread could not start, to be failed once the lock is released (a future's
        callbacks may call back into this executor)."""
        self._current = None
        failed: list[tuple[Future[Any], BaseException]] = []
        while self._queue:
            future, fn, args, kwargs = self._queue.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            self._started += 1
            thread = threading.Thread(
                target=self._work,
                args=(future, fn, args, kwargs),
                name=f"{self._name}-{self._started}",
            )
            try:
                thread.start()
            except BaseException as exc:  # no thread could be started: fail this job alone
                failed.append((future, exc))
                continue
            self._current = thread
            break
        return failed

    def _work(self, future: Future[Any], fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
        try:
            _run_into(future, fn, args, kwargs)
        finally:
            with self._lock:
                failed = self._start_next()
            _fail(failed)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        cancelled: list[Future[Any]] = []
        with self._lock:
            self._closed = True
            if cancel_futures:
                cancelled = [item[0] for item in self._queue]
                self._queue.clear()
        for future in cancelled:  # outside the lock: callbacks may call back in
            future.cancel()
        while wait:
            with self._lock:
                current = self._current
            if current is None or current is threading.current_thread():
                return
            current.join()
