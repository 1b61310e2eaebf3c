"""Helper threads for torch work: every job runs on its own thread, which is gone after it
(so no OpenMP pool outlives the job; see ollama_compact_server/threads.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future

import pytest

from ollama_compact_server.threads import FreshThreadExecutor, run_on_fresh_thread, to_fresh_thread


def test_fresh_thread_runs_elsewhere_and_exits() -> None:
    future = run_on_fresh_thread(threading.current_thread)
    thread = future.result(timeout=5)
    assert thread is not threading.current_thread()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_fresh_thread_passes_errors() -> None:
    def boom() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        run_on_fresh_thread(boom).result(timeout=5)
    with pytest.raises(ValueError, match="bad"):
        asyncio.run(to_fresh_thread(boom))


def test_to_fresh_thread_returns_the_result() -> None:
    assert asyncio.run(to_fresh_thread(lambda a, b=0: a + b, 2, b=3)) == 5


def test_executor_runs_jobs_in_order_one_at_a_time_each_on_a_new_thread() -> None:
    executor = FreshThreadExecutor("test")
    running = 0
    peak = 0
    order: list[int] = []
    threads: list[threading.Thread] = []
    lock = threading.Lock()

    def job(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.01)
        order.append(i)
        threads.append(threading.current_thread())
        with lock:
            running -= 1
        return i * i

    futures = [executor.submit(job, i) for i in range(5)]
    assert [f.result(timeout=5) for f in futures] == [0, 1, 4, 9, 16]
    assert order == [0, 1, 2, 3, 4]
    assert peak == 1
    assert len({id(t) for t in threads}) == 5
    executor.shutdown(wait=True)
    for thread in threads:
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_executor_errors_do_not_stop_the_queue() -> None:
    executor = FreshThreadExecutor("test")

    def boom() -> None:
        raise RuntimeError("load failed")

    first = executor.submit(boom)
    second = executor.submit(lambda: "next")
    with pytest.raises(RuntimeError, match="load failed"):
        first.result(timeout=5)
    assert second.result(timeout=5) == "next"
    executor.shutdown()


def test_executor_shutdown_cancels_queued_jobs_and_refuses_new_ones() -> None:
    executor = FreshThreadExecutor("test")
    gate = threading.Event()
    running = executor.submit(gate.wait, 5)
    queued = executor.submit(lambda: "never")
    executor.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError):
        executor.submit(lambda: None)
    gate.set()
    assert running.result(timeout=5) is True
    executor.shutdown(wait=True)


def test_executor_skips_a_cancelled_job() -> None:
    executor = FreshThreadExecutor("test")
    gate = threading.Event()
    executor.submit(gate.wait, 5)
    skipped = executor.submit(lambda: "skipped")
    last = executor.submit(lambda: "last")
    assert skipped.cancel()
    gate.set()
    assert last.result(timeout=5) == "last"
    executor.shutdown()


def test_executor_fails_a_job_whose_thread_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    executor = FreshThreadExecutor("test")
    real_start = threading.Thread.start
    calls = 0

    def start_once_failing(self: threading.Thread) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start_once_failing)
    first = executor.submit(lambda: "first")
    second = executor.submit(lambda: "second")
    with pytest.raises(RuntimeError, match="can't start"):
        first.result(timeout=5)
    assert second.result(timeout=5) == "second"
    executor.shutdown(wait=True)


def test_cancelling_at_shutdown_runs_callbacks_outside_the_lock() -> None:
    """A done-callback of a cancelled job may call back into the executor (here: submit,
    which is refused after shutdown) without deadlocking shutdown."""
    executor = FreshThreadExecutor("test")
    gate = threading.Event()
    executor.submit(gate.wait, 5)
    queued = executor.submit(lambda: "never")
    refused: list[BaseException] = []

    def submit_again(_: Future[str]) -> None:
        try:
            executor.submit(lambda: "again")
        except RuntimeError as exc:
            refused.append(exc)

    queued.add_done_callback(submit_again)
    closer = threading.Thread(
        target=executor.shutdown, kwargs={"wait": False, "cancel_futures": True}
    )
    closer.start()
    closer.join(timeout=5)
    assert not closer.is_alive(), "shutdown deadlocked"
    assert queued.cancelled() and len(refused) == 1
    gate.set()
    executor.shutdown(wait=True)
